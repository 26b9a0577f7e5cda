"""Benchmark: activation harvesting throughput (Ray Data actor pool vs a plain loop) and SAE training scaling.

    python bench/harvest.py [--instances 1000] [--out bench/results/harvest.json]

(1) Harvesting, same tiny model, same instances, same machine (all its cores for both):
    a. plain single-process loops with torch using every core: the naive per-instance loop (batch size 1, no
       padding, no mask) and the length-bucketed loop over the batches the actors plan (identical compute, no Ray);
    b. the Ray Data pipeline: one pool actor per core, one thread each, rows consumed on the driver.
    Prints b / best(a) for the whole run (actor start-up included) and in steady state (after the first block), and
    the padding waste of the bucketing plan. The ratio is what a user gets from a Ray Data actor pool on this
    machine; on a GPU cluster the pool is one actor per GPU.
(2) SAE training on Ray Train, data parallel, 2 workers vs 1 (one thread each, weak scaling: the same per-worker
    batch): efficiency = tok/s(2) / (2 · tok/s(1)), from rank 0's own timing after its first step (Ray start-up,
    stream warm-up and the first buffer fill excluded; the rate including them is kept too).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from saefd_ray.errors import ArgumentParser  # noqa: E402
from bench.common import positive_int  # noqa: E402

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _ray_init(cpus: int) -> None:
    """Start a local Ray; on a loaded box the raylet can miss its start-up deadline, so try a few times."""
    import ray

    from saefd_ray.train.sequence import pin_state_api

    pin_state_api()  # once, before the first attempt: it only sets an environment variable
    for attempt in range(3):
        try:
            ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
            return
        except Exception:  # noqa: BLE001 - "node timed out during startup"
            ray.shutdown()
            if attempt == 2:
                raise
            time.sleep(10)


def harvest_bench(n_instances: int) -> dict:
    import ray

    from saefd_ray.models.loading import load_model, load_tokenizer, resolve_model_path, residual_stream
    from saefd_ray.stream.config import load_sae_config
    from saefd_ray.stream.harvest import harvest_batch, plan_batches, render
    from saefd_ray.stream.plan import load_instances
    from saefd_ray.stream.pipeline import activation_dataset, window_padding
    from saefd_ray.stream.run import tokenizer_texts

    shared = (REPO.parent / "shared" / "data").is_dir()
    preset = "sae_demo.yaml" if shared else "sae_offline.yaml"
    cores = os.cpu_count() or 1
    config = load_sae_config(REPO / "configs" / preset, ["data.eval_instances=0", f"data.harvest_actors={cores}",
                                                       "data.cpus_per_actor=1"])
    instances, _ = load_instances(config, limit=n_instances)
    model_path = resolve_model_path(config.model, tokenizer_texts(config))
    torch.set_num_threads(cores)
    tok = load_tokenizer(model_path)
    model = load_model(model_path).eval()
    layers, data = config.layers, config.data
    special = set(tok.all_special_ids)
    ids = [render(tok, json.loads(i["messages"]), data.max_len) for i in instances]
    real_tokens = sum(len(x) for x in ids)

    def plain_bucketed():
        n = 0
        for s in range(0, len(ids), data.window):
            w = ids[s : s + data.window]
            for b in plan_batches([len(x) for x in w], data.max_batch_tokens, data.max_padding):
                rows = harvest_batch(model, [w[i] for i in b], [s + i for i in b], layers, special, tok.pad_token_id)
                n += len(rows["token_id"])
        return n

    def plain_single():
        n = 0
        with torch.no_grad():
            for x in ids:
                acts = residual_stream(model, torch.tensor([x]), None, layers)
                n += sum(a[0].numpy().shape[0] for a in acts.values())
        return n

    plain_single()  # warm-up (allocator, kernels)
    t0 = time.perf_counter(); rows_a = plain_bucketed(); ta = time.perf_counter() - t0
    t0 = time.perf_counter(); plain_single(); ta1 = time.perf_counter() - t0
    best_plain = real_tokens / min(ta, ta1)

    _ray_init(cores)
    ds, _ = activation_dataset(config, model_path, instances, threads=1)
    t0 = time.perf_counter()
    first, rows_b, rows_first = None, 0, 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        rows_b += len(batch["token_id"])
        if first is None:
            first, rows_first = time.perf_counter(), rows_b
    tb = time.perf_counter() - t0
    ray.shutdown()
    assert rows_a == rows_b == real_tokens * len(layers), (rows_a, rows_b, real_tokens)
    steady = (rows_b - rows_first) / len(layers) / (t0 + tb - first)
    pad = window_padding(tok, instances, config)
    return {
        "preset": preset, "model": model_path, "instances": len(instances), "tokens": real_tokens,
        "layers": layers, "window": data.window, "cores": cores, "plain_threads": cores,
        "ray_actors": cores, "ray_threads_per_actor": 1,
        "plain_bucketed_tok_s": real_tokens / ta, "plain_per_instance_tok_s": real_tokens / ta1,
        "ray_pipeline_tok_s": real_tokens / tb, "ray_steady_tok_s": steady,
        "ray_seconds_to_first_block": first - t0, "ray_pipeline_wall_s": tb, "plain_best_wall_s": min(ta, ta1),
        "ratio_vs_best_plain": (real_tokens / tb) / best_plain,
        "ratio_steady_vs_best_plain": steady / best_plain,
        **pad,
    }


def scaling_bench(steps: int = 40, d: int = 128, d_sae: int = 4096, local_batch: int = 2048) -> dict:
    import ray

    from saefd_ray.stream.config import validate_sae
    from saefd_ray.stream.pipeline import synthetic_activation_dataset
    from saefd_ray.stream.run import fit

    _ray_init(3)
    out = {"d_in": d, "d_sae": d_sae, "local_batch": local_batch, "steps": steps, "architecture": "gated"}
    tmp = Path("/tmp/saefd-bench-scaling")
    for workers in (1, 2):
        config = validate_sae({
            "layers": [0], "data": {"sources": [{"kind": "file", "path": "x.json"}]},
            "sae": {"architecture": "gated", "width": d_sae},
            "training": {"tokens": steps * local_batch * workers, "batch_size": local_batch * workers,
                         "buffer_tokens": 4 * local_batch, "lr_warmup_steps": 5, "lr_decay_steps": 5,
                         "sparsity_warmup_steps": 5, "log_every_steps": 1000},
            "distributed": {"num_workers": workers, "threads_per_worker": 1},
            "output": {"root": str(tmp), "run_name": f"w{workers}-{time.time_ns()}"},
        })
        n_rows = (steps + 6) * local_batch * workers
        ds = synthetic_activation_dataset(n_rows, d, layer=0, blocks=max(4, n_rows // 4096))
        ds = ds.materialize()  # measure the trainer, not the synthetic generator
        m = fit(config, ds, d_in=d, n_instances=n_rows // 16 + 1, run_dir=config.run_dir, chunk_rows=1024)
        out[f"workers_{workers}_tok_s"] = m["steady_tokens_per_s"]
        out[f"workers_{workers}_tok_s_incl_warmup"] = m["tokens_per_s"]
        out[f"workers_{workers}_steps"] = m["steps"]
    ray.shutdown()
    out["efficiency"] = out["workers_2_tok_s"] / (2 * out["workers_1_tok_s"])
    return out


def main() -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=positive_int, default=1000)
    parser.add_argument("--steps", type=positive_int, default=60)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "harvest.json"))
    args = parser.parse_args()
    harvest = harvest_bench(args.instances)
    print(json.dumps(harvest, indent=1), flush=True)
    scaling = scaling_bench(args.steps)
    print(json.dumps(scaling, indent=1), flush=True)
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "load_avg_at_end": os.getloadavg()},
              "harvest": harvest, "sae_scaling": scaling}
    from saefd_ray.io import atomic_write_text

    atomic_write_text(args.out, json.dumps(result, indent=2))
    print(f"harvest: ray/plain = {harvest['ratio_vs_best_plain']:.2f}x whole run ("
          f"{harvest['ray_seconds_to_first_block']:.1f}s to the first block), {harvest['ratio_steady_vs_best_plain']:.2f}x "
          f"steady; padding waste {100 * harvest['padding_waste']:.1f}%; "
          f"DP scaling efficiency {scaling['efficiency']:.2f} -> {args.out}")


if __name__ == "__main__":
    main()
