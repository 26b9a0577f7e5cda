"""FAST's headline comparison on a real instruct model: per-instance SAE training (FAST) vs block training (BT).

    python bench/fast_vs_bt.py                                   # configs/sae_smollm2.yaml, its token budget
    python bench/fast_vs_bt.py --tokens 20000 --out /tmp/fvb.json --set data.max_len=256   # a smoke run

Same model, layer, architecture, width, normalization, sink rule and token budget for three ways of feeding the SAE:
  FAST   each training instance alone, rendered in its chat template (what jobs/train_sae.py does);
  BT(F)  the same rendered instances concatenated into one token stream, cut into fixed blocks of --block-len;
  BT(P)  plain text, no template: CL-benchmark sentences (agnews, amazon, dbpedia, yelp) and Lima answers, joined
         with blank lines, cut into the same blocks.
Every SAE is evaluated on the same held-out chat instances, each run alone in its template (data.eval_instances of
the config): log2 MSE over all tokens and over special tokens only (FAST eq. 7), FVU, L0 — attention sinks excluded
as in training. Architectures: Standard and JumpReLU (--archs). The paper's values (Qwen2.5-7B-Instruct, layer 18,
Standard, 8×: log2 MSE_st 0.6468 / 1.5093 / 5.1985) are printed beside ours.

Resumable and cached under bench/cache/fast_vs_bt/: the harvest of each feeding mode is computed once (Ray Data
actor pool, teed to parquet shards) and streamed from the cache by every architecture; SAE runs resume from their
checkpoints; finished evaluations are reused. Writes --out (default bench/results/fast_vs_bt.json) and its .md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from saefd_ray.errors import ArgumentParser  # noqa: E402
from bench.common import positive_int  # noqa: E402

import numpy as np  # noqa: E402

from saefd_ray.io import atomic_write_text  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODES = ("FAST", "BT(F)", "BT(P)")
PAPER = {"source": "FAST (papers.md), Qwen2.5-7B-Instruct layer 18, Standard SAE, 8× expansion",
         "log2_mse_special": {"FAST": 0.6468, "BT(F)": 1.5093, "BT(P)": 5.1985}}
CL_TASKS = ("agnews", "amazon", "dbpedia", "yelp")


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "configs" / "sae_smollm2.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--tokens", type=positive_int, help="token budget of every SAE (default: the config's training.tokens)")
    p.add_argument("--block-len", type=positive_int, default=1024, help="BT block length in tokens")
    p.add_argument("--archs", nargs="+", default=["standard", "jumprelu"])
    p.add_argument("--coefficient", action="append", default=[], metavar="ARCH=λ",
                   help="sparsity coefficient per architecture (default: the architecture's default)")
    p.add_argument("--cache", default=str(REPO / "bench" / "cache" / "fast_vs_bt"))
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "fast_vs_bt.json"))
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------- instances


def _blocks(stream: list[int], block_len: int) -> list[dict]:
    n = len(stream) // block_len
    return [{"instance_id": i, "messages": json.dumps({"input_ids": stream[i * block_len : (i + 1) * block_len]})}
            for i in range(n)]


def _take(instances: list[dict], lengths: list[int], tokens: int) -> list[dict]:
    """The shortest prefix holding `tokens` tokens (all of them if the data is smaller)."""
    total = np.cumsum(lengths)
    stop = int(np.searchsorted(total, tokens)) + 1
    return instances[:stop]


def fast_instances(tokenizer, train: list[dict], max_len: int, tokens: int) -> list[dict]:
    from saefd_ray.stream.harvest import render_instance

    lengths = [len(render_instance(tokenizer, i["messages"], max_len)) for i in train]
    return _take(train, lengths, tokens)


def bt_f_instances(tokenizer, train: list[dict], max_len: int, block_len: int, tokens: int) -> list[dict]:
    from saefd_ray.stream.harvest import render_instance

    stream: list[int] = []
    for inst in train:
        stream += render_instance(tokenizer, inst["messages"], max_len)
        if len(stream) >= tokens + block_len:
            break
    return _blocks(stream, block_len)


def plain_texts(data_root: Path, seed: int) -> list[str]:
    """CL-benchmark training sentences and Lima answers, no template, in one seeded order."""
    texts = []
    for name in CL_TASKS:
        path = data_root / "cl_benchmark" / name / "train.json"
        if path.is_file():
            texts += [str(r["sentence"]) for r in json.loads(path.read_text()) if r.get("sentence")]
    lima = data_root / "trace" / "Lima" / "train.json"
    if lima.is_file():
        texts += [str(r["answer"]) for r in json.loads(lima.read_text()) if r.get("answer")]
    random.Random(f"bt-p:{seed}").shuffle(texts)
    return texts


def bt_p_instances(tokenizer, texts: list[str], block_len: int, tokens: int) -> list[dict]:
    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + sep
        if len(stream) >= tokens + block_len:
            break
    return _blocks(stream, block_len)


# ------------------------------------------------------------------------------------------- one SAE


def run_config(base, mode: str, arch: str, coefficient: float | None, tokens: int, cache: Path, digest: str):
    from saefd_ray.stream.config import validate_sae

    raw = base.model_dump(mode="json")
    raw["sae"].update(architecture=arch, sparsity_coefficient=coefficient)
    raw["training"]["tokens"] = tokens
    raw["data"].update(cache=True, cache_dir=str(cache / "activations"))
    tag = {"FAST": "fast", "BT(F)": "btf", "BT(P)": "btp"}[mode]
    raw["output"] = {"root": str(cache / "runs"), "run_name": f"{tag}-{arch}-{digest}"}
    return validate_sae(raw, "fast_vs_bt")


def harvest_once(config, model_path: str, instances: list[dict]) -> dict:
    """Run the Ray Data harvest over `instances` to the end (writing the cache); its tokens/s. Cached: no-op."""
    from saefd_ray.stream.pipeline import activation_dataset

    ds, source = activation_dataset(config, model_path, instances)
    if source == "cache":
        return {"source": "cache"}
    began, rows = time.perf_counter(), 0
    for batch in ds.iter_batches(batch_size=4096, batch_format="numpy"):
        rows += len(batch["layer"])
    elapsed = time.perf_counter() - began
    return {"source": "model", "tokens": rows // len(config.layers), "seconds": round(elapsed, 1),
            "tokens_per_s": rows / len(config.layers) / max(elapsed, 1e-9)}


def train_and_evaluate(config, model_path: str, d_in: int, instances: list[dict], held: list[dict]) -> dict:
    from saefd_ray.stream.pipeline import activation_dataset
    from saefd_ray.stream.report import evaluate_checkpoint
    from saefd_ray.stream.run import fit, prepare_run_dir
    from saefd_ray.stream.checkpoint import CONSUMED, PROGRESS, latest_checkpoint

    run_dir = prepare_run_dir(config)
    ckpt = latest_checkpoint(run_dir)
    progress = json.loads((ckpt / PROGRESS).read_text()) if ckpt else None
    fit_metrics: dict = {}
    if not (progress and (progress["tokens"] >= config.training.tokens or progress.get("ran_out_of_data"))):
        skip = set(np.flatnonzero(np.load(ckpt / CONSUMED)).tolist()) if ckpt else set()
        ds, source = activation_dataset(config, model_path, instances, skip=skip)
        fit_metrics = fit(config, ds, d_in=d_in, n_instances=1 + max(i["instance_id"] for i in instances),
                          run_dir=run_dir, resume=ckpt, model_name=model_path)
        fit_metrics["source"] = source
        ckpt = latest_checkpoint(run_dir)
        progress = json.loads((ckpt / PROGRESS).read_text())
    cached = run_dir / "eval.json"
    if cached.is_file() and json.loads(cached.read_text()).get("checkpoint") == ckpt.name:
        return json.loads(cached.read_text())
    ev = evaluate_checkpoint(ckpt, model_path, held, config.layers, config.data.max_len, config.model.dtype,
                             config.data.max_batch_tokens, config.data.sink_norm_ratio)
    layer = ev["layers"][str(config.layers[0])]
    out = {"checkpoint": ckpt.name, "tokens": progress["tokens"], "ran_out_of_data": progress.get("ran_out_of_data"),
           "train_tokens_per_s": fit_metrics.get("tokens_per_s"), "source": fit_metrics.get("source"),
           "eval_instances": ev["instances"], "eval_tokens": ev["tokens"],
           **{k: layer[k] for k in ("log2_mse", "log2_mse_special", "mse", "mse_special", "fvu", "l0",
                                     "dead_fraction_eval", "ce_loss_recovered", "sink_tokens")}}
    atomic_write_text(cached, json.dumps(out, indent=1))
    return out


# ------------------------------------------------------------------------------------------- report


def write_markdown(path: Path, result: dict) -> None:
    s = result["settings"]
    lines = ["# FAST vs block training (BT) on a real instruct model", "",
             f"{s['model_name']}, residual stream after layer {s['layer']}, {s['d_sae']} latents "
             f"({s['d_sae'] // s['d_in']}×), {s['tokens']:,} training tokens per SAE ({-(-s['tokens'] // s['batch_size']):,} "
             f"optimizer steps of {s['batch_size']:,} tokens), BT blocks of {s['block_len']}, "
             f"normalize_activations {s['normalize_activations']}, attention sinks (norm > {s['sink_norm_ratio']} × "
             f"median) excluded. Evaluated on {s['eval_instances']} held-out chat instances, each alone in its "
             "template. log2 MSE: FAST eq. 7 (lower is better); _st: special tokens only.", "",
             "| feeding | " + " | ".join(f"{a} log2 MSE | {a} log2 MSE_st | {a} FVU | {a} L0" for a in s["archs"])
             + " | paper log2 MSE_st (Qwen2.5-7B-Instruct, Standard) |",
             "|---|" + "---|" * (4 * len(s["archs"]) + 1)]
    for mode in MODES:
        cells = []
        for arch in s["archs"]:
            r = result["results"].get(arch, {}).get(mode)
            cells += ["–"] * 4 if r is None else [f"{r['log2_mse']:.4f}", f"{r['log2_mse_special']:.4f}",
                                                  f"{r['fvu']:.4f}", f"{r['l0']:.1f}"]
        lines.append(f"| {mode} | " + " | ".join(cells) + f" | {PAPER['log2_mse_special'][mode]} |")
    lines += ["", "Harvest (Ray Data actor pool, per feeding mode): " + "; ".join(
        f"{m}: {h.get('tokens', 0):,} tokens at {h['tokens_per_s']:.0f} tok/s" if h.get("tokens_per_s")
        else f"{m}: from cache" for m, h in result["harvest"].items()), ""]
    atomic_write_text(path, "\n".join(lines))


def _init_ray_retrying(init_ray, config, attempts: int = 3) -> None:
    """On a loaded box the raylet can miss its start-up deadline: try a few times (as bench/harvest.py does)."""
    import ray

    for attempt in range(attempts):
        try:
            init_ray(config)
            return
        except Exception:  # noqa: BLE001 - "The current node timed out during startup"
            ray.shutdown()
            if attempt == attempts - 1:
                raise
            time.sleep(10)


def main(argv=None) -> dict:
    from saefd_ray.errors import exit_on_user_error

    return exit_on_user_error(_main)(argv)


def _main(argv=None) -> dict:
    from saefd_ray.models.loading import load_tokenizer, resolve_model_path
    from saefd_ray.stream.config import load_sae_config
    from saefd_ray.stream.plan import load_instances
    from saefd_ray.stream.run import init_ray, model_dims

    args = parse_args(argv)
    base = load_sae_config(args.config, args.overrides)
    tokens = args.tokens or base.training.tokens
    coefficients = {}
    for item in args.coefficient:
        arch, _, value = item.partition("=")
        coefficients[arch] = float(value)
    cache = Path(args.cache).expanduser().resolve()
    model_path = resolve_model_path(base.model)
    tokenizer = load_tokenizer(model_path, require_chat_template=True)
    d_in, _ = model_dims(model_path)
    train, held = load_instances(base)
    data_root = Path(base.data.data_root or ".").expanduser().resolve()
    cover = tokens + base.training.buffer_tokens  # the mixing buffer holds back up to half its capacity
    feeds = {
        "FAST": fast_instances(tokenizer, train, base.data.max_len, cover),
        "BT(F)": bt_f_instances(tokenizer, train, base.data.max_len, args.block_len, cover),
        "BT(P)": bt_p_instances(tokenizer, plain_texts(data_root, base.data.seed), args.block_len, cover),
    }
    print(f"[fast_vs_bt] {tokens:,} tokens per SAE; instances: "
          + ", ".join(f"{m} {len(v)}" for m, v in feeds.items()) + f"; {len(held)} held-out chat instances", flush=True)
    _init_ray_retrying(init_ray, base)
    result = {"paper": PAPER, "harvest": {}, "results": {}, "settings": {
        "model_name": base.model.name_or_path, "layer": base.layers[0], "d_in": d_in,
        "d_sae": base.sae.width or base.sae.expansion * d_in, "tokens": tokens, "block_len": args.block_len,
        "batch_size": base.training.batch_size, "archs": args.archs, "coefficients": coefficients, "normalize_activations": base.sae.normalize_activations,
        "sink_norm_ratio": base.data.sink_norm_ratio, "eval_instances": len(held), "max_len": base.data.max_len}}
    out = Path(args.out)
    for mode, instances in feeds.items():
        digest = hashlib.sha256(json.dumps([mode, tokens, args.block_len, base.model_dump(mode="json"),
                                            [i["messages"] for i in instances[:50]], len(instances)],
                                           sort_keys=True).encode()).hexdigest()[:10]
        first = run_config(base, mode, args.archs[0], coefficients.get(args.archs[0]), tokens, cache, digest)
        result["harvest"][mode] = harvest_once(first, model_path, instances)
        print(f"[fast_vs_bt] {mode} harvest: {result['harvest'][mode]}", flush=True)
        for arch in args.archs:
            config = run_config(base, mode, arch, coefficients.get(arch), tokens, cache, digest)
            r = train_and_evaluate(config, model_path, d_in, instances, held)
            result["results"].setdefault(arch, {})[mode] = r
            print(f"[fast_vs_bt] {arch} {mode}: log2 MSE {r['log2_mse']:.4f}  log2 MSE_st {r['log2_mse_special']:.4f}"
                  f"  FVU {r['fvu']:.4f}  L0 {r['l0']:.1f}", flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out, json.dumps(result, indent=1))  # partial results survive an interruption
            write_markdown(out.with_suffix(".md"), result)
    print(f"[fast_vs_bt] wrote {out} and {out.with_suffix('.md')}", flush=True)
    return result


if __name__ == "__main__":
    main()
