"""bench/record.py: a benchmark's output becomes its own section of docs/benchmarks.md, the rest kept."""

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("bench_record", Path(__file__).parents[1] / "bench" / "record.py")
record = importlib.util.module_from_spec(spec)
spec.loader.exec_module(record)


def test_sections_are_keyed_by_the_case_not_the_size_and_replaced_in_place():
    assert record.section_key("influence", ["--rounds", "3", "--model", "cnn"]) == "influence --model cnn"
    assert record.section_key("influence", ["--n=500", "--rounds", "1"]) == "influence"
    # the backend is the API bench's case, the database's address is not
    assert record.section_key("api", ["--db", "postgresql+psycopg://u@h:5432/x", "--seconds", "5"]) == \
        "api --db postgresql"
    assert record.section_key("api", ["--db=sqlite:////tmp/a.db", "--workers", "2"]) == "api --db sqlite --workers 2"
    text = "# Benchmarks\n\nintro, kept\n"
    one = record.replace_section(text, "a", "<!-- bench:a begin -->\nold\n<!-- bench:a end -->")
    two = record.replace_section(one + "\nbetween, kept\n", "b", "<!-- bench:b begin -->\nB\n<!-- bench:b end -->")
    again = record.replace_section(two, "a", "<!-- bench:a begin -->\nnew\n<!-- bench:a end -->")
    assert "old" not in again and "new" in again and "B" in again
    assert again.index("new") < again.index("between, kept") < again.index("\nB\n") and "intro, kept" in again


def test_a_run_writes_its_output_with_the_command_and_a_failed_one_writes_nothing(tmp_path, monkeypatch, capsys):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nhand-written context\n")
    monkeypatch.setattr(record, "DOC", doc)
    assert record.main(["influence", "--n", "300", "--queries", "4", "--rounds", "1"]) == 0
    text = doc.read_text()
    assert "hand-written context" in text and "`python bench/influence.py --n 300 --queries 4 --rounds 1`" in text
    assert "<!-- bench:influence begin -->" in text and "x epoch" in text  # the benchmark's own lines
    assert record.main(["influence", "--model", "nope"]) != 0  # the benchmark refused its arguments
    assert record.main(["../app/main"]) == 2 and record.main([]) == 2
    assert doc.read_text() == text
    with pytest.raises(SystemExit):
        raise SystemExit(record.main(["record"]))
