"""`fbmem report`: one static HTML page that sums up a database, readable offline.

Why static files: the report is what people mail around or open on a cluster's shared disk, often
without network; so every chart and image is a PNG beside `index.html`, referenced by a relative
path, the CSS is inline and the only script is a few lines that count loaded images (a headless
browser can then check the page with `--dump-dom`). All numbers come from DuckDB SQL over the
tables, every one a named query of the repository's `sql/` folder, so the page and `fbmem sql NAME`
never disagree. Each section is built on its own: an empty table gives a "no data yet" note and
a failing section shows its error without taking the rest of the report down.
"""
from __future__ import annotations

import html
import json
import logging
import math
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from matplotlib.figure import Figure
from PIL import Image, ImageDraw

from fbmem.jobs.core.label_rule import LABELS
from fbmem.storage.database import Database
from fbmem.storage.keys import sql_list, sql_literal
from fbmem.storage.masks import training_masks_for
from fbmem.storage.schema import TABLES
from fbmem.storage.sql import named_sql_dir, run_named_query

log = logging.getLogger(__name__)

LABEL_COLOURS = {"VM": "#c0392b", "FM": "#e67e22", "BM": "#2e86c1", "NM": "#95a5a6"}
THUMB = 192  # gallery panel side in pixels
MAX_PIXELS = 100_000_000  # refuse decompression bombs in the gallery
GENERATED_PREFIXES = ("chart-", "gallery-")  # files this module owns inside out/img
REQUIRED_QUERIES = (  # sql/NAME.sql, one per table or chart of the page
    "recent_runs", "errors_summary", "label_distribution", "label_shares_by_group", "one_to_many",
    "mitigation_score", "mitigation_quality", "nemo_by_prompt", "nemo_by_group", "neuron_sets_by_layer",
    "strongest_cases",
)

# ------------------------------------------------------------------------------ SQL


def sql_dir(path: Path | None = None) -> Path:
    """The folder of named queries: `path`, else the installed `fbmem.sql` package data (the
    repository's top-level `sql/`)."""
    path = Path(path) if path is not None else named_sql_dir()
    missing = [n for n in REQUIRED_QUERIES if not (path / f"{n}.sql").is_file()]
    if missing:
        raise FileNotFoundError(
            f"the named SQL queries are missing: expected {', '.join(n + '.sql' for n in missing)} in {path} "
            "(the repository's sql/ folder). Install fbmem from a checkout (pip install -e .) or pass its sql folder."
        )
    return path


def named_query(db: Database, folder: Path, name: str, **params: object) -> list[dict]:
    """Rows of `folder/<name>.sql` with its `-- param` defaults, overridden by `params`."""
    table = run_named_query(db, name, params, folder=folder)
    return [] if table is None else table.to_pylist()


# ------------------------------------------------------------------------------ HTML helpers


