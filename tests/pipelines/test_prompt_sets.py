"""Prompt sets: the reference files shipped in the package, and plain CSVs."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from fbmem.pipelines.prompt_sets import (
    PROMPT_SET_SCHEMA,
    PromptSetError,
    load_prompt_set,
    read_prompt_set,
)
from fbmem.pipelines.reference_data import prompt_set_path

MEMORIZED = prompt_set_path("memorized-laion")
UNMEMORIZED = prompt_set_path("ordinary-laion")


def test_memorized_reference_file() -> None:
    read = load_prompt_set(MEMORIZED)
    t = read.table
    assert read.delimiter == ";"
    assert t.schema.equals(PROMPT_SET_SCHEMA)  # metadata aside, exact names and types
    assert t.num_rows == 500 and read.rows_read == 500
    counts = {d["values"]: d["counts"] for d in pc.value_counts(t["mem_type"]).to_pylist()}
    assert counts == {"VM": 112, "TM": 388}
    first = t.slice(0, 1).to_pylist()[0]
    assert first["text"] == "The No Limits Business Woman Podcast"
    assert first["prompt_id"] == hashlib.sha256(first["text"].encode()).hexdigest()
    assert first["linked_uri"] == "https://onlinecoach1.hipcast.com/albumart/1000_1618923228.jpg"
    assert first["linked_id"] == "1030727993"
    assert first["mem_type"] == "VM"
    assert first["mean_sscd"] == pytest.approx(0.8392826318740845)
    assert first["max_sscd"] == pytest.approx(0.8467365503311157)
    assert first["source"] == MEMORIZED.name and first["source_row"] == 0
    assert t["source_row"].to_pylist() == list(range(500))
    # 13 template rows in the reference file have empty sscd cells: null, not 0 and not an error
    assert t["mean_sscd"].null_count == 13 and t["max_sscd"].null_count == 13
    vm = t.filter(pc.equal(t["mem_type"], "VM"))
    assert vm["mean_sscd"].null_count == 0
    assert t["planted"].null_count == 500
    assert len(set(t["prompt_id"].to_pylist())) == 500
    assert t.schema.metadata[b"fbmem.rows_read"] == b"500"


def test_unmemorized_reference_file_has_no_type_or_sscd() -> None:
    t = read_prompt_set(UNMEMORIZED)
    assert t.num_rows == 500
    assert t["mem_type"].null_count == 500
    assert t["mean_sscd"].null_count == 500 and t["max_sscd"].null_count == 500
    assert t["linked_uri"].null_count == 0 and t["linked_id"].null_count == 0
    assert t.slice(0, 1).to_pylist()[0]["linked_id"] == "396"


def test_prompt_ids_stable_across_files_and_formats(tmp_path: Path) -> None:
    ref = read_prompt_set(MEMORIZED).slice(0, 3)
    plain = tmp_path / "plain.csv"
    texts = ref["text"].to_pylist()
    plain.write_text("prompt,url\n" + "\n".join(f'"{x}",' for x in texts) + "\n")
    t = read_prompt_set(plain)
    assert t["prompt_id"].to_pylist() == ref["prompt_id"].to_pylist()


def test_plain_csv_with_planted_duplicates_and_empty_prompts(tmp_path: Path) -> None:
    p = tmp_path / "planted.csv"
    p.write_text(
        "id,prompt,url,planted\n"
        '7,"a red car, parked; at night",http://x/1.jpg,FM\n'
        "8,,http://x/2.jpg,\n"
        '9,"a red car, parked; at night",http://x/3.jpg,BM\n'
        "10,  a dog  ,,\n"
    )
    read = load_prompt_set(p)
    t = read.table
    assert read.delimiter == "," and read.rows_read == 4
    assert read.empty_skipped == 1 and read.duplicates_dropped == 1
    assert t.schema.metadata[b"fbmem.empty_skipped"] == b"1"
    rows = t.to_pylist()
    assert [r["text"] for r in rows] == ["a red car, parked; at night", "a dog"]
    assert rows[0]["linked_id"] == "7" and rows[0]["planted"] == "FM"  # first wins
    assert rows[0]["linked_uri"] == "http://x/1.jpg"
    assert [r["source_row"] for r in rows] == [0, 3]
    assert rows[1]["linked_uri"] is None and rows[1]["planted"] is None
    assert rows[1]["mem_type"] is None and rows[1]["mean_sscd"] is None


def test_semicolon_file_with_prompt_header_and_bom(tmp_path: Path) -> None:
    p = tmp_path / "semi.csv"
    p.write_bytes("\ufeffprompt;type;mean_sscd\nhello, world;vm;0.5\n".encode())
    rows = read_prompt_set(p).to_pylist()
    assert rows == [
        {
            "prompt_id": hashlib.sha256(b"hello, world").hexdigest(),
            "text": "hello, world",
            "source": "semi.csv",
            "source_row": 0,
            "mem_type": "VM",
            "linked_uri": None,
            "linked_id": None,
            "mean_sscd": 0.5,
            "max_sscd": None,
            "planted": None,
        }
    ]


def test_errors_name_the_file(tmp_path: Path) -> None:
    no_text = tmp_path / "no_text.csv"
    no_text.write_text("url,id\nhttp://x,1\n")
    with pytest.raises(PromptSetError, match="no_text.csv: no prompt column"):
        read_prompt_set(no_text)
    bad_num = tmp_path / "bad_num.csv"
    bad_num.write_text(";Caption;URL;type;mean_sscd;max_sscd;Index\n0;a;u;VM;high;0.5;1\n")
    with pytest.raises(PromptSetError, match=r"bad_num.csv, line 2: mean_sscd is not a number: 'high'"):
        read_prompt_set(bad_num)
    ragged = tmp_path / "ragged.csv"
    ragged.write_text(";Caption;URL;Index\n0;a;b;u;1\n")
    with pytest.raises(PromptSetError, match=r"ragged.csv, line 2: 5 fields, the header has 4"):
        read_prompt_set(ragged)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(PromptSetError, match="empty"):
        read_prompt_set(empty)
    with pytest.raises(PromptSetError, match="not found"):
        read_prompt_set(tmp_path / "absent.csv")


def test_result_is_arrow_table_with_schema_types() -> None:
    t = read_prompt_set(UNMEMORIZED)
    assert isinstance(t, pa.Table)
    for f in PROMPT_SET_SCHEMA:
        assert t.schema.field(f.name).type == f.type


def test_shipped_reference_files_are_the_published_ones():
    import hashlib

    from fbmem.pipelines.reference_data import (
        CHECKSUMS,
        PROMPT_SETS,
        STATISTICS,
        prompt_set_path,
        statistics_path,
    )

    paths = [prompt_set_path(n) for n in PROMPT_SETS] + [statistics_path(n) for n in STATISTICS]
    assert sorted(p.name for p in paths) == sorted(CHECKSUMS)
    for p in paths:
        assert hashlib.sha256(p.read_bytes()).hexdigest() == CHECKSUMS[p.name], p


def test_reference_names_resolve_and_unknown_names_are_refused(tmp_path):
    from fbmem.pipelines.reference_data import prompt_set_path, statistics_path

    assert statistics_path("sd14").name == "sd14_to_v_activation_stats.csv"
    own = tmp_path / "memorized-laion"  # a path that exists wins over the name
    own.write_text("prompt\nx\n")
    assert prompt_set_path(own) == own
    with pytest.raises(FileNotFoundError, match="memorized-laion, ordinary-laion"):
        prompt_set_path("memorised-laion")
