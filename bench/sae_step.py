"""Benchmark: one full SAE training step (forward, loss, backward, optimizer, post-processing) per architecture.

Issue 3 setting: d_in 512, d_sae 8192, 4096 tokens per step, fp32, CPU, 2 threads. When the optional ``bench`` extra
(sae-lens 6.54, eai-sparsify 1.3.3) is importable, the same run also times their step of the same architecture on the
same activation tensor, interleaving ours and theirs round by round so machine noise hits both alike, and prints the
our/their ratio. Results go to ``bench/results/sae_step.json``.

    python bench/sae_step.py [--rounds 5] [--archs topk,gated] [--out bench/results/sae_step.json]

What each "step" contains (all include forward, loss, backward, optimizer.step, zero_grad):
  ours      ``SAETrainer.step``: + decoder-grad projection, grad clipping, LR schedule, decoder renorm, dead counters,
            metrics (L0, FVU, loss terms).
  sae-lens  ``training_forward_pass`` + its trainer's firing statistics + clip_grad_norm_(1.0) + Adam (their
            ``SAETrainer._train_step`` minus logging/schedulers).
  sparsify  decoder renorm + ``SparseCoder.forward`` (fvu + AuxK) + did-fire mask + grad projection + Adam (their
            ``Trainer.fit`` inner step, local FVU loss).
"""
from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import choice_list, exit_2_on_error, positive_int  # noqa: E402
from saefd_ray.errors import ArgumentParser  # noqa: E402
from saefd_ray.sae import SAEConfig, build_sae  # noqa: E402
from saefd_ray.sae.trainer import SAETrainer, TrainerConfig  # noqa: E402

D_IN, D_SAE, N_TOK, K = 512, 8192, 4096, 32
ARCHS = ["standard", "gated", "jumprelu", "topk", "batchtopk"]


def ours(arch: str, x: torch.Tensor):
    cfg = SAEConfig(arch, D_IN, D_SAE, k=K if arch in ("topk", "batchtopk") else None)
    tr = SAETrainer(build_sae(cfg, seed=0), TrainerConfig(total_steps=1000, lr=1e-4, lr_warmup_steps=10,
                                                          sparsity_warmup_steps=10, b_dec_init="none"))
    return lambda: tr.step(x)


def saelens(arch: str, x: torch.Tensor):
    try:
        from sae_lens.saes.sae import TrainCoefficientConfig, TrainStepInput
    except Exception:  # noqa: BLE001 - optional extra
        return None
    if arch == "standard":
        from sae_lens.saes.standard_sae import StandardTrainingSAE as S, StandardTrainingSAEConfig as C
        cfg = C(d_in=D_IN, d_sae=D_SAE, l1_coefficient=5.0)
    elif arch == "gated":
        from sae_lens.saes.gated_sae import GatedTrainingSAE as S, GatedTrainingSAEConfig as C
        cfg = C(d_in=D_IN, d_sae=D_SAE, l1_coefficient=5.0)
    elif arch == "jumprelu":
        from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE as S, JumpReLUTrainingSAEConfig as C
        cfg = C(d_in=D_IN, d_sae=D_SAE, jumprelu_init_threshold=1e-3, jumprelu_bandwidth=1e-3, l0_coefficient=0.01)
    elif arch == "topk":
        from sae_lens.saes.topk_sae import TopKTrainingSAE as S, TopKTrainingSAEConfig as C
        cfg = C(d_in=D_IN, d_sae=D_SAE, k=K)
    else:
        from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE as S, BatchTopKTrainingSAEConfig as C
        cfg = C(d_in=D_IN, d_sae=D_SAE, k=K)
    torch.manual_seed(0)
    sae = S(cfg)
    coeffs = {k: (v.value if isinstance(v, TrainCoefficientConfig) else v) for k, v in sae.get_coefficients().items()}
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    since_fired = torch.zeros(D_SAE)
    freq = torch.zeros(D_SAE)

    def step():
        sae.train()
        out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients=coeffs, dead_neuron_mask=since_fired > 1e9,
                                                       n_training_steps=1, is_logging_step=False))
        with torch.no_grad():
            firing = out.feature_acts.bool().float()
            did_fire = firing.sum(-2).bool()
            since_fired.add_(1)
            since_fired[did_fire] = 0
            freq.add_(firing.sum(0))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()

    return step


def sparsify(arch: str, x: torch.Tensor):
    if arch != "topk":
        return None
    try:
        from sparsify import SparseCoder, SparseCoderConfig
    except Exception:  # noqa: BLE001 - optional extra
        return None
    torch.manual_seed(0)
    sae = SparseCoder(D_IN, SparseCoderConfig(num_latents=D_SAE, k=K))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    since_fired = torch.zeros(D_SAE, dtype=torch.long)

    def step():
        sae.set_decoder_norm_to_unit_norm()
        dead = since_fired > 10_000_000
        out = sae(x, dead_mask=dead)
        did_fire = torch.zeros(D_SAE, dtype=torch.bool)
        did_fire[out.latent_indices.flatten()] = True
        (out.fvu + out.auxk_loss / 32).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        since_fired.add_(x.shape[0])
        since_fired[did_fire] = 0

    return step


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


@exit_2_on_error
def main() -> None:
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=positive_int, default=5)
    ap.add_argument("--archs", default=",".join(ARCHS))
    ap.add_argument("--threads", type=positive_int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "sae_step.json"))
    args = ap.parse_args()
    archs = choice_list(args.archs, "--archs", ARCHS)
    try:  # before minutes of timing, not after
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SystemExit(f"error: --out {args.out}: cannot write there ({err.strerror or err})") from None
    torch.set_num_threads(args.threads)
    torch.manual_seed(1234)
    x = torch.randn(N_TOK, D_IN) * 2.0 + 0.5  # the same tensor for every implementation

    results = {}
    for arch in archs:
        impls = {"ours": ours(arch, x), "sae_lens": saelens(arch, x), "sparsify": sparsify(arch, x)}
        impls = {k: v for k, v in impls.items() if v is not None}
        times: dict[str, list[float]] = {k: [] for k in impls}
        for fn in impls.values():  # warm-up (allocator, first-step init)
            fn()
        for _ in range(args.rounds):
            for name, fn in impls.items():
                times[name].append(timed(fn))
        row = {name: {"median_s": statistics.median(ts), "tokens_per_s": N_TOK / statistics.median(ts),
                      "all_s": [round(t, 4) for t in ts]} for name, ts in times.items()}
        for other in ("sae_lens", "sparsify"):
            if other in row:
                row[f"ratio_vs_{other}"] = row["ours"]["tokens_per_s"] / row[other]["tokens_per_s"]
        results[arch] = row
        line = "  ".join(f"{n} {r['tokens_per_s']:8.0f} tok/s" for n, r in row.items() if isinstance(r, dict))
        ratios = "  ".join(f"{k} {v:.2f}x" for k, v in row.items() if k.startswith("ratio"))
        print(f"{arch:10s} {line}  {ratios}", flush=True)

    missing = [m for m in ("sae_lens", "sparsify") if not any(m in r for r in results.values())]
    out = {
        "setting": {"d_in": D_IN, "d_sae": D_SAE, "tokens_per_step": N_TOK, "k": K, "dtype": "float32",
                    "device": "cpu", "threads": args.threads, "rounds": args.rounds},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__},
        "missing_comparisons": missing,
        "results": results,
    }
    if missing:
        print(f"not installed, not compared: {', '.join(missing)} (pip install -e .[bench])")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
