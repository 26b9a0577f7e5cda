"""The sparsity-coefficient sweep of an SAE config: the L0 / FVU / CE-loss-recovered trade-off, and the pick.

    python bench/sae_sweep.py                                    # configs/sae_smollm2.yaml, coefficients 2 5
    python bench/sae_sweep.py --coefficients 0.5 1 2 --config configs/sae_smollm2.yaml

One `jobs/train_sae.py` run per coefficient (output <output.root>/<run_name>_c<coef>/, `--set output.*` honoured),
every other setting the config's (and `--set`'s).
With `data.cache` on, the first run harvests and every later one streams the cached activations, so a coefficient
costs SAE training only. A finished run (its sae_report.json exists) is read, never redone; the report is rewritten
after each run. Everything is measured on the config's held-out *training* instances (`data.eval_instances`), never
on a CL test split.

The pick (fixed before any number was seen): the largest coefficient — the sparsest SAE — whose held-out CE-loss
recovered is ≥ 0.90, i.e. splicing the SAE into the model keeps ≥ 90 % of the gap between zero-ablating the layer and
the clean model; if none reaches it, the smallest coefficient tried. Writes bench/results/<run_name>_sweep.{json,md}.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import cli_path, exit_2_on_error, read_json_file, read_yaml_file, resolve_repo_path  # noqa: E402
from saefd_ray.errors import ArgumentParser  # noqa: E402
from saefd_ray.io import atomic_write_text  # noqa: E402

CE_FLOOR = 0.90
METRICS = ("l0", "fvu", "mse", "log2_mse_special", "dead_fraction_eval", "ce_loss_recovered")


def _shown(path: Path) -> str:
    """A run dir as the report shows it: relative to the repository when inside it."""
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def pick(rows: list[dict]) -> dict | None:
    """The largest coefficient with CE-loss recovered >= CE_FLOOR, else the smallest coefficient."""
    done = [r for r in rows if r.get("ce_loss_recovered") is not None]
    if not done:
        return None
    good = [r for r in done if r["ce_loss_recovered"] >= CE_FLOOR]
    return max(good, key=lambda r: r["coefficient"]) if good else min(done, key=lambda r: r["coefficient"])


def layer_metrics(report: dict) -> dict:
    layers = report.get("eval", {}).get("layers", {})
    metrics = next(iter(layers.values()), {}) if layers else {}
    return {k: metrics.get(k) for k in METRICS}


def markdown(config: str, rows: list[dict], chosen: dict | None) -> str:
    lines = [f"# Sparsity-coefficient sweep — `{config}`", "",
             "Held-out *training* instances (`data.eval_instances`), attention sinks excluded. The pick rule: the "
             f"largest coefficient with CE-loss recovered ≥ {CE_FLOOR}, else the smallest tried.", "",
             "| coefficient | L0 | FVU | MSE | log2 MSE (special) | dead % | CE-loss recovered | run |",
             "|---|---|---|---|---|---|---|---|"]

    def f(v, d=3):
        return "n/a" if v is None else f"{v:.{d}f}"

    for r in sorted(rows, key=lambda r: r["coefficient"]):
        mark = " **(chosen)**" if chosen and r["coefficient"] == chosen["coefficient"] else ""
        dead = None if r["dead_fraction_eval"] is None else 100 * r["dead_fraction_eval"]
        lines.append(f"| {r['coefficient']:g}{mark} | {f(r['l0'], 1)} | {f(r['fvu'])} | {f(r['mse'], 2)} | "
                     f"{f(r['log2_mse_special'], 2)} | {f(dead, 1)} | {f(r['ce_loss_recovered'])} | `{r['run_dir']}` |")
    return "\n".join(lines + [""])


@exit_2_on_error
def main(argv=None) -> dict:
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "sae_smollm2.yaml"))
    ap.add_argument("--coefficients", nargs="+", type=float, default=[2.0, 5.0])
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default=None, help="output stem: writes <out>.json and <out>.md "
                    "(default bench/results/<run_name>_sweep)")
    ap.add_argument("--report-only", action="store_true", help="rewrite the report from finished runs; train none")
    args = ap.parse_args(argv)
    config_path = cli_path(args.config)
    cfg = read_yaml_file(config_path)
    output = dict(cfg.get("output") or {})
    for override in args.overrides:  # the runs are found where train_sae will write them, --set output.* included
        key, sep, value = override.partition("=")
        if not sep:
            raise SystemExit(f"error: --set {override}: expected KEY=VALUE")
        if key in ("output.root", "output.run_name"):
            output[key.split(".")[1]] = value
    root, name = output.get("root", "runs"), output.get("run_name", "sae")
    # output.root from --set is a command-line path (the working directory's); from the config, the repository's
    root_dir = cli_path(root) if any(o.startswith("output.root=") for o in args.overrides) else resolve_repo_path(root)
    run_dirs = [root_dir / f"{name}_c{coefficient:g}" for coefficient in args.coefficients]
    if args.report_only:  # every run checked before anything is written: a refused report leaves the old one
        for run_dir in run_dirs:
            if not (run_dir / "sae_report.json").is_file():
                raise SystemExit(f"error: {run_dir}: no sae_report.json (--report-only trains nothing)")
    rows = []
    out = cli_path(args.out) if args.out else REPO / "bench" / "results" / f"{name}_sweep"
    out_json, out_md = Path(f"{out}.json"), Path(f"{out}.md")  # not with_suffix: a dotted stem stays whole
    for coefficient, run_dir in zip(args.coefficients, run_dirs):
        report = run_dir / "sae_report.json"
        if not report.is_file():
            command = [sys.executable, str(REPO / "jobs" / "train_sae.py"), "--config", str(config_path),
                       *[x for o in args.overrides for x in ("--set", o)],  # the sweep's own settings come last
                       "--set", f"output.root={run_dir.parent}", "--set", f"output.run_name={run_dir.name}",
                       "--set", f"sae.sparsity_coefficient={coefficient}"]
            print("[sweep] " + " ".join(command), flush=True)
            if subprocess.run(command, cwd=REPO).returncode != 0:  # train_sae printed its own error line
                raise SystemExit(f"error: coefficient {coefficient:g}: jobs/train_sae.py failed (see above)")
        rows.append({"coefficient": coefficient, "run_dir": _shown(run_dir),
                     **layer_metrics(read_json_file(report, "jobs/train_sae.py's sae_report.json"))})
        chosen = pick(rows)
        result = {"config": _shown(config_path), "rule": f"largest coefficient with ce_loss_recovered >= {CE_FLOOR}, "
                  "else the smallest", "rows": rows, "chosen": chosen}
        atomic_write_text(out_json, json.dumps(result, indent=1))
        atomic_write_text(out_md, markdown(_shown(config_path), rows, chosen))
    print(f"wrote {_shown(out)}.{{json,md}}; chosen: {pick(rows)}")
    return {"rows": rows, "chosen": pick(rows)}


if __name__ == "__main__":
    main()
