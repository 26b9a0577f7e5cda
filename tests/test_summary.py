"""CL summaries on hand-computed R matrices (1-based task indices in the comments, as in papers.md §4)."""

import pytest

from saefd_ray.eval.summary import average_accuracy, bwt, forgetting, fwt, summarize

# rows: base, after t1, after t2, after t3; columns: tasks 1..3
R3 = [
    [99.0, 20.0, 30.0],  # base; 99 must not count as a "peak" for forgetting
    [80.0, 25.0, 35.0],
    [85.0, 90.0, 40.0],  # task 1 peaks after task 2, not on the diagonal
    [60.0, 85.0, 95.0],
]


def test_three_tasks():
    # AA  = (60+85+95)/3 = 80
    assert average_accuracy(R3) == pytest.approx(80.0)
    # BWT = [(R3,1 - R1,1) + (R3,2 - R2,2)]/2 = [(60-80) + (85-90)]/2 = -12.5
    assert bwt(R3) == pytest.approx(-12.5)
    # FWT = [(R1,2 - R0,2) + (R2,3 - R0,3)]/2 = [(25-20) + (40-30)]/2 = 7.5
    assert fwt(R3) == pytest.approx(7.5)
    # forgetting task1 = max(R1,1=80, R2,1=85) - 60 = 25 ; task2 = max(R2,2=90) - 85 = 5
    assert forgetting(R3) == pytest.approx([25.0, 5.0])

    s = summarize(R3, ["a", "b", "c"])
    assert s == {
        "num_tasks": 3,
        "complete": True,
        "aa": pytest.approx(80.0),
        "bwt": pytest.approx(-12.5),
        "fwt": pytest.approx(7.5),
        "forgetting": {"a": pytest.approx(25.0), "b": pytest.approx(5.0)},
        "mean_forgetting": pytest.approx(15.0),  # (25+5)/2
    }


def test_two_tasks():
    R = [[0.0, 10.0], [50.0, 20.0], [40.0, 60.0]]
    # AA=(40+60)/2=50, BWT=40-50=-10, FWT=R1,2-R0,2=20-10=10, forgetting task1=50-40=10
    s = summarize(R, ["x", "y"])
    got = (s["aa"], s["bwt"], s["fwt"], s["forgetting"], s["mean_forgetting"])
    assert got == (50.0, -10.0, 10.0, {"x": 10.0}, 10.0)


def test_single_task_has_no_transfer():
    s = summarize([[10.0], [70.0]], ["only"])
    assert s["aa"] == 70.0 and s["complete"]
    assert s["bwt"] is None and s["fwt"] is None and s["mean_forgetting"] is None and s["forgetting"] == {}
    assert bwt([[10.0], [70.0]]) is None and forgetting([[10.0], [70.0]]) == []


def test_final_row_only_gives_only_aa():
    # multi-task upper bound: a single row for 3 tasks -> AA=(70+80+90)/3=80, nothing else
    s = summarize([[70.0, 80.0, 90.0]], ["a", "b", "c"])
    assert s["aa"] == pytest.approx(80.0) and not s["complete"]
    assert s["bwt"] is None and s["fwt"] is None and s["forgetting"] == {} and s["mean_forgetting"] is None
    with pytest.raises(ValueError, match="needs all T\\+1=4 rows"):
        bwt([[70.0, 80.0, 90.0]])


def test_bad_matrices():
    with pytest.raises(ValueError, match="different lengths"):
        summarize([[1.0, 2.0], [1.0]], ["a", "b"])
    with pytest.raises(ValueError, match="2 task names"):
        summarize(R3, ["a", "b"])
    with pytest.raises(ValueError, match="at most T\\+1"):
        summarize([[1.0]] * 3, ["a"])
    with pytest.raises(ValueError, match="empty"):
        summarize([], [])
