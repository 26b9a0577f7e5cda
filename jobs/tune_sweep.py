"""Ray Tune sweep over SAE-FD's ρ / anchor-set size / β; every trial trains a whole task sequence on Ray Train.

    python jobs/tune_sweep.py --space tune_spaces/contribution_ratio.yaml --set method.sae.path=<SAE folder>
    python jobs/tune_sweep.py --space tune_spaces/saefd_joint.yaml --tune-set search.algorithm=optuna \
        --tune-set search.num_samples=24 --set method.sae.path=<SAE folder>
    ray job submit --address http://<head>:8265 --working-dir . --runtime-env runtime_env.yaml -- \
        python jobs/tune_sweep.py --space tune_spaces/anchor_size.yaml --set method.sae.path=<SAE folder>

`--config` replaces the sweep file's base run config, `--set` overrides run-config keys of every trial (after the
sweep file's base.set), `--tune-set` overrides keys of the sweep file itself (search, scheduler, resources,
output). Re-running the same command after the driver died resumes the sweep (Tuner.restore). Writes
<output.root>/<output.name>/{trials.csv, trials.md, best.yaml, aa_vs_params.png, sweep_summary.json}.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runs from a checkout or a Ray working dir
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from saefd_ray.errors import ArgumentParser, exit_on_user_error  # noqa: E402
from saefd_ray.observe.console import configure as configure_console  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", required=True, help="sweep YAML, e.g. tune_spaces/contribution_ratio.yaml")
    parser.add_argument("--config", help="run config YAML of every trial (default: the sweep file's base.config)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a run-config value of every trial, e.g. --set training.epochs=2 (repeatable)")
    parser.add_argument("--tune-set", dest="tune_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a sweep-file value, e.g. --tune-set search.algorithm=random (repeatable)")
    parser.add_argument("--verbose", action="store_true",
                        help="show every library's and worker's output instead of the progress bars")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv=None) -> dict:
    args = parse_args(argv)
    configure_console(args.verbose)
    from saefd_ray.tune.sweep import load_sweep, run_sweep

    sweep = load_sweep(args.space, args.tune_overrides)
    return run_sweep(sweep, args.config, args.overrides)


if __name__ == "__main__":
    main()
