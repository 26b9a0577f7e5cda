"""Train sparse autoencoders on streamed residual-stream activations (FAST), on Ray Data + Ray Train.

    python jobs/train_sae.py --config configs/sae_demo.yaml          # Lima + TRACE prompts, Gated SAE, tiny model
    python jobs/train_sae.py --config configs/sae_offline.yaml       # built-in tasks only (no ../shared/data)
    python jobs/train_sae.py --config ... --set distributed.num_workers=2 --set distributed.sharding=latent

Re-running the same command resumes from the last checkpoint and data position; a finished run only re-evaluates.
Writes <output.root>/<run_name>/{checkpoints/, history.jsonl, sae_report.json, sae_report.md}.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runs from a checkout or a Ray working dir
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from saefd_ray.config import errors_located  # noqa: E402
from saefd_ray.errors import ArgumentParser, exit_on_user_error  # noqa: E402
from saefd_ray.observe.console import configure as configure_console  # noqa: E402
from saefd_ray.stream.config import SaeTrainConfig, load_sae_config  # noqa: E402

DEFAULT = Path(__file__).resolve().parent.parent / "configs" / "sae_offline.yaml"


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT), help="SAE config YAML (default: configs/sae_offline.yaml, offline)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set training.tokens=200000 (repeatable)")
    parser.add_argument("--verbose", action="store_true",
                        help="show every library's and worker's output instead of the progress bars")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv=None) -> dict:
    args = parse_args(argv)
    config = load_sae_config(args.config, args.overrides)  # first: a bad config is one line at once, before the libraries load
    configure_console(args.verbose)
    from saefd_ray.stream.run import train_sae

    with errors_located(args.config, args.overrides, SaeTrainConfig):  # checks that need the model name their key too
        return train_sae(config)


if __name__ == "__main__":
    main()
