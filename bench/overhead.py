"""Benchmark: per-step training overhead of the continual-learning methods relative to SeqLoRA.

Same tiny model (configs/demo.yaml's), same data, same batch: the second task of the sequence is trained with
each method's state from the first task in place (SAE-FD anchors, sae_reg mask, EWC Fisher, LwF's previous
adapter). A step is what the worker does: forward with labels, `method.regularizer`, backward, AdamW step,
zero_grad. Methods are interleaved round by round (every round times `--steps` steps of each method, in a
rotating order), so machine noise hits all alike; the reported figure is the median step time per method and
its ratio to SeqLoRA's. One process, `--threads` torch threads (1 = what a Ray worker with one CPU gets);
DeepSpeed is left out: it adds the same per-step work to every method.

    python bench/overhead.py [--rounds 7] [--steps 20] [--threads 1] [--out bench/results/overhead.json]
    python bench/overhead.py --methods seq_lora,sae_fd --set model.tiny.hidden_size=512 --set model.tiny.num_layers=8 \
        --set model.tiny.intermediate_size=1376 --set model.tiny.num_heads=8 --out bench/results/overhead_wide.json
    python bench/overhead.py --config configs/bench/overhead_smollm2.yaml \
        --sae runs/sae_smollm2_c2/checkpoints/tok_000000823296/layer_12 --out bench/results/overhead_smollm2.json \
        --methods seq_lora,sae_fd_anchor1=sae_fd:method.anchor_batch=1,sae_fd,sae_fd_anchor4=sae_fd:method.anchor_batch=4

Without `--sae` a random Gated SAE (8 × hidden) sits at mid-depth (layer n_layers/2 − 1), so the anchor pass runs
half the layers whatever the model; `--sae` takes a trained one (SAELens folder) at the layer its metadata names —
on SmolLM2 (layer 12 of 30, codes at trained sparsity) that is what the CL suite's sae_fd runs.

Target (issue 5): SAE-FD ≤ 1.15× SeqLoRA (the paper reports 1.85×).
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import exit_2_on_error, positive_int  # noqa: E402
from saefd_ray.config import SaeSource, load_config  # noqa: E402
from saefd_ray.errors import ArgumentParser, exit_on_user_error  # noqa: E402
from saefd_ray.data.render import collate, encode  # noqa: E402
from saefd_ray.data.tasks import load_tasks  # noqa: E402
from saefd_ray.methods import build_method  # noqa: E402
from saefd_ray.methods.base import ADAPTER, TaskContext, peft_key, trainable_params  # noqa: E402
from saefd_ray.models.loading import load_model, load_tokenizer, resolve_model_path  # noqa: E402
from saefd_ray.methods.sae_source import read_sae_header  # noqa: E402
from saefd_ray.sae import SAEConfig, build_sae, save_saelens  # noqa: E402
from saefd_ray.sae.formats import load_saelens  # noqa: E402
from saefd_ray.train.sequence import tokenizer_corpus  # noqa: E402

# label[=method[:key=value;key=value]]: a variant of a method under its own label
DEFAULT_METHODS = ["seq_lora", "sae_fd", "sae_fd_anchor4=sae_fd:method.anchor_batch=4", "sae_reg", "ewc", "lwf"]


def parse_spec(spec: str) -> tuple[str, str, list[str]]:
    label, _, rest = spec.partition("=")
    if not rest:
        return label, label, []
    name, _, sets = rest.partition(":")
    return label, name, [s for s in sets.split(";") if s]


def check_arguments(args) -> list[str]:
    """The method specs (seq_lora first), each checked as the run config it becomes; `--set` keys and `--out` too.
    Every problem is one `error:` line (exit 2) naming the flag, before anything loads or is written."""
    from saefd_ray.methods import METHODS

    specs = [spec.strip() for spec in args.methods.split(",") if spec.strip()]
    if not specs:
        raise SystemExit(f"error: --methods {args.methods!r}: expected a comma list of methods, one of "
                         f"{', '.join(METHODS)}")
    specs = specs if "seq_lora" in specs else ["seq_lora"] + specs
    for spec in specs:
        label, name, variant = parse_spec(spec)
        if name not in METHODS:
            raise SystemExit(f"error: --methods {spec}: unknown method {name!r}; one of {', '.join(METHODS)}")
        for key in variant:
            load_config(args.config, [f"method.name={name}", key], flags=[f"--methods {label}"] * 2)
    for text in args.overrides:
        prefix, sep, rest = text.partition(":")
        if sep and "=" not in prefix:  # METHOD:method.x=v
            if prefix not in METHODS:
                raise SystemExit(f"error: --set {text}: unknown method {prefix!r}; one of {', '.join(METHODS)}")
            load_config(args.config, [f"method.name={prefix}", rest], flags=["--set", "--set"])
        elif not text.startswith(("training.", "lora.", "model.")):
            raise SystemExit(f"error: --set {text}: expected training.x=v, lora.x=v, model.x=v or METHOD:method.x=v")
        else:
            load_config(args.config, [text])
    try:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SystemExit(f"error: --out {args.out}: cannot write there ({err.strerror or err})") from None
    return specs


def setup(spec: str, config_path: str | None, overrides: list[str], model_path: str, tasks, sae_dir: Path, layer: int,
          work: Path, batches):
    """Model + method as the worker has them at the start of task 2, with task 1's state on disk."""
    label, name, variant = parse_spec(spec)
    extra = [f"method.name={name}"]
    if name in ("sae_fd", "sae_reg"):
        extra += [f"method.sae.path={sae_dir}", f"method.sae.layer={layer}"]
    config = load_config(config_path, extra + [o for o in overrides if o.startswith(("training.", "lora."))]
                         + [o.split(":", 1)[1] for o in overrides if o.startswith(name + ":")] + variant)
    tokenizer = load_tokenizer(model_path)
    state1, state2 = work / label / "t1", work / label / "t2"
    state1.mkdir(parents=True)
    state2.mkdir(parents=True)

    def ctx(index, state_in, state_out):
        return TaskContext(config=config, task_index=index, task_names=[t.name for t in tasks], model_path=model_path,
                           tokenizer=tokenizer, state_in=state_in, state_out=state_out,
                           train_examples=tasks[index].train, past_tasks=tasks[:index], tasks=tasks)

    # task 1: a LoRA that moved (random B), the method's after_task writes its state
    torch.manual_seed(0)
    method1 = build_method(config)
    c1 = ctx(0, None, state1)
    model = method1.prepare_model(load_model(model_path), c1)
    method1.load_state(c1)
    with torch.no_grad():
        for n, p in trainable_params(model):
            if "lora_B" in n:
                p.normal_(0, 0.02)
    if name == "sae_reg":
        method1.regularizer(model, batches[0], torch.tensor(1.0))
    method1.after_task(model, c1)
    from safetensors.torch import save_file

    (state1 / ADAPTER).mkdir()
    save_file({peft_key(n): p.detach().clone() for n, p in trainable_params(model)},
              str(state1 / ADAPTER / "adapter_model.safetensors"))
    model.peft_config["default"].save_pretrained(str(state1 / ADAPTER))
    # task 2: what the worker builds
    torch.manual_seed(1)
    method = build_method(config)
    c2 = ctx(1, state1, state2)
    model = method.prepare_model(load_model(model_path), c2)
    method.load_state(c2)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, method, optimizer


