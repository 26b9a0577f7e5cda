"""Train a task sequence with a continual-learning method and write the R matrix report.

    python jobs/run_sequence.py                       # configs/demo.yaml: offline, local Ray, tiny model
    python jobs/run_sequence.py --config configs/cl4.yaml --set method.name=sae_fd
    ray job submit --working-dir . -- python jobs/run_sequence.py --config ...

Re-running the same command resumes after the last finished task.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runs from a checkout or a Ray working dir

from saefd_ray.config import errors_located, load_config  # noqa: E402
from saefd_ray.errors import ArgumentParser, exit_on_user_error  # noqa: E402
from saefd_ray.observe.console import configure as configure_console  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="run config YAML (default: configs/demo.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set training.epochs=2 (repeatable)")
    parser.add_argument("--verbose", action="store_true",
                        help="show every library's and worker's output instead of the progress bars")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv=None) -> dict:
    args = parse_args(argv)
    config = load_config(args.config, args.overrides)  # first: a bad config is one line at once, before the libraries load
    configure_console(args.verbose)
    from saefd_ray.train.sequence import run_sequence

    with errors_located(args.config, args.overrides):  # a check that needs the model names the file or --set too
        return run_sequence(config)


if __name__ == "__main__":
    main()
