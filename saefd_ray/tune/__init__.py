"""Ray Tune sweeps over SAE-FD's ρ, anchor-set size and β: each trial runs a whole task sequence.

`sweep.py` turns a search-space YAML (`tune_spaces/*.yaml`) into a Tune param space, searcher and ASHA scheduler
and runs (or resumes) the sweep; `results.py` writes the trials table, the best config and the AA plots.
"""

from saefd_ray.tune.sweep import SweepConfig, load_sweep, run_sweep

__all__ = ["SweepConfig", "load_sweep", "run_sweep"]
