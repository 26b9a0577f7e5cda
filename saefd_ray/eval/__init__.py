"""Evaluation: text metrics (0–100), CL summaries of the R matrix, and the run report."""

from saefd_ray.eval.metrics import METRICS, score
from saefd_ray.eval.report import load_results, print_r_matrix, render_markdown, write_report
from saefd_ray.eval.summary import average_accuracy, bwt, forgetting, fwt, summarize

__all__ = [
    "METRICS",
    "score",
    "average_accuracy",
    "bwt",
    "fwt",
    "forgetting",
    "summarize",
    "write_report",
    "load_results",
    "render_markdown",
    "print_r_matrix",
]
