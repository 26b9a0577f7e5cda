"""The CPU benchmark base model and its SAE, built once and cached under bench/cache/.

No pretrained LLM can be downloaded here, so the CL benchmarks run on the project's tiny Llama-architecture model
(`saefd_ray.models.tiny`, ≈7 M parameters with configs/bench/base.yaml), pre-trained — all weights, next-token LM
on each instance rendered alone through the chat template — for a bounded wall-clock time on general text: the
Lima *training* set (prompt + answer) and the *training* prompts of ../shared/data (trace/*/train.json,
cl_benchmark/*/train.json; prompts only, so no task label is ever seen). No test or eval split is read.

Then a FAST-style Gated SAE is trained on it with `jobs/train_sae.py` (configs/bench/sae.yaml: Lima in the chat
template) as a subprocess, for sae_fd and sae_reg.

    python bench/make_base.py                      # configs/bench/base.yaml: 15 min pre-training + SAE
    python bench/make_base.py --minutes 2 --sae-tokens 40000

Cache: bench/cache/base-<hash>/ (an HF folder: `model.name_or_path` can point at it; `base_meta.json` holds the
loss curve) and bench/cache/sae-<hash>/ (the train_sae run; the SAELens folder is `sae_path` in base_meta.json's
sibling `bench/cache/base-<hash>.json`). The hash covers the config and the budget, so changing either builds anew;
re-running with the same settings reuses both.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from saefd_ray.errors import ArgumentParser  # noqa: E402
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.common import CACHE, positive_int, read_yaml_file, resolve_repo_path  # noqa: E402

DEFAULT_CONFIG = REPO / "configs" / "bench" / "base.yaml"


# ------------------------------------------------------------------------------------------------- corpus


def corpus(cfg: dict) -> list[list[dict]]:
    """Chat messages of every pre-training instance: Lima train (user + assistant), task train prompts (user)."""
    root = resolve_repo_path(cfg["data"]["data_root"])
    rng = random.Random(f"bench-base:{cfg['pretrain']['seed']}")
    dialogues: list[list[dict]] = []
    for record in json.loads((root / cfg["data"]["lima"] / "train.json").read_text()):
        dialogues.append([{"role": "user", "content": record["prompt"]},
                          {"role": "assistant", "content": record["answer"]}])
    for source in cfg["data"]["prompt_sources"]:
        records = json.loads((root / source["path"] / "train.json").read_text())  # training split only
        field = "sentence" if source["format"] == "cl_benchmark" else "prompt"
        texts = [str(r[field]).strip() for r in records if str(r.get(field, "")).strip()]
        limit = cfg["data"]["max_per_source"]
        if len(texts) > limit:
            texts = rng.sample(texts, limit)
        dialogues += [[{"role": "user", "content": t}] for t in texts]
    rng.shuffle(dialogues)
    return dialogues


def base_key(cfg: dict) -> str:
    """Content hash of everything the base model depends on (config, budget, data file sizes)."""
    root = resolve_repo_path(cfg["data"]["data_root"])
    files = [cfg["data"]["lima"]] + [s["path"] for s in cfg["data"]["prompt_sources"]]
    sizes = {f: (root / f / "train.json").stat().st_size for f in files}
    keep = {k: cfg[k] for k in ("model", "data", "pretrain")}
    return hashlib.sha256(json.dumps([keep, sizes], sort_keys=True).encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------------------ pretrain


def render(tokenizer, messages: list[dict], max_len: int) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=False)
    if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids[:max_len])


def batches_of(lengths: list[int], batch_tokens: int, rng: random.Random) -> list[list[int]]:
    """Length-sorted windows cut into batches of at most `batch_tokens` padded tokens, in random order."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    batches, current, width = [], [], 0
    for i in order:
        new_width = max(width, lengths[i])
        if current and new_width * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current, new_width = [], lengths[i]
        current.append(i)
        width = new_width
    if current:
        batches.append(current)
    rng.shuffle(batches)
    return batches