def step(model, method, optimizer, batch) -> None:
    task_loss = model(**batch).loss
    extra, _ = method.regularizer(model, batch, task_loss)
    total = task_loss if extra is None else task_loss + extra
    total.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@exit_2_on_error
@exit_on_user_error
def main(argv=None) -> dict:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="run config (default configs/demo.yaml)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help="comma-separated; label=method:key=v;key=v defines a variant")
    parser.add_argument("--rounds", type=positive_int, default=7)
    parser.add_argument("--steps", type=positive_int, default=20)
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--d-sae", type=positive_int, default=None, help="random SAE's width (default 8 × hidden)")
    parser.add_argument("--sae", default=None, help="a trained SAE folder (SAELens layout), used at the layer its "
                        "metadata names; default: a random Gated SAE at mid-depth")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="training.x=v / lora.x=v / model.x=v for all, or METHOD:method.x=v for one "
                             "(e.g. sae_fd:method.anchor_batch=2; model.tiny.hidden_size=512 for a wider model)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "overhead.json"))
    args = parser.parse_args(argv)
    specs = check_arguments(args)  # every typo, before the model loads and before --out is touched
    torch.set_num_threads(args.threads)
    names = [parse_spec(s)[0] for s in specs]

    base_cfg = load_config(args.config, [o for o in args.overrides if o.startswith(("training.", "lora.", "model."))])
    tasks = load_tasks(base_cfg)[:2]
    model_path = resolve_model_path(base_cfg.model, tokenizer_corpus(load_tasks(base_cfg)))
    tokenizer = load_tokenizer(model_path)
    if args.sae and not (Path(args.sae) / "cfg.json").is_file():  # before the model loads
        raise SystemExit(f"error: --sae {args.sae}: expected an SAE folder (SAELens layout: cfg.json)")
    model_config = load_model(model_path).config
    hidden = model_config.hidden_size
    layer = model_config.num_hidden_layers // 2 - 1  # mid-depth: the anchor pass runs half the layers
    if args.sae:
        source = SaeSource(path=str(Path(args.sae).resolve()), layer=0)
        d_in, named = read_sae_header(source, "--sae")
        if named is None or d_in != hidden:
            raise SystemExit(f"error: --sae {args.sae}: expected an SAE of d_in {hidden} naming its layer "
                             f"(has d_in {d_in}, layer {named})")
        layer = named
    t = base_cfg.training
    encoded = [encode(tokenizer, e, t.max_prompt_len, t.max_answer_len) for e in tasks[1].train]
    rng = random.Random(0)
    batches = [collate(rng.sample(encoded, t.batch_size), tokenizer.pad_token_id) for _ in range(args.steps)]

    work = Path(tempfile.mkdtemp(prefix="saefd-overhead-"))
    if args.sae:
        sae_dir = Path(args.sae).resolve()
        sae_cfg = load_saelens(sae_dir).cfg
    else:
        sae_cfg = SAEConfig("gated", hidden, args.d_sae or 8 * hidden,
                            metadata={"hook_name": f"blocks.{layer}.hook_resid_post"})
        sae = build_sae(sae_cfg, seed=0)
        with torch.no_grad():
            sae.b_gate.fill_(0.05)
        sae_dir = save_saelens(sae, work / "sae")
    runs = {parse_spec(s)[0]: setup(s, args.config, args.overrides, model_path, tasks, sae_dir, layer, work, batches)
            for s in specs}

    for name in names:  # warm-up
        for batch in batches[:3]:
            step(*runs[name], batch)
    times: dict[str, list[float]] = {n: [] for n in names}
    round_ratio: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        this_round = {}
        for name in order:
            spent = []
            for batch in batches:
                began = time.perf_counter()
                step(*runs[name], batch)
                spent.append(time.perf_counter() - began)
            times[name] += spent
            this_round[name] = statistics.median(spent)
        for name in names:  # paired within a round: robust to load that drifts between rounds
            round_ratio[name].append(this_round[name] / this_round["seq_lora"])
    median = {n: statistics.median(v) for n, v in times.items()}
    base = median["seq_lora"]
    fd_cfg = runs["sae_fd"][1].cfg if "sae_fd" in runs else None
    result = {
        "target": {"sae_fd_ratio_max": 1.15, "paper_ratio": 1.85},
        "ratio_vs_seq_lora": {n: round(median[n] / base, 4) for n in names},
        "median_step_ms": {n: round(1000 * median[n], 3) for n in names},
        "median_of_round_ratios": {n: round(statistics.median(round_ratio[n]), 4) for n in names},
        "setup": {
            "model": base_cfg.model.name_or_path, "hidden": hidden, "layers": model_config.num_hidden_layers,
            "batch_size": t.batch_size, "mean_tokens_per_example": round(sum(len(e.input_ids) for e in encoded) / len(encoded), 1),
            "sae": {"architecture": sae_cfg.architecture, "d_sae": sae_cfg.d_sae, "layer": layer,
                    "trained": str(args.sae) if args.sae else None},
            "sae_fd": {"anchor_batch": fd_cfg.anchor_batch, "anchor_size": fd_cfg.anchor_size} if fd_cfg else None,
            "methods": specs,
            "rounds": args.rounds, "steps_per_round": args.steps, "threads": args.threads, "overrides": args.overrides,
        },
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
                    "cpu_count": os.cpu_count(), "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for n in names:
        print(f"{n:16s} {1000 * median[n]:8.2f} ms/step  ×{median[n] / base:.3f}  "
              f"(median of per-round ratios ×{statistics.median(round_ratio[n]):.3f})")
    print(f"results: {args.out}")
    return result


if __name__ == "__main__":
    main()
