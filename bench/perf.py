"""One table of the performance ratios of the three performance benchmarks, in bench/results/perf.md.

    python bench/perf.py                 # run each benchmark script that exists (quick settings), then the table
    python bench/perf.py --full          # their default (longer) settings
    python bench/perf.py --no-run        # only read the existing bench/results/*.json

The benchmarks (each its own script and JSON, written by the issue that owns it):
  bench/sae_step.py   -> sae_step.json   one SAE training step, ours vs sae-lens / sparsify, per architecture
  bench/harvest.py    -> harvest.json    activation harvesting vs a plain loop, and 2-worker scaling
  bench/overhead.py   -> overhead.json   per-step time of each CL method vs SeqLoRA (target: SAE-FD <= 1.15x)
                       overhead_wide.json  the same, SeqLoRA vs SAE-FD only, on a wider and deeper tiny model
                       overhead_smollm2.json  SeqLoRA vs SAE-FD (anchor batch 1, 2, 4) on SmolLM2 and its SAE
A missing script or a failed run is reported in the table, not hidden. Ratios are read from the JSONs as written:
every numeric field whose name says ratio / speedup / scaling / efficiency (the scripts' own definitions, quoted).
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
sys.path.insert(0, str(REPO))
from bench.common import positive_int  # noqa: E402
from saefd_ray.errors import ArgumentParser  # noqa: E402

WIDE_MODEL = ["--set", "model.tiny.hidden_size=512", "--set", "model.tiny.intermediate_size=1376",
              "--set", "model.tiny.num_heads=8", "--set", "model.tiny.num_layers=8"]
BENCHES = [
    # name, script, result json, quick args, what the ratios mean, target note
    ("sae_step", "bench/sae_step.py", "sae_step.json", ["--rounds", "2", "--archs", "gated,topk"],
     "their step time / ours (> 1: ours faster)", "issue 3: ours no slower than sae-lens / sparsify"),
    ("harvest", "bench/harvest.py", "harvest.json", [],
     "ratio_*: Ray pipeline tok/s / plain loop tok/s (> 1: ours faster); efficiency: tok/s(2 workers) / "
     "(2 · tok/s(1))", "issue 4: streaming harvest vs plain loop; 2-worker scaling"),
    ("overhead", "bench/overhead.py", "overhead.json", ["--rounds", "3", "--steps", "10"],
     "method step time / SeqLoRA step time (< 1.15 wanted for sae_fd)", "issue 5 / 8: SAE-FD <= 1.15x SeqLoRA"),
    ("overhead_wide", "bench/overhead.py", "overhead_wide.json",
     ["--rounds", "3", "--steps", "10", "--methods", "seq_lora,sae_fd", "--out", "bench/results/overhead_wide.json",
      *WIDE_MODEL], "the same on a 4x wider, 2x deeper tiny model (where arithmetic, not per-op overhead, dominates)",
     "how the SAE-FD ratio moves with model size"),
    ("overhead_smollm2", "bench/overhead.py", "overhead_smollm2.json",
     ["--rounds", "3", "--steps", "5", "--config", "configs/bench/overhead_smollm2.yaml",
      "--sae", "runs/sae_smollm2_c2/checkpoints/tok_000000823296/layer_12", "--out",
      "bench/results/overhead_smollm2.json", "--methods",
      "seq_lora,sae_fd_anchor1=sae_fd:method.anchor_batch=1,sae_fd,sae_fd_anchor4=sae_fd:method.anchor_batch=4"],
     "the same on SmolLM2-135M-Instruct with its trained SAE (layer 12 of 30), anchor batch 1 / 2 / 4",
     "issue 15.3: SAE-FD <= 1.15x SeqLoRA on the real model"),
]
KEYWORDS = ("ratio", "speedup", "scaling", "efficiency")


def ratios(data, prefix: str = "", named: bool = False) -> list[tuple[str, float]]:
    """(dotted path, value) of every numeric leaf whose key, or an enclosing key, names a ratio
    (`ratio_vs_seq_lora: {sae_fd: 1.2}` counts)."""
    out = []
    if isinstance(data, dict):
        for key, value in data.items():
            if str(key).lower() in ("target", "targets", "setup", "setting", "config"):
                continue  # goals and settings, not measurements
            path = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if named or any(word in str(key).lower() for word in KEYWORDS):
                    out.append((path, float(value)))
            else:  # a table of ratios, not a section that merely mentions scaling
                out += ratios(value, path, named or "ratio" in str(key).lower())
    return out


def run_bench(script: Path, args: list[str], timeout: int) -> dict:
    began = time.time()
    try:
        proc = subprocess.run([sys.executable, str(script), *args], cwd=REPO, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ran": True, "ok": False, "wall_s": round(time.time() - began, 1), "error": f"timeout {timeout}s"}
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
    return {"ran": True, "ok": proc.returncode == 0, "wall_s": round(time.time() - began, 1),
            "error": None if proc.returncode == 0 else " / ".join(tail)[-300:]}


def main(argv=None) -> Path:
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-run", action="store_true", help="only read existing results")
    ap.add_argument("--full", action="store_true", help="run the benchmarks with their own defaults")
    ap.add_argument("--timeout", type=positive_int, default=1800, help="seconds per benchmark")
    ap.add_argument("--out", default=str(RESULTS / "perf.md"))
    args = ap.parse_args(argv)

    lines = ["# Performance ratios", "",
             f"Written by `python bench/perf.py{' --no-run' if args.no_run else ''}{' --full' if args.full else ''}` "
             f"on {time.strftime('%Y-%m-%d %H:%M')} ({platform.platform()}). Each ratio is copied from its "
             "benchmark's JSON; see that script's docstring for the exact setting. A shared 2-core box is noisy: "
             "read ratios near 1 as 'no difference'.", ""]
    status_rows = []
    table = ["| benchmark | ratio | value | meaning |", "|---|---|---|---|"]
    for name, script, result, quick, meaning, target in BENCHES:
        script_path, result_path = REPO / script, RESULTS / result
        status = {"ran": False, "ok": None, "wall_s": None, "error": None}
        if not script_path.is_file():
            status["error"] = f"{script} not present"
        elif not args.no_run:
            print(f"[perf] running {script} {' '.join([] if args.full else quick)}", flush=True)
            status = run_bench(script_path, [] if args.full else quick, args.timeout)
        found = result_path.is_file()
        age = (time.strftime("%Y-%m-%d %H:%M", time.localtime(result_path.stat().st_mtime)) if found else "—")
        status_rows.append(f"| {name} | `{script}` | {'yes' if script_path.is_file() else 'no'} | "
                           f"{'yes' if status['ran'] else 'no'}{'' if status['ok'] in (None, True) else ' (failed)'} | "
                           f"{status['wall_s'] if status['wall_s'] is not None else '—'} | "
                           f"{'`' + result + '` (' + age + ')' if found else 'none'} | "
                           f"{(status['error'] or '').replace('|', '/')} |")
        if not found:
            table.append(f"| {name} | — | — | no `{result}`: {target} not measured |")
            continue
        data = json.loads(result_path.read_text())
        pairs = ratios(data)
        if not pairs:
            table.append(f"| {name} | — | — | `{result}` has no ratio fields |")
        for path, value in pairs:
            table.append(f"| {name} | `{path}` | {value:.3f} | {meaning} |")
    lines += ["## Runs", "", "| benchmark | script | present | ran now | wall (s) | result file (mtime) | error |",
              "|---|---|---|---|---|---|---|", *status_rows, "", "## Ratios", "", *table, "",
              "Targets: " + "; ".join(t for *_, t in BENCHES) + "."]
    for result in ("overhead.json", "overhead_wide.json"):
        if not (RESULTS / result).is_file():
            continue
        data = json.loads((RESULTS / result).read_text())
        fd = (data.get("ratio_vs_seq_lora") or {}).get("sae_fd")
        goal = (data.get("target") or {}).get("sae_fd_ratio_max", 1.15)
        setup = data.get("setup") or {}
        if fd is not None:
            verdict = "met" if fd <= goal else f"missed by {fd - goal:.2f}"
            lines += ["", f"`{result}` (hidden {setup.get('hidden')}, {setup.get('layers')} layers): SAE-FD step time "
                          f"{fd:.2f}× SeqLoRA (target ≤ {goal}): **{verdict}**."]
    out = Path(args.out)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
    return out


if __name__ == "__main__":
    main()