def pretrain(model, tokenizer, dialogues: list[list[dict]], p: dict, log) -> dict:
    """Full-parameter next-token LM for `p['minutes']` of wall time; LR: warm-up, then cosine over the time budget."""
    import torch

    torch.manual_seed(p["seed"])
    torch.set_num_threads(p["threads"])
    ids = [render(tokenizer, d, p["max_len"]) for d in dialogues]
    ids = [x for x in ids if len(x) >= 2]
    log(f"[base] {len(ids)} instances, {sum(map(len, ids)):,} tokens per epoch")
    rng = random.Random(p["seed"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=p["lr"], weight_decay=p["weight_decay"],
                                  betas=(0.9, 0.95))
    budget = 60.0 * p["minutes"]
    began = time.time()
    step, tokens, epoch, curve, recent = 0, 0, 0, [], []
    model.train()
    while True:
        epoch += 1
        for batch in batches_of([len(x) for x in ids], p["batch_tokens"], rng):
            elapsed = time.time() - began
            if elapsed >= budget:
                model.eval()
                return {"steps": step, "tokens": tokens, "epochs_completed": epoch - 1, "seconds": round(elapsed, 1),
                        "curve": curve, "final_loss": float(sum(recent) / max(1, len(recent)))}
            frac = min(1.0, elapsed / budget)
            lr = p["lr"] * min(1.0, (step + 1) / p["warmup_steps"])
            if step >= p["warmup_steps"]:
                lr = p["lr_min"] + 0.5 * (p["lr"] - p["lr_min"]) * (1 + math.cos(math.pi * frac))
            for group in optimizer.param_groups:
                group["lr"] = lr
            width = max(len(ids[i]) for i in batch)
            input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
            attention = torch.zeros_like(input_ids)
            for row, i in enumerate(batch):
                input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
                attention[row, : len(ids[i])] = 1
            labels = input_ids.masked_fill(attention == 0, -100)
            loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += int(attention.sum())
            recent = (recent + [float(loss.detach())])[-50:]
            if step % 50 == 0:
                mean = sum(recent) / len(recent)
                curve.append({"step": step, "tokens": tokens, "s": round(time.time() - began, 1), "loss": round(mean, 4)})
                log(f"[base] step {step} tokens {tokens:,} loss {mean:.3f} lr {lr:.2e} ({time.time() - began:.0f}s)")


def build_base(cfg: dict, log=print) -> Path:
    """bench/cache/base-<hash>/: built once (tokenizer + random init via saefd_ray.models.tiny, then pre-training)."""
    from saefd_ray.config import TinyModelConfig
    from saefd_ray.models.loading import load_model, load_tokenizer
    from saefd_ray.models.tiny import build_tiny_model

    target = CACHE / f"base-{base_key(cfg)}"
    if (target / "config.json").is_file() and (target / "base_meta.json").is_file():
        log(f"[base] cached: {target}")
        return target
    began = time.time()
    dialogues = corpus(cfg)
    texts = [m["content"] for d in dialogues for m in d]
    init_dir = build_tiny_model(TinyModelConfig(**cfg["model"]), texts, CACHE / "init")  # tokenizer + random init
    tokenizer = load_tokenizer(str(init_dir))
    model = load_model(str(init_dir), "float32")
    n_params = sum(p.numel() for p in model.parameters())
    log(f"[base] init {init_dir} ({n_params / 1e6:.1f} M parameters, tokenizer {time.time() - began:.0f}s)")
    stats = pretrain(model, tokenizer, dialogues, cfg["pretrain"], log)
    CACHE.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=CACHE, prefix=".base-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        meta = {"parameters": n_params, "config": cfg, "pretrain": stats, "total_s": round(time.time() - began, 1)}
        (staging / "base_meta.json").write_text(json.dumps(meta, indent=1))
        if target.exists():
            shutil.rmtree(target)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"[base] saved {target} (loss {stats['final_loss']:.3f} after {stats['tokens']:,} tokens, {stats['seconds']}s)")
    return target


# ----------------------------------------------------------------------------------------------------- SAE


def build_sae(cfg: dict, base_dir: Path, log=print) -> Path:
    """Train (or resume / reuse) the SAE with jobs/train_sae.py; returns its SAELens folder for the configured layer."""
    s = cfg["sae"]
    sae_cfg = hashlib.sha256(resolve_repo_path(s["config"]).read_bytes()).hexdigest()[:6]  # its settings, too
    run_name = f"sae-{base_dir.name.removeprefix('base-')}-L{s['layer']}-{s['tokens']}-{sae_cfg}"
    run_dir = CACHE / run_name
    report = run_dir / "sae_report.json"
    if not report.is_file():
        command = [
            sys.executable, str(REPO / "jobs" / "train_sae.py"), "--config", str(resolve_repo_path(s["config"])),
            "--set", f"model.name_or_path={base_dir}", "--set", f"layers=[{s['layer']}]",
            "--set", f"training.tokens={s['tokens']}", "--set", f"output.root={CACHE}",
            "--set", f"output.run_name={run_name}",
            "--set", f"data.data_root={resolve_repo_path(cfg['data']['data_root'])}",
        ]
        log("[sae] " + " ".join(command))
        began = time.time()
        subprocess.run(command, check=True, cwd=REPO)
        log(f"[sae] trained in {time.time() - began:.0f}s")
    checkpoint = Path(json.loads(report.read_text())["checkpoint"])
    folder = checkpoint / f"layer_{s['layer']}"
    if not (folder / "cfg.json").is_file():
        raise SystemExit(f"error: {folder}: no SAE folder after jobs/train_sae.py")
    return folder


def ensure(config_path: Path = DEFAULT_CONFIG, minutes: float | None = None, sae_tokens: int | None = None,
           log=print) -> dict:
    """Build or reuse base model + SAE; returns {model, sae, layer, meta} (also written to bench/cache/base-<h>.json)."""
    cfg = read_yaml_file(config_path)
    if minutes is not None:
        cfg["pretrain"]["minutes"] = minutes
    if sae_tokens is not None:
        cfg["sae"]["tokens"] = sae_tokens
    cfg["pretrain"]["minutes"] = float(cfg["pretrain"]["minutes"])  # 15 (YAML) and 15.0 (CLI) hash alike
    cfg["sae"]["tokens"] = int(cfg["sae"]["tokens"])
    base_dir = build_base(cfg, log)
    sae_dir = build_sae(cfg, base_dir, log)
    meta = json.loads((base_dir / "base_meta.json").read_text())
    sae_report = json.loads((sae_dir.parent.parent.parent / "sae_report.json").read_text())
    info = {"model": str(base_dir), "sae": str(sae_dir), "layer": cfg["sae"]["layer"],
            "parameters": meta["parameters"], "pretrain": {k: v for k, v in meta["pretrain"].items() if k != "curve"},
            "sae_eval": sae_report.get("eval", {}).get("layers", {})}
    (CACHE / f"{base_dir.name}.json").write_text(json.dumps(info, indent=1))
    return info


def main(argv=None) -> dict:
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(DEFAULT_CONFIG))
    ap.add_argument("--minutes", type=float, default=None, help="pre-training wall-clock budget (default: config)")
    ap.add_argument("--sae-tokens", type=positive_int, default=None, help="SAE token budget (default: config)")
    args = ap.parse_args(argv)
    info = ensure(Path(args.config), args.minutes, args.sae_tokens)
    print(json.dumps(info, indent=1))
    return info


if __name__ == "__main__":
    main()
