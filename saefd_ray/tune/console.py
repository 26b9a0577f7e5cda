"""The sweep's quiet console: one line per trial report instead of Tune's status tables (--verbose restores them)."""

from __future__ import annotations

from ray import tune


class TrialLines(tune.Callback):
    """Prints `[tune] <trial>: task i/n running AA x` after every stage a trial reports, and its end state."""

    def __init__(self, stages: int):
        self.stages = stages

    @staticmethod
    def _values(trial) -> str:
        return " ".join(f"{k.split('.')[-1]}={v}" for k, v in (trial.config or {}).items())

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("final"):
            print(f"[tune] {trial.trial_id} ({self._values(trial)}): done, AA {result['aa']:.1f} "
                  f"BWT {result.get('bwt') or 0:.1f}", flush=True)
        else:
            print(f"[tune] {trial.trial_id} ({self._values(trial)}): task {result['tasks_done']}/{self.stages} "
                  f"running AA {result['running_aa']:.1f}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        where = getattr(trial, "path", None) or "its Tune folder"
        print(f"[tune] {trial.trial_id} ({self._values(trial)}): failed; see {where}", flush=True)
