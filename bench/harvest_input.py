"""Driver memory of the SAE job's input side: planning + instance stream, on 1,000 vs 1,000,000 instances.

    python bench/harvest_input.py                 # writes bench/results/harvest_input.json
    python bench/harvest_input.py --large 200000  # a smaller "large" file (quicker)

Generates two JSONL files of prompt/answer records (in --cache, default bench/cache/harvest_input/, git-ignored;
never committed) and, for each, runs in a fresh subprocess what the driver of `jobs/train_sae.py` does with its
input before the model: `plan_inputs` (streaming scan: counts, digests, shard offsets, held-out selection), the
held-out instances, the Ray Data instance stream, and one full pass over it in Ray tasks (each window counted where
the harvesting actors would run the model; the driver receives one number). The driver's peak RSS
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`) is the measurement; the ratio large / small should be close to 1.
For contrast, `old_in_memory` is the peak RSS of the previous driver's input handling of the large file without
Ray (every record parsed, rendered to chat JSON, held in a list, then hashed) — what it held before `from_items`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from saefd_ray.errors import ArgumentParser  # noqa: E402
from bench.common import positive_int  # noqa: E402


def generate(path: Path, n: int) -> Path:
    """n prompt/answer records, one per line (reused when already there)."""
    if path.is_file() and path.with_suffix(".done").is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    with open(path, "w") as f:
        for i in range(n):
            prompt = " ".join(words[(i * 7 + j) % len(words)] for j in range(8 + i % 9))
            f.write(json.dumps({"prompt": f"Q{i}: {prompt}?", "answer": f"A{i}: {words[i % len(words)]}"}) + "\n")
    path.with_suffix(".done").write_text(str(n))
    return path


def _count(batch):
    import numpy as np

    return {"n": np.asarray([len(batch["instance_id"])])}


def child(path: str, mode: str) -> dict:
    """One measured driver (a subprocess): the new input side, or the old in-memory one (`mode`)."""
    from saefd_ray.stream.config import validate_sae

    config = validate_sae({"data": {"sources": [{"kind": "file", "path": path}], "eval_instances": 32,
                                    "window": 64}})
    out: dict = {"mode": mode}
    t0 = time.perf_counter()
    if mode == "old_in_memory":
        import hashlib
        import random

        from saefd_ray.data.tasks import read_records
        from saefd_ray.stream.sources import to_messages

        records = read_records(Path(path))
        items = [to_messages(r, "prompt", "answer", "messages", f"record {i}") for i, r in enumerate(records)]
        del records
        order = list(range(len(items)))
        random.Random("saefd-sae-instances:0").shuffle(order)
        instances = [{"instance_id": i, "messages": json.dumps(items[j]), "origin": f"source x record {j}"}
                     for i, j in enumerate(order)]
        h = hashlib.sha256()
        for inst in instances:
            h.update(f"{inst['instance_id']}\0{inst['messages']}\0".encode())
        out.update(instances=len(instances), load_s=time.perf_counter() - t0)
    elif mode == "empty":
        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        out.update(ray_init_s=time.perf_counter() - t0)
        ray.shutdown()
    else:
        import ray

        from saefd_ray.stream.instances import instance_stream
        from saefd_ray.stream.plan import plan_inputs

        plan = plan_inputs(config)
        held = plan.held_instances()
        out.update(plan_s=time.perf_counter() - t0, records=plan.total, training=plan.n_train, held=len(held),
                   shards=plan.n_shards)
        if mode == "plan":  # the driver's planning only, no Ray
            out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            return out
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        t1 = time.perf_counter()
        seen = instance_stream(plan).map_batches(_count, batch_size=config.data.window,
                                                                      batch_format="numpy").sum("n")
        out.update(pass_s=time.perf_counter() - t1, streamed=int(seen))
        assert int(seen) == plan.n_train, (seen, plan.n_train)
        ray.shutdown()
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def measure(path: Path, mode: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", str(path), "--mode", mode], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode:
        raise SystemExit(f"{mode} on {path.name} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"[harvest_input] {path.name} {mode}: {json.dumps(result)}", flush=True)
    return result


def main(argv=None) -> dict:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=positive_int, default=1_000)
    parser.add_argument("--large", type=positive_int, default=1_000_000)
    parser.add_argument("--cache", default=str(REPO / "bench" / "cache" / "harvest_input"))
    parser.add_argument("--skip-old", action="store_true", help="do not measure the old in-memory input side")
    parser.add_argument("--plan-only", action="store_true",
                        help="measure the driver's planning (scan, held-out instances) without Ray and the pass")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "harvest_input.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="stream", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.mode)), flush=True)
        return {}
    cache = Path(args.cache).expanduser()
    small = generate(cache / f"instances-{args.small}.jsonl", args.small)
    large = generate(cache / f"instances-{args.large}.jsonl", args.large)
    mode = "plan" if args.plan_only else "stream"
    runs = {"empty": measure(small, "empty") if not args.plan_only else None,
            "small": measure(small, mode), "large": measure(large, mode)}
    if not args.skip_old:
        runs["old_in_memory_large"] = measure(large, "old_in_memory")
    import ray

    result = {
        "date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(), "ray": ray.__version__, "mode": mode,
        "files": {"small": {"instances": args.small, "bytes": small.stat().st_size},
                  "large": {"instances": args.large, "bytes": large.stat().st_size}},
        "runs": runs,
        "peak_rss_ratio_large_over_small": runs["large"]["peak_rss_mb"] / runs["small"]["peak_rss_mb"],
        "peak_rss_large_minus_small_mb": runs["large"]["peak_rss_mb"] - runs["small"]["peak_rss_mb"],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"[harvest_input] driver peak RSS: {runs['small']['peak_rss_mb']:.0f} MB ({args.small:,} instances), "
          f"{runs['large']['peak_rss_mb']:.0f} MB ({args.large:,}); ratio "
          f"{result['peak_rss_ratio_large_over_small']:.3f}" + (f"; empty run (imports + Ray start) "
          f"{runs['empty']['peak_rss_mb']:.0f} MB" if runs["empty"] else "") + (f"; old in-memory input side on the large file "
          f"{runs['old_in_memory_large']['peak_rss_mb']:.0f} MB" if "old_in_memory_large" in runs else ""),
          flush=True)
    print(f"[harvest_input] wrote {out}", flush=True)
    return result


if __name__ == "__main__":
    main()
