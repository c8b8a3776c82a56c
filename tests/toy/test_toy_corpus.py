"""The toy corpus: exact masks, planted group structure, determinism, the written folder, and the
planted FB-Mem test pairs (scored with the project's region scorer)."""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fbmem.jobs.toy.corpus import (
    BG_KINDS,
    FG_TEXTURES,
    SHAPES,
    BgSpec,
    FgSpec,
    ToyCorpusSpec,
    build_corpus,
    compose,
    render_background,
    write_corpus,
)
from fbmem.jobs.toy.planted import PLANTED_EXPECTED, planted_test_set

SMALL = ToyCorpusSpec(
    vm_prompts=2, vm_copies=3, fm_prompts=2, fm_copies=4, bm_prompts=2, bm_copies=5, nm_prompts=6, size=48, seed=7
)


@pytest.fixture(scope="module")
def small():
    return build_corpus(SMALL)


@pytest.fixture(scope="module")
def default_corpus():
    return build_corpus(ToyCorpusSpec())


@pytest.fixture(scope="module")
def written(small, tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    return small, write_corpus(small, root)


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


# --------------------------------------------------------------------------------------- primitives

BLACK = BgSpec("stripes", (0, 0, 0), (1, 1, 1), period=0.25)  # colours no foreground texture can produce
OTHER = BgSpec("checker", "navy", "ivory", period=0.5, angle=45.0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("texture", FG_TEXTURES)
def test_mask_is_exactly_the_painted_pixels(shape: str, texture: str) -> None:
    fg = FgSpec(shape, "orange", texture, cx=0.45, cy=0.55, scale=0.3, angle=20.0)
    img, mask = compose(fg, BLACK, 64)
    assert img.dtype == np.uint8 and img.shape == (64, 64, 3)
    assert mask.dtype == np.float32 and mask.shape == (64, 64)
    assert set(np.unique(mask)) == {0.0, 1.0}
    bg_only = np.clip(np.rint(render_background(BLACK, 64)), 0, 255).astype(np.uint8)
    changed = (img != bg_only).any(axis=-1)
    np.testing.assert_array_equal(changed, mask == 1)


@pytest.mark.parametrize("shape", SHAPES)
def test_same_object_on_two_backgrounds_differs_only_outside_the_mask(shape: str) -> None:
    fg = FgSpec(shape, "cyan", "checked", cx=0.5, cy=0.5, scale=0.35)
    a, ma = compose(fg, BLACK, 64)
    b, mb = compose(fg, OTHER, 64)
    np.testing.assert_array_equal(ma, mb)
    inside = ma == 1
    np.testing.assert_array_equal(a[inside], b[inside])
    differs = (a != b).any(axis=-1)
    assert not differs[inside].any()
    assert differs[~inside].mean() > 0.9  # the two backgrounds really differ out there


def test_flat_object_pixels_carry_its_colour_and_circle_area_matches_geometry() -> None:
    fg = FgSpec("circle", "red", "flat", scale=0.3)
    img, mask = compose(fg, OTHER, 128)
    assert (img[mask == 1] == (220, 38, 38)).all()
    assert mask.sum() == pytest.approx(math.pi * (0.3 * 128) ** 2, rel=0.02)
    _, ring_mask = compose(FgSpec("ring", "red", scale=0.3), OTHER, 128)
    assert ring_mask[64, 64] == 0 and mask[64, 64] == 1  # the ring's hole is not foreground


def test_square_mask_bounds_are_the_analytic_ones() -> None:
    # half-side 0.75 * 0.4 = 0.3: pixel centres in [0.2, 0.8] of 64 px -> columns/rows 13..50
    _, mask = compose(FgSpec("square", "blue", scale=0.4), OTHER, 64)
    rows, cols = np.nonzero(mask)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (13, 50, 13, 50)
    assert mask.sum() == 38 * 38


def test_no_foreground_gives_empty_mask() -> None:
    img, mask = compose(None, OTHER, 32)
    assert not mask.any()
    np.testing.assert_array_equal(img, np.clip(np.rint(render_background(OTHER, 32)), 0, 255).astype(np.uint8))


@pytest.mark.parametrize("kind", BG_KINDS)
def test_backgrounds_use_both_colours_coarsely(kind: str) -> None:
    w = render_background(BgSpec(kind, "navy", "ivory", period=0.25, seed=3), 64)
    assert w.shape == (64, 64, 3)
    assert w.std() > 20  # a pattern, not a flat fill
    # coarse: neighbouring pixels differ little on average (pixel-level texture, which a small
    # autoencoder would lose, scores about 1/3 here)
    step = (np.abs(np.diff(w, axis=0)).mean() + np.abs(np.diff(w, axis=1)).mean()) / 2
    assert step / (w.max() - w.min()) < 0.15


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda: FgSpec("blob", "red"), "unknown shape"),
        (lambda: FgSpec("star", "chartreuse"), "unknown colour"),
        (lambda: FgSpec("star", "red", texture="furry"), "unknown foreground texture"),
        (lambda: BgSpec("plaid"), "unknown background kind"),
        (lambda: BgSpec("dots", (0, 0, 300)), "RGB triple"),
        (lambda: ToyCorpusSpec(vm_copies=0), "vm_copies"),
        (lambda: ToyCorpusSpec(size=8), "size"),
        (lambda: ToyCorpusSpec(bg_kinds=("stripes", "plaid")), "bg_kinds"),
        (lambda: ToyCorpusSpec(bm_copies=10_000), "bm_copies"),
        (lambda: planted_test_set(size=128), "161"),
    ],
)
def test_bad_settings_raise_a_clear_error(bad, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        bad()


# ------------------------------------------------------------------------------------------- groups


def test_counts_follow_the_spec(small, default_corpus) -> None:
    for corpus in (small, default_corpus):
        spec = corpus.spec
        assert len(corpus.images) == spec.n_images
        assert len(corpus.prompts) == spec.n_prompts
        for planted, prompts, copies in [
            ("VM", spec.vm_prompts, spec.vm_copies),
            ("FM", spec.fm_prompts, spec.fm_copies),
            ("BM", spec.bm_prompts, spec.bm_copies),
            ("NM", spec.nm_prompts, 1),
        ]:
            rows = [p for p in corpus.prompts if p.planted == planted]
            assert len(rows) == prompts
            assert all(len(p.linked) == copies for p in rows)
            assert sum(r.planted == planted for r in corpus.images) == prompts * copies
        assert all(r.image.shape == (spec.size, spec.size, 3) for r in corpus.images)
    assert len(default_corpus.images) == 208  # TOY.md's prototype corpus


def test_groups_share_one_caption_which_is_the_prompt(small) -> None:
    texts = [p.text for p in small.prompts]
    assert len(set(texts)) == len(texts)
    for p in small.prompts:
        members = small.group(p.group_id)
        assert [m.image_name for m in members] == list(p.linked)
        assert {m.caption for m in members} == {p.text}
        assert {m.prompt for m in members} == {p.text}
        assert {m.planted for m in members} == {p.planted}


def test_vm_copies_are_identical(small) -> None:
    for p in (p for p in small.prompts if p.planted == "VM"):
        members = small.group(p.group_id)
        assert len({_sha(m.image) for m in members}) == 1
        assert len({_sha(m.mask) for m in members}) == 1
        assert members[0].mask.any()


def test_fm_groups_keep_the_object_and_change_the_background(small) -> None:
    for p in (p for p in small.prompts if p.planted == "FM"):
        members = small.group(p.group_id)
        mask = members[0].mask
        inside = mask == 1
        assert inside.sum() > 0.05 * mask.size
        for m in members[1:]:
            np.testing.assert_array_equal(m.mask, mask)
            np.testing.assert_array_equal(m.image[inside], members[0].image[inside])
        outside = [m.image[~inside] for m in members]
        assert len({_sha(o) for o in outside}) == len(members)  # every background differs
        assert {m.bg.kind for m in members} <= set(small.spec.fm_bg_kinds)


def test_fm_background_kinds_are_a_setting() -> None:
    spec = dataclasses.replace(SMALL, fm_bg_kinds=("stripes", "checker"))
    kinds = {r.bg.kind for r in build_corpus(spec).images if r.planted == "FM"}
    assert kinds and kinds <= {"stripes", "checker"}
    with pytest.raises(ValueError, match="fm_bg_kinds"):
        ToyCorpusSpec(fm_bg_kinds=("plaid",))


def test_bm_background_kinds_are_a_setting() -> None:
    full = build_corpus(ToyCorpusSpec())
    default = {r.bg.kind for r in full.images if r.planted == "BM"}
    assert default and default <= set(ToyCorpusSpec().bm_bg_kinds) and not default & {"dots", "grid"}
    spec = dataclasses.replace(SMALL, bm_bg_kinds=("grid",))
    assert {r.bg.kind for r in build_corpus(spec).images if r.planted == "BM"} == {"grid"}
    with pytest.raises(ValueError, match="bm_bg_kinds"):
        ToyCorpusSpec(bm_bg_kinds=())


def test_fm_shapes_are_a_setting() -> None:
    default = {r.fg.shape for r in build_corpus(SMALL).images if r.planted == "FM"}
    assert default and default <= set(SMALL.fm_shapes) and not default & {"ring", "star", "cross"}
    spec = dataclasses.replace(SMALL, fm_shapes=("ring",))
    assert {r.fg.shape for r in build_corpus(spec).images if r.planted == "FM"} == {"ring"}
    with pytest.raises(ValueError, match="fm_shapes"):
        ToyCorpusSpec(fm_shapes=("blob",))
    with pytest.raises(ValueError, match="fm_shapes"):
        ToyCorpusSpec(fm_shapes=())


def test_bm_groups_keep_the_background_and_change_the_object(small) -> None:
    for p in (p for p in small.prompts if p.planted == "BM"):
        members = small.group(p.group_id)
        union = np.any([m.mask == 1 for m in members], axis=0)
        base = members[0].image
        for m in members[1:]:
            np.testing.assert_array_equal(m.image[~union], base[~union])
        looks = {(m.fg.shape, m.fg.colour, m.fg.texture) for m in members}
        assert len(looks) == len(members)
        assert len({_sha(m.image) for m in members}) == len(members)
        # the hard case: objects sit at about the same place, so their masks overlap a lot
        first = members[0].mask == 1
        for m in members[1:]:
            cur = m.mask == 1
            overlap = (first & cur).sum() / min(first.sum(), cur.sum())
            assert overlap > 0.4


def test_bm_jitter_zero_puts_objects_in_exactly_the_same_place() -> None:
    corpus = build_corpus(dataclasses.replace(SMALL, bm_jitter=0.0))
    for p in (p for p in corpus.prompts if p.planted == "BM"):
        places = {(m.fg.cx, m.fg.cy, m.fg.scale) for m in corpus.group(p.group_id)}
        assert len(places) == 1


def test_nm_images_are_all_distinct_and_nothing_repeats_across_groups(small, default_corpus) -> None:
    for corpus in (small, default_corpus):
        nm = [r for r in corpus.images if r.planted == "NM"]
        assert len({_sha(r.image) for r in nm}) == len(nm)
        spec = corpus.spec
        distinct = len({_sha(r.image) for r in corpus.images})
        assert distinct == spec.n_images - spec.vm_prompts * (spec.vm_copies - 1)
        # backgrounds are never shared between groups
        bg_owner: dict[str, str] = {}
        for r in corpus.images:
            key = _sha(np.clip(np.rint(render_background(r.bg, spec.size)), 0, 255).astype(np.uint8))
            assert bg_owner.setdefault(key, r.group_id) == r.group_id


def test_vm_and_fm_objects_belong_to_their_group_alone(small, default_corpus) -> None:
    """A memorized object seen under another caption would teach the model that object twice."""
    for corpus in (small, default_corpus):
        owner: dict[tuple, str] = {}
        for r in corpus.images:
            if r.fg is not None and r.planted in ("VM", "FM"):
                owner.setdefault((r.fg.shape, r.fg.colour, r.fg.texture), r.group_id)
        assert len(owner) == corpus.spec.vm_prompts + corpus.spec.fm_prompts
        for r in corpus.images:
            if r.fg is not None:
                look = (r.fg.shape, r.fg.colour, r.fg.texture)
                assert owner.get(look, r.group_id) == r.group_id, (r.image_name, look)


def test_nm_captions_share_at_most_one_word_with_any_memorized_caption(small, default_corpus) -> None:
    for corpus in (small, default_corpus):
        memorized = []
        for p in corpus.prompts:
            if p.planted in ("VM", "FM"):
                r = corpus.image(p.linked[0])
                memorized.append((r.fg.shape, r.fg.colour, r.fg.texture, r.bg.kind if p.planted == "VM" else None))
        for p in (p for p in corpus.prompts if p.planted == "NM"):
            r = corpus.image(p.linked[0])
            words = (r.fg.shape, r.fg.colour, r.fg.texture, r.bg.kind)
            for m in memorized:
                assert sum(a == b for a, b in zip(words, m) if b is not None) <= 1, (p.text, m)


def test_captions_use_the_right_article(default_corpus) -> None:
    articles = [p.text.split()[:2] for p in default_corpus.prompts if p.text.split()[0] in ("a", "an")]
    assert articles
    assert all((art == "an") == (word[0] in "aeiou") for art, word in articles)


def test_same_spec_gives_byte_identical_images_and_seed_changes_them(small) -> None:
    again = build_corpus(SMALL)
    assert [r.image_name for r in again.images] == [r.image_name for r in small.images]
    assert [r.caption for r in again.images] == [r.caption for r in small.images]
    assert [_sha(r.image) for r in again.images] == [_sha(r.image) for r in small.images]
    assert [_sha(r.mask) for r in again.images] == [_sha(r.mask) for r in small.images]
    other = build_corpus(dataclasses.replace(SMALL, seed=8))
    assert sum(_sha(a.image) == _sha(b.image) for a, b in zip(other.images, small.images)) == 0


def test_image_size_is_a_setting() -> None:
    spec = dataclasses.replace(SMALL, size=96, vm_prompts=1, fm_prompts=0, bm_prompts=0, nm_prompts=1)
    corpus = build_corpus(spec)
    assert {r.image.shape for r in corpus.images} == {(96, 96, 3)}
    assert {r.mask.shape for r in corpus.images} == {(96, 96)}


def test_corpus_arrays_are_read_only(small) -> None:
    with pytest.raises(ValueError):
        small.images[0].image[0, 0, 0] = 1


# ------------------------------------------------------------------------------------------- writing


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def test_written_folder_has_images_with_sidecars(written) -> None:
    corpus, paths = written
    pngs = sorted(p for p in paths.images_dir.glob("*.png") if not p.name.endswith(".mask.png"))
    assert len(pngs) == len(corpus.images)
    for r in corpus.images:
        img_path = paths.images_dir / f"{r.image_name}.png"
        with Image.open(img_path) as im:
            assert im.mode == "RGB"
            np.testing.assert_array_equal(np.asarray(im), r.image)
        with Image.open(paths.images_dir / f"{r.image_name}.mask.png") as mm:
            assert mm.mode == "L"
            m = np.asarray(mm)
        assert set(np.unique(m)) <= {0, 255}
        np.testing.assert_array_equal(m == 255, r.mask == 1)
        assert (paths.images_dir / f"{r.image_name}.txt").read_text(encoding="utf-8").strip() == r.caption


def test_folder_listing_pairs_every_image_with_its_sidecars(written) -> None:
    from fbmem.pipelines.sources import list_folder

    corpus, paths = written
    listing = list_folder(paths.root)
    assert len(listing.images) == len(corpus.images)
    stems = {str(Path(p).with_suffix("")) for p in listing.images}
    assert stems == listing.masks == listing.captions


def test_vm_copies_are_byte_identical_files(written) -> None:
    corpus, paths = written
    for p in (p for p in corpus.prompts if p.planted == "VM"):
        hashes = {hashlib.sha256(paths.image_paths[n].read_bytes()).hexdigest() for n in p.linked}
        assert len(hashes) == 1


def test_prompts_csv_links_each_prompt_to_a_training_image(written) -> None:
    corpus, paths = written
    header, rows = _read_csv(paths.prompts_csv)
    assert header == ["prompt", "planted", "url", "id"]
    assert [r["prompt"] for r in rows] == [p.text for p in corpus.prompts]
    assert [r["planted"] for r in rows] == [p.planted for p in corpus.prompts]
    for r, p in zip(rows, corpus.prompts):
        target = paths.root / r["url"]
        assert target == paths.image_paths[p.linked[0]]
        assert r["id"] == hashlib.sha256(target.read_bytes()).hexdigest()  # the ingested image_id


def test_prompts_csv_reads_as_a_prompt_set(written) -> None:
    from fbmem.pipelines.prompt_sets import load_prompt_set

    corpus, paths = written
    read = load_prompt_set(paths.prompts_csv)
    assert read.duplicates_dropped == 0 and read.empty_skipped == 0
    t = read.table.to_pydict()
    assert t["text"] == [p.text for p in corpus.prompts]
    assert t["planted"] == [p.planted for p in corpus.prompts]
    assert t["linked_uri"] == [f"images/{p.linked[0]}.png" for p in corpus.prompts]


def test_manifest_and_groups_describe_the_same_files(written) -> None:
    corpus, paths = written
    header, rows = _read_csv(paths.manifest_csv)
    assert header == ["uri", "caption", "mask_uri", "id"]
    assert len(rows) == len(corpus.images)
    for row, r in zip(rows, corpus.images):
        assert (paths.root / row["uri"]) == paths.image_paths[r.image_name]
        assert (paths.root / row["mask_uri"]).is_file()
        assert row["caption"] == r.caption and row["id"] == row["uri"]
    _, groups = _read_csv(paths.groups_csv)
    assert [(g["image"], g["group_id"], g["planted"]) for g in groups] == [
        (r.image_name, r.group_id, r.planted) for r in corpus.images
    ]
    spec = corpus.spec
    assert len({g["sha256"] for g in groups}) == spec.n_images - spec.vm_prompts * (spec.vm_copies - 1)


# -------------------------------------------------------------------------------- planted test pairs


@pytest.fixture(scope="module")
def planted():
    return planted_test_set(192, seed=0)


def test_planted_set_has_every_case_with_exact_masks(planted) -> None:
    assert [c.name for c in planted] == list(PLANTED_EXPECTED)
    assert {c.expected for c in planted} == {"VM", "FM", "BM", "NM"}
    by = {c.name: c for c in planted}
    for c in planted:
        for a in (c.generation, c.training):
            assert a.dtype == np.uint8 and a.shape == (192, 192, 3)
        for m in (c.generation_mask, c.training_mask):
            assert m.dtype == np.float32 and set(np.unique(m)) <= {0.0, 1.0}
        if not c.name.startswith("empty"):
            assert 0.25 <= c.training_mask.mean() <= 0.45 and 0.25 <= c.generation_mask.mean() <= 0.45
        else:
            assert not c.generation_mask.any() and not c.training_mask.any()
    fm = by["fm-new-background"]
    inside = fm.training_mask == 1
    np.testing.assert_array_equal(fm.generation_mask, fm.training_mask)
    np.testing.assert_array_equal(fm.generation[inside], fm.training[inside])
    assert (fm.generation[~inside] != fm.training[~inside]).any(axis=-1).mean() > 0.9
    same = by["bm-same-mask"]
    np.testing.assert_array_equal(same.generation_mask, same.training_mask)
    inside = same.training_mask == 1
    np.testing.assert_array_equal(same.generation[~inside], same.training[~inside])
    assert (same.generation[inside] != same.training[inside]).any(axis=-1).mean() > 0.9
    bm = by["bm-new-object"]
    union = (bm.generation_mask == 1) | (bm.training_mask == 1)
    np.testing.assert_array_equal(bm.generation[~union], bm.training[~union])
    assert not np.array_equal(bm.generation_mask, bm.training_mask)
    vm = by["vm-noisy-jpeg"]
    diff = np.abs(vm.generation.astype(int) - vm.training.astype(int))
    assert 0 < diff.mean() < 8  # degraded, but only mildly


def test_planted_set_is_deterministic(planted) -> None:
    again = planted_test_set(192, seed=0)
    for a, b in zip(planted, again):
        assert _sha(a.generation) == _sha(b.generation) and _sha(a.training) == _sha(b.training)
    other = planted_test_set(192, seed=1)
    assert _sha(other[0].training) != _sha(planted[0].training)


def _label(full: float, fg: float, bg: float, tau: float = 0.8) -> str:
    """SPEC section 2's pair rule, written out so the expectation is explicit."""
    if full >= tau or (fg >= tau and bg >= tau):
        return "VM"
    if fg >= tau:
        return "FM"
    if bg >= tau:
        return "BM"
    return "NM"


def test_planted_pairs_get_their_label_under_the_region_metric(planted) -> None:
    import torch

    from fbmem.jobs.core.region_similarity import prepare_batch, score_pairs

    torch.set_num_threads(1)
    gx, gm = prepare_batch([c.generation for c in planted], [c.generation_mask for c in planted], 192)
    tx, tm = prepare_batch([c.training for c in planted], [c.training_mask for c in planted], 192)
    s = score_pairs(gx, gm, tx, tm, metric="region", beta=0.03)
    margin = 0.05  # each deciding score sits clearly on its side of tau
    for i, c in enumerate(planted):
        full, fg, bg = (float(s[k][i]) for k in ("full", "fg", "bg"))
        assert _label(full, fg, bg) == c.expected, (c.name, full, fg, bg)
        if c.expected == "FM":
            assert fg > 0.8 + margin and full < 0.8 - margin and bg < 0.8 - margin, (c.name, full, fg, bg)
        if c.expected == "BM":
            assert bg > 0.8 + margin and fg < 0.8 - margin and full < 0.8 - margin, (c.name, full, fg, bg)
        if c.expected == "NM":
            assert max(full, fg, bg) < 0.8 - margin, (c.name, full, fg, bg)
        if c.expected == "VM":
            assert full > 0.8 + margin, (c.name, full, fg, bg)