def esc(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def fmt(value: object) -> str:
    """Cell text: floats to 4 significant digits, None as an empty cell."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}"
    return str(value)


def short(text: object, n: int = 60) -> str:
    s = "" if text is None else str(text)
    return s if len(s) <= n else s[: n - 1] + "\u2026"


def table_html(rows: Sequence[dict], columns: Sequence[str] | None = None, *, limit: int = 50,
               wide: Sequence[str] = ("prompt", "message", "most_common_reason", "example_source", "reason")) -> str:
    """An escaped HTML table; long text is shortened (full text in the title attribute)."""
    if not rows:
        return NO_DATA
    cols = list(columns or rows[0].keys())
    head = "".join(f"<th>{esc(c)}</th>" for c in cols)
    body = []
    for r in rows[:limit]:
        cells = []
        for c in cols:
            v = r.get(c)
            text = fmt(v)
            if c in wide and len(text) > 70:
                cells.append(f'<td title="{esc(text)}">{esc(short(text, 70))}</td>')
            else:
                num = isinstance(v, (int, float)) and not isinstance(v, bool)
                cells.append(f'<td class="num">{esc(text)}</td>' if num else f"<td>{esc(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    more = f'<p class="note">showing {limit} of {len(rows)} rows</p>' if len(rows) > limit else ""
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>{more}'


NO_DATA = '<p class="empty">no data yet</p>'


def img_html(rel: str, alt: str, cls: str = "chart") -> str:
    return f'<img class="{cls}" src="{esc(rel)}" alt="{esc(alt)}">'


def mpl_text(text: object) -> str:
    """Matplotlib treats $...$ as math: escape it so prompts render literally."""
    return str(text).replace("$", r"\$")


# ------------------------------------------------------------------------------ files


@dataclass
class Assets:
    """PNG files beside the page; returns paths relative to index.html."""

    out_dir: Path

    @property
    def img_dir(self) -> Path:
        return self.out_dir / "img"

    def clear(self) -> None:
        """Drop the files an earlier report wrote, so a rerun shows no stale charts."""
        if self.img_dir.is_dir():
            for f in self.img_dir.iterdir():
                if f.is_file() and f.name.startswith(GENERATED_PREFIXES) and f.suffix == ".png":
                    f.unlink()
        self.img_dir.mkdir(parents=True, exist_ok=True)

    def figure(self, fig: Figure, name: str) -> str:
        fig.savefig(self.img_dir / name, format="png", dpi=100, bbox_inches="tight")
        return f"img/{name}"

    def image(self, img: Image.Image, name: str) -> str:
        img.save(self.img_dir / name, format="PNG")
        return f"img/{name}"


# ------------------------------------------------------------------------------ charts


def label_distribution_chart(rows: Sequence[dict]) -> Figure:
    """100%-stacked horizontal bars: one bar per mitigation, segments = label shares."""
    methods = sorted({r["mitigation"] or "(none)" for r in rows}, key=lambda m: (m != "none", m))
    counts = {(r["mitigation"] or "(none)", r["label"]): int(r["generations"]) for r in rows}
    fig = Figure(figsize=(8, 0.6 * len(methods) + 1.4))
    ax = fig.add_subplot()
    y = np.arange(len(methods))
    left = np.zeros(len(methods))
    totals = np.array([sum(counts.get((m, lab), 0) for lab in LABELS) for m in methods], float)
    for lab in LABELS:
        n = np.array([counts.get((m, lab), 0) for m in methods], float)
        share = np.divide(n, totals, out=np.zeros_like(n), where=totals > 0)
        ax.barh(y, share, left=left, color=LABEL_COLOURS[lab], label=lab)
        for yi, (s, c, lft) in enumerate(zip(share, n, left)):
            if s >= 0.06:
                ax.text(lft + s / 2, yi, f"{int(c)}", ha="center", va="center", color="white", fontsize=9)
        left += share
    ax.set_yticks(y, [mpl_text(m) for m in methods])
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of generations (bar text: count)")
    ax.invert_yaxis()
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title("FB-Mem labels per mitigation")
    return fig


def one_to_many_chart(rows: Sequence[dict]) -> Figure:
    """Per prompt: distinct matched training images, stacked by label class."""
    fig = Figure(figsize=(8, 0.28 * len(rows) + 1.5))
    ax = fig.add_subplot()
    y = np.arange(len(rows))
    left = np.zeros(len(rows))
    for lab in LABELS[:-1]:  # the memorized classes (NM is last)
        n = np.array([r[f"distinct_{lab.lower()}_images"] or 0 for r in rows], float)
        ax.barh(y, n, left=left, color=LABEL_COLOURS[lab], label=lab)
        left += n
    labels = [mpl_text(short(r["prompt"] or r["prompt_id"], 45)) for r in rows]
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("distinct training images matched by the prompt's generations")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title("One-to-many correspondence (unmitigated generations)")
    return fig


def transition_heatmap(row: dict) -> Figure:
    """Before (rows) x after (columns) counts, labels most severe first (label_rule.LABELS)."""
    counts = np.array([[row[f"{b.lower()}_to_{a.lower()}"] or 0 for a in LABELS] for b in LABELS], float)
    fig = Figure(figsize=(4.2, 3.8))
    ax = fig.add_subplot()
    im = ax.imshow(counts, cmap="Blues", vmin=0, vmax=max(1.0, counts.max()))
    for i in range(len(LABELS)):
        for j in range(len(LABELS)):
            dark = counts[i, j] > 0.6 * max(1.0, counts.max())
            ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", color="white" if dark else "black")
    ax.set_xticks(range(len(LABELS)), LABELS)
    ax.set_yticks(range(len(LABELS)), LABELS)
    ax.set_xlabel("after")
    ax.set_ylabel("before")
    score = row.get("mitigation_score")
    ax.set_title(f"{mpl_text(method_label(row))}: score {fmt(score)} ({row['pairs']} pairs)")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return fig


def method_label(row: dict) -> str:
    """`nemo-c` or `nemo-c alpha=0.25`: a sweep has one heatmap per (method, alpha)."""
    alpha = row.get("alpha")
    return str(row["method"]) if alpha is None else f"{row['method']} alpha={alpha:g}"


# The quality costs the trade-off chart can put on its x axis: (wide-row column, axis label).
TRADEOFF_COSTS = (
    ("clip_drop", "CLIP score drop (before - after; right = prompt alignment lost)"),
    ("fd_clip", "Frechet distance, before vs after (CLIP image features)"),
)


def tradeoff_chart(rows: Sequence[dict]) -> Figure:
    """Mitigation score (y) against quality cost (x), one point per alpha and a line per method,
    one panel per cost of TRADEOFF_COSTS that has values: the curve a user picks an alpha from
    (up = more memorization removed, right = more quality lost)."""
    costs = [(c, label) for c, label in TRADEOFF_COSTS if any(r.get(c) is not None for r in rows)]
    fig = Figure(figsize=(5.2 * max(1, len(costs)), 4.2))
    methods = sorted({r["method"] for r in rows})
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    for k, (col, label) in enumerate(costs):
        ax = fig.add_subplot(1, len(costs), k + 1)
        for i, m in enumerate(methods):
            pts = sorted((r for r in rows if r["method"] == m and r.get(col) is not None
                          and r.get("mitigation_score") is not None),
                         key=lambda r: (r["alpha"] is None, r["alpha"] or 0.0))
            if not pts:
                continue
            xs, ys = [r[col] for r in pts], [r["mitigation_score"] for r in pts]
            ax.plot(xs, ys, marker="o", color=colours[i % len(colours)], label=mpl_text(m))
            for r, x, y in zip(pts, xs, ys):
                text = "alpha ?" if r["alpha"] is None else f"alpha={r['alpha']:g}"
                ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.axhline(0, color="#999", linewidth=0.8)
        ax.margins(x=0.18, y=0.12)  # room for the alpha labels at the ends of the curves
        ax.set_xlabel(label, fontsize=9)
        if k == 0:
            ax.set_ylabel("mitigation score (up = less memorization)")
        ax.legend(fontsize=8, loc="best")
        ax.grid(alpha=0.3)
    fig.suptitle("Mitigation score against quality cost, per alpha")
    return fig


def detector_groups_of(rows: Sequence[dict]) -> list[tuple[str, str]]:
    """(prompt_id, group) for detector_agreement.sql rows: the planted group, else mem_type, else none."""
    return [(r["prompt_id"], r.get("planted") or r.get("mem_type") or "(none)") for r in rows]


def detector_auc(rows: Sequence[dict], method: str) -> tuple[float, int]:
    """AUC of `method`'s score for VM against NM prompts (the toy world's planted groups), or for
    prompts of the reference set's memorized mem_type VM against prompts with none; NaN when one
    side is empty. Also how many prompts it was computed over."""
    from sklearn.metrics import roc_auc_score

    planted = any(r.get("planted") for r in rows)
    pos, neg = [], []
    for r in rows:
        score = r.get(f"{method}_score")
        if score is None:
            continue
        group = r.get("planted") if planted else (r.get("mem_type") or "NM")
        if group == "VM":
            pos.append(score)
        elif group == "NM":
            neg.append(score)
    if not pos or not neg:
        return float("nan"), len(pos) + len(neg)
    return float(roc_auc_score([1] * len(pos) + [0] * len(neg), pos + neg)), len(pos) + len(neg)


def detector_chart(panels: Sequence[tuple[str, str, Sequence[dict]]]) -> Figure:
    """Each detector variant's scores per prompt group (one panel per (label, method, rows) of
    detector_agreement.sql), with its AUC VM vs NM."""
    fig = Figure(figsize=(4.6 * max(1, len(panels)), 3.8))
    colours = {**LABEL_COLOURS, "(none)": "#34495e"}
    for k, (label, m, rows) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        grouped = detector_groups_of(rows)
        groups = sorted({g for _, g in grouped}, key=lambda g: (LABELS.index(g) if g in LABELS else 9, g))
        for i, g in enumerate(groups):
            ys = [r[f"{m}_score"] for r, (_, gg) in zip(rows, grouped) if gg == g and r.get(f"{m}_score") is not None]
            xs = [i + 0.08 * ((j % 5) - 2) for j in range(len(ys))]  # a little spread, deterministic
            ax.scatter(xs, ys, s=20, color=colours.get(g, "#7f8c8d"))
        ax.set_xticks(range(len(groups)), [mpl_text(g) for g in groups])
        auc, n = detector_auc(rows, m)
        ax.set_title(mpl_text(f"{label}: AUC VM vs NM {auc:.3f} ({n})"), fontsize=9)
        ax.set_ylabel("NeMo: max_i m_i" if m == "nemo" else "Wen: ||eps(c_p) - eps(c_0)||")
        ax.grid(alpha=0.3)
    fig.suptitle("Memorization detectors per prompt group")
    return fig


def nemo_chart(rows: Sequence[dict], threshold: float) -> Figure:
    """Detection score per prompt, sorted, coloured by planted group when known."""
    rows = [r for r in rows if r["detect_score"] is not None]
    rows = sorted(rows, key=lambda r: -r["detect_score"])
    fig = Figure(figsize=(8, 3.6))
    ax = fig.add_subplot()
    groups = sorted({r["planted"] or "(unknown)" for r in rows})
    colours = {**LABEL_COLOURS, "(unknown)": "#34495e"}
    for g in groups:
        xs = [i for i, r in enumerate(rows) if (r["planted"] or "(unknown)") == g]
        ys = [rows[i]["detect_score"] for i in xs]
        ax.scatter(xs, ys, s=22, color=colours.get(g), label=mpl_text(g))
    ax.axhline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
    ax.set_xlabel("prompts, by detection score")
    ax.set_ylabel("max_i m_i (detection score)")
    ax.set_ylim(min(0.0, *(r["detect_score"] for r in rows)) if rows else 0, 1.02)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title("NeMo memorization detection")
    return fig


# ------------------------------------------------------------------------------ gallery images


def _decode(row: dict | None) -> Image.Image:
    from fbmem.pipelines.images import decode_image, read_uri

    if row is None:
        raise ValueError("row not found")
    data = row.get("image_bytes")
    if data is None:
        src = row.get("source_uri")
        if not src or ("://" in src and not src.startswith("file://")):
            raise ValueError(f"no stored pixels (source {src!r} not read for an offline report)")
        data = read_uri(src, timeout_s=10.0)
    return decode_image(data, max_pixels=MAX_PIXELS, min_side=1)


def _mask(row: dict | None) -> np.ndarray | None:
    from fbmem.pipelines.masks import decode_mask_png

    if row is None or row.get("mask_png") is None:
        return None
    return decode_mask_png(row["mask_png"])


def thumbnail(img: Image.Image, side: int = THUMB) -> Image.Image:
    out = img.copy()
    out.thumbnail((side, side), Image.Resampling.LANCZOS)
    return out


def placeholder(text: str, side: int = THUMB) -> Image.Image:
    """Stands in for an image the database cannot provide (the caption says why)."""
    img = Image.new("RGB", (side, side), (235, 235, 235))
    draw = ImageDraw.Draw(img)
    draw.line([(0, 0), (side - 1, side - 1)], fill=(200, 200, 200))
    draw.line([(0, side - 1), (side - 1, 0)], fill=(200, 200, 200))
    draw.text((8, side // 2 - 6), short(text, 28), fill=(90, 90, 90))
    return img


def mask_overlay(gen_mask: np.ndarray | None, train_mask: np.ndarray | None, side: int = THUMB) -> Image.Image:
    """Both masks on one S x S square (the frame scoring compares): red = generation only,
    blue = training only, white = both. A missing mask counts as no foreground."""

    def square(m: np.ndarray | None) -> np.ndarray:
        if m is None:
            return np.zeros((side, side), np.float32)
        im = Image.fromarray(np.rint(np.clip(m, 0, 1) * 255).astype(np.uint8), mode="L")
        return np.asarray(im.resize((side, side), Image.Resampling.BILINEAR), np.float32) / 255.0

    g, t = square(gen_mask), square(train_mask)
    rgb = np.stack([g, np.minimum(g, t), t], axis=-1)
    return Image.fromarray(np.rint(rgb * 255).astype(np.uint8), mode="RGB")


# ------------------------------------------------------------------------------ sections


@dataclass
class Section:
    key: str
    title: str
    body: str


@dataclass
class Context:
    db: Database
    sql: Path
    assets: Assets
    rule: str
    gallery_per_label: int
    max_prompts: int
    nemo_threshold: float
    scan_id: str | None = None


def section_runs(ctx: Context) -> str:
    counts = [{"table": t, "rows": ctx.db.count(t)} for t in TABLES]
    runs = named_query(ctx.db, ctx.sql, "recent_runs", limit=50)
    n_runs = ctx.db.count("runs")
    errors = named_query(ctx.db, ctx.sql, "errors_summary")
    return (
        "<h3>Tables</h3>" + table_html(counts)
        + f"<h3>Runs (latest first, {len(runs)} of {n_runs})</h3>" + table_html(runs, limit=50)
        + "<h3>Errors</h3>" + (table_html(errors) if errors else '<p class="empty">no error rows</p>')
    )


def section_labels(ctx: Context) -> str:
    dist = named_query(ctx.db, ctx.sql, "label_distribution", rule=ctx.rule)
    if not dist:
        return NO_DATA
    dist.sort(key=lambda r: (r["mitigation"] != "none", str(r["mitigation"])))  # stable: label order kept
    groups = named_query(ctx.db, ctx.sql, "label_shares_by_group", rule=ctx.rule)
    return "".join([
        img_html(ctx.assets.figure(label_distribution_chart(dist), "chart-labels.png"), "label distribution per mitigation"),
        table_html(dist),
        "<h3>Per planted group</h3>",
        table_html(groups) if groups else '<p class="empty">no planted groups (the prompts carry no `planted` column values)</p>',
    ])


def section_one_to_many(ctx: Context) -> str:
    rows = named_query(ctx.db, ctx.sql, "one_to_many", rule=ctx.rule, mitigation="none")
    if not rows:
        return NO_DATA
    shown = rows[: ctx.max_prompts]
    note = f'<p class="note">top {len(shown)} of {len(rows)} prompts by distinct memorized images</p>' if len(rows) > len(shown) else ""
    chart = img_html(ctx.assets.figure(one_to_many_chart(shown), "chart-one-to-many.png"), "one-to-many per prompt")
    cols = ["prompt", "planted", "generations", "distinct_vm_images", "distinct_fm_images", "distinct_bm_images",
            "distinct_memorized_images"]
    return chart + note + table_html(rows, cols, limit=ctx.max_prompts)


def section_mitigation(ctx: Context) -> str:
    rows = named_query(ctx.db, ctx.sql, "mitigation_score", rule=ctx.rule)
    overall, per_cluster = split_mitigation_rows(rows)
    if not overall:
        return ('<p class="empty">no mitigated generations yet: run `fbmem mitigate` to generate the same '
                "(prompt, seed, sample) with neurons deactivated and label them.</p>")
    charts = []
    for i, r in enumerate(overall):
        rel = ctx.assets.figure(transition_heatmap(r), f"chart-mitigation-{i:02d}.png")
        charts.append(img_html(rel, f"label transitions for {method_label(r)}", cls="chart small"))
    cols = ["method", "alpha", "pairs", "mitigation_score", "vm_before", "vm_after"]
    out = ('<p class="note">rows: label before mitigation, columns: after (most severe first); '
           "the score is the mean transition weight (positive = less memorization).</p>"
           + '<div class="row">' + "".join(charts) + "</div>" + table_html(overall, cols))
    if per_cluster:
        out += "<h3>Per prompt cluster</h3>" + table_html(per_cluster, ["method", "alpha", "cluster_id"] + cols[2:])
    return out


def _alpha_key(alpha: object) -> float | None:
    """alpha as stored (float32) for joining rows of two queries."""
    return None if alpha is None else float(np.float32(alpha))


def quality_rows_wide(quality: Sequence[dict], scores: Sequence[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """sql/mitigation_quality.sql's rows (one per metric) as one row per (method, alpha, level,
    cluster), with sql/mitigation_score.sql's score and pairs joined on the same key.

    Returns (overall rows, per-cluster rows, skipped metrics as {method, alpha, metric, note}).
    Per-image metrics give <metric>_before / _after / _delta (clip_score: clip_before, clip_after,
    clip_delta and clip_drop = before - after), set distances their value (kid_clip also kid_std).
    """
    score_by = {(r["method"], _alpha_key(r["alpha"]), r["level"], r["cluster_id"]): r for r in scores}
    wide: dict[tuple, dict] = {}
    skipped: list[dict] = []
    for q in quality:
        key = (q["method"], _alpha_key(q["alpha"]), q["level"], q["cluster_id"])
        note = q.get("note")
        if note and str(note).startswith("skipped"):
            skipped.append({"method": q["method"], "alpha": q["alpha"], "metric": q["metric"], "note": note})
            continue
        row = wide.get(key)
        if row is None:
            s = score_by.get(key, {})
            row = wide[key] = {"method": q["method"], "alpha": q["alpha"], "level": q["level"],
                               "cluster_id": q["cluster_id"], "mitigation_score": s.get("mitigation_score"),
                               "score_pairs": s.get("pairs"), "quality_pairs": q["n_pairs"], "notes": None}
        m = q["metric"]
        if m == "clip_score":
            drop = None if q["value"] is None else -q["value"]
            row.update(clip_before=q["before"], clip_after=q["after"], clip_delta=q["value"], clip_drop=drop)
        elif m in ("fd_clip", "kid_clip"):
            row[m] = q["value"]
            if m == "kid_clip":
                row["kid_std"] = q["value_std"]
        else:
            row.update({f"{m}_before": q["before"], f"{m}_after": q["after"], f"{m}_delta": q["value"]})
        row["quality_pairs"] = max(row["quality_pairs"] or 0, q["n_pairs"] or 0)
        if note:
            row["notes"] = f"{row['notes']}; {m}: {note}" if row["notes"] else f"{m}: {note}"
    rows = list(wide.values())
    return ([r for r in rows if r["level"] == "overall"], [r for r in rows if r["level"] != "overall"], skipped)


def _quality_columns(rows: Sequence[dict], first: Sequence[str]) -> list[str]:
    """The columns of the quality table that hold a value in some row, in a stable order."""
    seen = {k for r in rows for k, v in r.items() if v is not None}
    fixed = ["mitigation_score", "score_pairs", "quality_pairs", "clip_before", "clip_after", "clip_delta",
             "fd_clip", "kid_clip", "kid_std"]
    extra = sorted(k for k in seen if k.endswith(("_before", "_after", "_delta")) and k not in fixed)
    return [*first, *(c for c in fixed + extra if c in seen), *(["notes"] if "notes" in seen else [])]


def section_quality(ctx: Context) -> str:
    quality = named_query(ctx.db, ctx.sql, "mitigation_quality")
    if not quality:
        return ('<p class="empty">no quality measured yet: `fbmem mitigate` measures it after each alpha '
                "(CLIP score before/after and Frechet distance / KID between the before and after images).</p>")
    scores = named_query(ctx.db, ctx.sql, "mitigation_score", rule=ctx.rule)
    overall, per_cluster, skipped = quality_rows_wide(quality, scores)
    out = ('<p class="note">Beside the mitigation score, what the after images lost: clip_* is the prompt-image '
           "cosine (configured CLIP) of the before and after images (delta = after - before); fd_clip and kid_clip "
           "are the Frechet distance and KID between the before and the after set of CLIP image embeddings "
           "(0 = unchanged; both grow with the set's shift, and are biased by the set size, so compare alphas "
           "on the same pairs).</p>")
    plotted = [r for r in overall if r["mitigation_score"] is not None
               and any(r.get(c) is not None for c, _ in TRADEOFF_COSTS)]
    if plotted:
        rel = ctx.assets.figure(tradeoff_chart(plotted), "chart-quality-tradeoff.png")
        out += img_html(rel, "mitigation score against quality cost per alpha")
    out += table_html(overall, _quality_columns(overall, ["method", "alpha"]))
    if skipped:
        out += "<h3>Metrics not computed</h3>" + table_html(skipped, ["method", "alpha", "metric", "note"])
    if per_cluster:
        out += "<h3>Per prompt cluster</h3>" + table_html(
            per_cluster, _quality_columns(per_cluster, ["method", "alpha", "cluster_id"]), limit=200)
    return out


def split_mitigation_rows(rows: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """(overall row per method, per-cluster rows) of sql/mitigation_score.sql (its `level`).

    Per-cluster rows are only worth showing when some prompt has a cluster.
    """
    overall = [r for r in rows if r["level"] == "overall"]
    rest = [r for r in rows if r["level"] != "overall"]
    clustered = any(r["cluster_id"] is not None for r in rest)
    return overall, rest if clustered else []


def section_nemo(ctx: Context) -> str:
    rows = named_query(ctx.db, ctx.sql, "nemo_by_prompt")
    if not rows:
        return NO_DATA
    n = len(rows)
    memorized = sum(bool(r["memorized"]) for r in rows)
    reached = sum(bool(r["criterion_reached"]) for r in rows)
    summary = (f"<p>{n} prompt runs; {memorized} detected as memorized; "
               f"mitigation criterion reached for {reached}.</p>")
    chart = img_html(ctx.assets.figure(nemo_chart(rows, ctx.nemo_threshold), "chart-nemo.png"), "NeMo detection scores")
    out = summary + chart
    if any(r["planted"] is not None for r in rows):
        out += "<h3>Per planted group</h3>" + table_html(named_query(ctx.db, ctx.sql, "nemo_by_group"))
    cols = ["prompt", "planted", "detect_score", "n_retained", "memorized", "criterion_reached", "n_initial",
            "n_refined", "initial_score", "refined_score", "unet_calls", "message"]
    out += "<h3>Per prompt</h3>" + table_html(rows, cols, limit=ctx.max_prompts)
    neurons = named_query(ctx.db, ctx.sql, "neuron_sets_by_layer")
    out += "<h3>Neuron sets per layer</h3>" + (table_html(neurons) if neurons else NO_DATA)
    return out


def detector_variants(db: Database) -> list[tuple[str, str, str]]:
    """(label, method, settings_hash) of every detector setting in `detections`, NeMo first,
    then by when it was first run: `wen (50 steps, 4 seeds)`, `wen (1 steps, 1 seeds)`, ..."""
    if not db.has_table("detections"):
        return []
    rows = db.read("detections", ["method", "settings_hash", "settings_json", "created_at"]).to_pylist()
    first: dict[tuple[str, str], tuple] = {}
    for r in rows:
        key = (r["method"], r["settings_hash"])
        if key not in first or r["created_at"] < first[key][0]:
            first[key] = (r["created_at"], r["settings_json"])
    out = []
    for (method, h), (_, settings) in sorted(first.items(), key=lambda kv: (kv[0][0] != "nemo", kv[0][0], kv[1][0])):
        label = method
        if method == "wen" and settings:
            st = json.loads(settings)
            label = f"wen ({st.get('steps')} steps, {st.get('seeds')} seeds)"
        out.append((label, method, h))
    return out


def section_detectors(ctx: Context) -> str:
    variants = detector_variants(ctx.db)
    if not variants:
        return ('<p class="empty">no detector scores yet: `fbmem detect --method nemo|wen` (a scan runs both).</p>')
    out = ('<p class="note">NeMo\'s detector (SPEC 6: how alike the noise differences of several latents '
           "are at the first step) beside Wen et al.'s (ICLR 2024: the magnitude of the text-conditional noise "
           "prediction over the first steps and seeds, no image needed), one panel per setting run. Cost: UNet "
           "evaluations of one latent row and actor seconds per prompt, as measured when the scores were "
           "computed.</p>")
    panels, summary = [], []
    for label, m, h in variants:
        rows = named_query(ctx.db, ctx.sql, "detector_agreement", **{f"{m}_settings": h})
        scored = [r for r in rows if r.get(f"{m}_score") is not None]
        if not scored:
            continue
        panels.append((label, m, rows))
        auc, n = detector_auc(rows, m)
        summary.append({"detector": label, "settings_hash": h, "prompts": len(scored), "auc_vm_vs_nm": auc,
                        "auc_prompts": n,
                        "unet_evals_per_prompt": sum(r.get(f"{m}_unet_calls") or 0 for r in scored) / len(scored),
                        "seconds_per_prompt": sum(r.get(f"{m}_seconds") or 0.0 for r in scored) / len(scored)})
    out += img_html(ctx.assets.figure(detector_chart(panels), "chart-detectors.png"), "detector scores per group")
    out += table_html(summary)
    groups = named_query(ctx.db, ctx.sql, "detector_groups")
    out += "<h3>Per prompt group (latest setting of each method)</h3>" + table_html(groups)
    out += "<h3>Per prompt (latest setting of each method)</h3>" + table_html(
        named_query(ctx.db, ctx.sql, "detector_agreement"), limit=ctx.max_prompts)
    return out


def _scan_to_show(ctx: Context) -> str | None:
    if ctx.scan_id:
        return ctx.scan_id
    if not ctx.db.has_table("scans"):
        return None
    rows = ctx.db.read("scans", ["scan_id", "started_at"]).to_pylist()
    return max(rows, key=lambda r: r["started_at"])["scan_id"] if rows else None


def section_scan(ctx: Context) -> str:
    scan_id = _scan_to_show(ctx)
    if scan_id is None:
        return '<p class="empty">not written by a scan (`fbmem scan SPEC --db DB` runs every stage).</p>'
    scan = ctx.db.read("scans", where=f"scan_id = {sql_literal(scan_id)}").to_pylist()[0]
    stages = sorted(ctx.db.read("scan_stages", where=f"scan_id = {sql_literal(scan_id)}").to_pylist(),
                    key=lambda r: r["ordinal"])
    rows = [{"stage": r["stage"], "status": r["status"], "seconds": r["seconds"], "attempts": len(r["run_ids"] or []),
             "counts": (r["counts_json"] or "")[:240], "error": r["message"]} for r in stages]
    out = (f"<p>Scan <code>{esc(scan_id)}</code> of spec <code>{esc(scan['name'])}</code>, model "
           f"<code>{esc(scan['model_id'])}</code>: started {esc(fmt(scan['started_at']))}, "
           f"{esc(scan['attempts'])} attempt(s).</p>")
    out += "<h3>Stages</h3>" + table_html(rows)
    prev = [r for r in ctx.db.read("scans", ["scan_id", "name", "status", "started_at"]).to_pylist()
            if r["name"] == scan["name"] and r["status"] == "done" and r["scan_id"] != scan_id
            and r["started_at"] < scan["started_at"]]
    if not prev:
        return out + '<p class="empty">no earlier finished scan of this spec to compare with.</p>'
    a = max(prev, key=lambda r: r["started_at"])["scan_id"]
    diff = named_query(ctx.db, ctx.sql, "scan_diff", a=a, b=scan_id)
    counts: dict[str, int] = {}
    for d in diff:
        counts[d["change"]] = counts.get(d["change"], 0) + 1
    out += (f"<h3>What changed since {esc(a)}</h3><p>{esc(json.dumps(counts) if counts else 'nothing')} "
            f"(<code>fbmem sql scan_diff --param a={esc(a)} --param b={esc(scan_id)}</code>)</p>")
    return out + (table_html(diff, limit=100) if diff else "")


def section_gallery(ctx: Context) -> str:
    cases = named_query(ctx.db, ctx.sql, "strongest_cases", rule=ctx.rule, per_label=ctx.gallery_per_label)
    if not cases:
        return NO_DATA
    cols = ["image_bytes", "source_uri", "mask_png"]
    gens = _by_key(ctx.db, "generations", "generation_id", cols, {c["generation_id"] for c in cases})
    imgs = _by_key(ctx.db, "training_images", "image_id", cols[:-1], {c["best_image_id"] for c in cases})
    masks = training_masks_for(ctx.db, imgs)  # own row's mask, else training_masks (storage/masks.py)
    for image_id, row in imgs.items():
        row["mask_png"] = masks[image_id][0] if image_id in masks else None
    cards = []
    for i, c in enumerate(cases):
        panels, problems = [], []
        g_row, t_row = gens.get(c["generation_id"]), imgs.get(c["best_image_id"])
        for role, row in (("generation", g_row), ("training", t_row)):
            try:
                img = thumbnail(_decode(row))
            except Exception as exc:  # noqa: BLE001 - one unreadable image must not sink the page
                problems.append(f"{role} image: {exc}")
                img = placeholder(f"{role} unavailable")
            panels.append((role, ctx.assets.image(img, f"gallery-{i:03d}-{role[:3]}.png")))
        try:
            gm, tm = _mask(g_row), _mask(t_row)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"mask: {exc}")
            gm = tm = None
        missing = [r for r, m in (("generation", gm), ("training", tm)) if m is None]
        panels.append(("masks", ctx.assets.image(mask_overlay(gm, tm), f"gallery-{i:03d}-mask.png")))
        cards.append(_card(c, panels, problems, missing))
    legend = ('<p class="note">Each row: generation | best-matching training image | foreground masks on the '
              "compared square frame (red: generation only, blue: training only, white: both).</p>")
    return legend + '<div class="gallery">' + "".join(cards) + "</div>"


def _by_key(db: Database, table: str, key: str, cols: list[str], ids: set[str]) -> dict[str, dict]:
    ids = {i for i in ids if i is not None}
    if not ids:
        return {}
    rows = db.read(table, [key, *cols], where=f"{key} IN ({sql_list(sorted(ids))})").to_pylist()
    return {r[key]: r for r in rows}


def _card(c: dict, panels: list[tuple[str, str]], problems: list[str], missing_masks: list[str]) -> str:
    lab = c["label"]
    gid = str(c["generation_id"])[:12]
    figs = "".join(
        f"<figure>{img_html(rel, role + ' for ' + gid, cls='thumb')}<figcaption>{esc(role)}</figcaption></figure>"
        for role, rel in panels
    )
    scores = " ".join(f"{k} <b>{esc(fmt(c[k]))}</b>" for k in ("full", "fg", "bg"))
    notes = "".join(f'<p class="warn">{esc(p)}</p>' for p in problems)
    if missing_masks:
        notes += f'<p class="note">no stored mask for: {esc(", ".join(missing_masks))}</p>'
    return (
        f'<div class="card" data-label="{esc(lab)}">'
        f'<div class="cardhead"><span class="badge" style="background:{LABEL_COLOURS.get(lab, "#555")}">{esc(lab)}</span> '
        f"{scores} <span class=\"note\">mitigation {esc(c['mitigation'])}, seed {esc(c['seed'])}, sample {esc(c['sample'])}, "
        f"{esc(c['region_metric'])}</span></div>"
        f'<div class="prompt" title="{esc(c["prompt"])}">{esc(short(c["prompt"], 160))}</div>'
        f'<div class="triplet">{figs}</div>{notes}</div>'
    )


SECTIONS: tuple[tuple[str, str, Callable[[Context], str]], ...] = (
    ("scan", "Scan", section_scan),
    ("runs", "Run summary", section_runs),
    ("labels", "FB-Mem label distribution", section_labels),
    ("one-to-many", "One-to-many correspondence", section_one_to_many),
    ("mitigation", "Mitigation", section_mitigation),
    ("quality", "Quality cost of mitigation", section_quality),
    ("nemo", "NeMo detection and neurons", section_nemo),
    ("detectors", "Detectors: NeMo and Wen et al.", section_detectors),
    ("gallery", "Strongest cases", section_gallery),
)


def build_section(ctx: Context, key: str, title: str, fn: Callable[[Context], str]) -> Section:
    try:
        body = fn(ctx)
    except Exception as exc:  # noqa: BLE001 - a broken section is reported in place, the rest still renders
        log.exception("report section %s failed", key)
        body = f'<p class="error">section failed: {esc(type(exc).__name__)}: {esc(exc)}</p>'
    return Section(key, title, body)


# ------------------------------------------------------------------------------ page

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1100px;padding:1rem 2rem;color:#222}
h1{margin-bottom:.2rem} h2{border-bottom:2px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
nav a{margin-right:1rem} .meta{color:#666;font-size:.9rem}
.scroll{overflow-x:auto;max-width:100%} table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0} th,td{border:1px solid #ddd;padding:.2rem .5rem;text-align:left}
th{background:#f4f4f4} td.num{text-align:right;font-variant-numeric:tabular-nums}
.empty{color:#888;font-style:italic} .note{color:#666;font-size:.85rem} .warn{color:#a0522d;font-size:.85rem}
.error{color:#b00;font-weight:bold} img.chart{max-width:100%;display:block;margin:.5rem 0}
img.chart.small{display:inline-block;max-width:48%;margin-right:1%} .row{display:flex;flex-wrap:wrap}
.gallery{display:flex;flex-direction:column;gap:1rem} .card{border:1px solid #ddd;border-radius:6px;padding:.6rem}
.cardhead{margin-bottom:.3rem} .badge{color:#fff;border-radius:4px;padding:.1rem .4rem;font-weight:bold}
.prompt{font-style:italic;margin-bottom:.4rem} .triplet{display:flex;gap:.6rem}
figure{margin:0} figcaption{text-align:center;font-size:.8rem;color:#555} img.thumb{width:192px;height:auto;image-rendering:auto;border:1px solid #ccc}
"""

