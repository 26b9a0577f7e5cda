"""Report files, their content, and atomic-write behaviour."""

import hashlib
import json

import pytest
from rich.console import Console

from saefd_ray.eval.report import load_results, print_r_matrix, render_markdown, write_report
from saefd_ray.eval.summary import summarize
from saefd_ray.io import atomic_write_bytes, atomic_write_text, sha256_file

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TASKS = ["alpha", "beta", "gamma"]
R = [[99.0, 20.0, 30.0], [80.0, 25.0, 35.0], [85.0, 90.0, 40.0], [60.0, 85.0, 95.0]]


def make_results(**extra):
    return {
        "config": {"model": {"name_or_path": "tiny"}, "training": {"lr": 1e-4}},
        "tasks": TASKS,
        "r_matrix": R,
        "summary": summarize(R, TASKS),
        "timings": {"train alpha": 12.34, "eval": 3.0},
        "method": "seq_lora",
        **extra,
    }


def test_write_report_files(tmp_path):
    results = make_results(seed=7)
    paths = write_report(tmp_path / "run", results)
    # no tb/ folder: the R matrix and its score lines are the only figures
    names = ["r_matrix.png", "report.md", "results.json", "score_lines.png"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == names
    assert set(paths) == set(names)
    md = (tmp_path / "run" / "report.md").read_text()
    assert "![R matrix](r_matrix.png)" in md and "![Scores over the sequence](score_lines.png)" in md
    assert "loss_curves.png" not in md

    assert load_results(tmp_path / "run") == results  # round trip, extra key kept

    png = (tmp_path / "run" / "r_matrix.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 1000


def test_markdown_content():
    md = render_markdown(make_results())
    assert md.startswith("# Run report: seq_lora")
    assert "- model: `tiny`" in md
    assert "|  | alpha | beta | gamma |" in md
    assert "| base | 99.0 | 20.0 | 30.0 |" in md
    assert "| after beta | 85.0 | 90.0 | 40.0 |" in md
    assert "| after gamma | 60.0 | 85.0 | 95.0 |" in md
    # summary: AA 80, BWT -12.5, FWT 7.5, mean forgetting 15 (see test_summary)
    for line in ["| AA (OP) | 80.0 |", "| BWT | -12.5 |", "| FWT | 7.5 |", "| mean forgetting | 15.0 |"]:
        assert line in md
    assert "| alpha | 25.0 |" in md and "| beta | 5.0 |" in md
    assert "| train alpha | 12.3 |" in md and "| eval | 3.0 |" in md
    assert "| **total** | 15.3 |" in md  # 12.34 + 3.0


def test_markdown_single_task_and_row_labels():
    R1 = [[10.0], [70.0]]
    md = render_markdown({"tasks": ["t"], "r_matrix": R1, "summary": summarize(R1, ["t"]), "method": "mtl",
                          "row_labels": ["base", "multi-task"]})
    assert "| multi-task | 70.0 |" in md and "| BWT | n/a |" in md and "Forgetting per task" not in md


def test_print_r_matrix():
    console = Console(record=True, width=200)
    print_r_matrix(make_results(), console=console)
    text = console.export_text()
    assert "after gamma" in text and "95.0" in text and "-12.5" in text and "AA (OP)" in text


def test_failed_render_keeps_previous_report(tmp_path):
    write_report(tmp_path, make_results())
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    bad = make_results(r_matrix=[["oops", 1.0, 2.0]] + R[1:])  # float("oops") fails while rendering the heatmap
    with pytest.raises(ValueError):
        write_report(tmp_path, bad)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_atomic_write_failure_keeps_old_file_and_no_temp(tmp_path):
    target = tmp_path / "results.json"
    atomic_write_text(target, '{"ok": 1}')
    with pytest.raises(TypeError):
        atomic_write_bytes(target, {"not": "bytes"})  # type: ignore[arg-type]  # fails inside the temp-file write
    assert target.read_text() == '{"ok": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_atomic_write_creates_parents_and_replaces(tmp_path):
    target = tmp_path / "a" / "b.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two" and [p.name for p in target.parent.iterdir()] == ["b.txt"]


def test_sha256_file(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"abc")
    assert sha256_file(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    path.write_bytes(b"z" * 3_000_000)  # spans several chunks
    assert sha256_file(path) == hashlib.sha256(b"z" * 3_000_000).hexdigest()


def test_results_json_is_plain_json(tmp_path):
    write_report(tmp_path, make_results())
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["summary"]["bwt"] == pytest.approx(-12.5) and data["r_matrix"][0] == [99.0, 20.0, 30.0]


def test_atomic_writes_get_the_permissions_open_would_give(tmp_path):
    """mkstemp creates 0600 files; a report, config or checkpoint must be readable as a plain write would leave it."""
    import os

    from saefd_ray.io import atomic_write_text

    old = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "results.json", "{}")
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == 0o644


def test_rerun_keeps_the_timings_of_earlier_calls(tmp_path):
    """A re-run of a finished sequence rewrites results.json; what earlier calls measured must survive it."""
    import json

    from saefd_ray.train.sequence import _earlier_timings

    assert _earlier_timings(tmp_path) == []
    first = {"total_s": 1050.0, "task_a_s": 500.0, "task_b_s": 520.0}
    (tmp_path / "results.json").write_text(json.dumps({"timings": first}))
    assert _earlier_timings(tmp_path) == [first]
    (tmp_path / "results.json").write_text(json.dumps({"timings": {"total_s": 30.0},
                                                       "timings_earlier_calls": [first]}))
    assert _earlier_timings(tmp_path) == [{"total_s": 30.0}, first]