# Counts the page's images once everything has loaded, for headless checks (--dump-dom).
SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; });
  var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  document.body.setAttribute('data-images-total', String(imgs.length));
  document.body.setAttribute('data-images-loaded', String(ok.length));
  document.body.setAttribute('data-images-broken', broken.map(function (i) { return i.getAttribute('src'); }).join(' '));
  document.body.setAttribute('data-ready', 'yes');
});
"""


def render_page(title: str, db_uri: str, sections: Sequence[Section]) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    nav = "".join(f'<a href="#{esc(s.key)}">{esc(s.title)}</a>' for s in sections)
    body = "".join(f'<section id="{esc(s.key)}"><h2>{esc(s.title)}</h2>{s.body}</section>' for s in sections)
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<style>{CSS}</style></head>"
        f'<body data-images-total="" data-images-loaded=""><h1>{esc(title)}</h1>'
        f'<p class="meta">database {esc(db_uri)} &middot; generated {esc(stamp)}</p>'
        f"<nav>{nav}</nav>{body}<script>{SCRIPT}</script></body></html>\n"
    )


def write_report(
    db: Database,
    out_dir: Path,
    *,
    title: str = "fbmem report",
    rule: str = "most-severe",
    gallery_per_label: int = 4,
    max_prompts: int = 30,
    nemo_threshold: float = 0.428,
    sql_folder: Path | None = None,
    scan_id: str | None = None,
) -> Path:
    """Write `out_dir/index.html` plus `out_dir/img/*.png`; returns the index.html path.

    `rule` picks which labels to show (most-severe or paper-best-average), `gallery_per_label`
    how many strongest cases per label class, `max_prompts` the rows of per-prompt charts/tables.
    """
    if gallery_per_label < 0 or max_prompts < 1:
        raise ValueError(f"gallery_per_label must be >= 0 and max_prompts >= 1, got {gallery_per_label}, {max_prompts}")
    folder = sql_dir(sql_folder)
    out_dir = Path(out_dir)
    assets = Assets(out_dir)
    assets.clear()
    ctx = Context(db=db, sql=folder, assets=assets, rule=rule, gallery_per_label=gallery_per_label,
                  max_prompts=max_prompts, nemo_threshold=nemo_threshold, scan_id=scan_id)
    sections = [build_section(ctx, key, t, fn) for key, t, fn in SECTIONS]
    index = out_dir / "index.html"
    tmp = index.with_suffix(".html.tmp")
    tmp.write_text(render_page(title, db.uri, sections), encoding="utf-8")
    os.replace(tmp, index)
    return index
