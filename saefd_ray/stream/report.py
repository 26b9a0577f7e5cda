"""End-of-run SAE evaluation on held-out instances, written as `sae_report.json` + `sae_report.md` (atomically).

Held-out instances are rendered and run exactly as in training (per instance, truncated at max_len); per layer the
report has FAST's eq.-7 MSE (all tokens and special tokens only), FVU, L0, the dead fraction on the eval tokens and
in training (no firing within `dead_window_tokens`), and CE-loss recovered / KL with the SAE spliced into the model.
`sae_curves.png` draws the training curves from history.jsonl (per-step scalars are also in `tb/` for TensorBoard).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from saefd_ray.io import atomic_write_text


@torch.no_grad()
def evaluate_checkpoint(checkpoint: Path, model_path: str, instances: list[dict], layers: list[int], max_len: int,
                        dtype: str = "float32", batch_tokens: int = 8192, sink_ratio: float | None = None) -> dict:
    """Per layer: FVU, MSE, L0, ... over the held-out tokens that are not attention sinks (sae/sinks.py; all tokens
    when `sink_ratio` is None), the same with sinks (`*_with_sinks`) for comparison, and CE-loss recovered with the
    SAE spliced in everywhere but at the sinks (which keep their real activation)."""
    from saefd_ray.models.loading import load_model, load_tokenizer, residual_stream
    from saefd_ray.sae.evaluate import reconstruction_metrics, spliced_metrics
    from saefd_ray.sae.formats import load_saelens, load_trainer_state
    from saefd_ray.sae.sinks import sink_mask
    from saefd_ray.stream.harvest import plan_batches, render

    tokenizer = load_tokenizer(model_path)
    model = load_model(model_path, dtype).eval()
    special = torch.tensor(sorted(tokenizer.all_special_ids))
    ids = [render(tokenizer, json.loads(i["messages"]), max_len) for i in instances]
    plan = plan_batches([len(x) for x in ids], batch_tokens, 0.1)
    batches, seqs, masks = [], {layer: [] for layer in layers}, []
    sinks: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for b in plan:
        width = max(len(ids[i]) for i in b)
        input_ids = torch.full((len(b), width), tokenizer.pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(input_ids)
        for row, i in enumerate(b):
            input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
            attn[row, : len(ids[i])] = 1
        batches.append({"input_ids": input_ids, "attention_mask": attn})
        acts = residual_stream(model, input_ids, attn, layers)
        for row, i in enumerate(b):
            n = len(ids[i])
            for layer in layers:
                seqs[layer].append(acts[layer][row, :n].float())
                sinks[layer].append(sink_mask(acts[layer][row, :n], None, sink_ratio))
            masks.append(torch.isin(input_ids[row, :n], special))
    out: dict = {"instances": len(instances), "tokens": sum(len(x) for x in ids), "layers": {}}
    for layer in layers:
        folder = checkpoint / f"layer_{layer}"
        sae = load_saelens(folder).eval()
        keep = [~s for s in sinks[layer]]
        rec = reconstruction_metrics(sae, [x[k] for x, k in zip(seqs[layer], keep)], [m[k] for m, k in zip(masks, keep)])
        rec_all = reconstruction_metrics(sae, seqs[layer], masks) if sink_ratio else rec
        ce = spliced_metrics(model, sae, layer, batches, sink_passthrough(sae, sink_ratio))
        state_dir = folder if (folder / "trainer_state.pt").is_file() else None
        train_dead = None
        if state_dir is not None:
            st = load_trainer_state(state_dir)
            window = st["config"]["dead_window_tokens"]
            train_dead = float((st["tokens_since_fired"] >= window).float().mean())
        else:  # latent-sharded: one state per rank, each holding its slice's counters
            parts = sorted(folder.glob("rank*/trainer_state.pt"))
            if parts:
                states = [load_trainer_state(p.parent) for p in parts]
                window = states[0]["config"]["dead_window_tokens"]
                counters = torch.cat([s["tokens_since_fired"] for s in states])
                train_dead = float((counters >= window).float().mean())
        out["layers"][str(layer)] = {
            "architecture": sae.cfg.architecture, "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae,
            "fvu": rec["fvu"], "explained_variance": rec["explained_variance"], "l0": rec["l0"],
            "mse": rec["mse"], "log2_mse": rec["log2_mse"],
            "mse_special": rec.get("mse_special"), "log2_mse_special": rec.get("log2_mse_special"),
            "dead_fraction_eval": rec["dead_fraction"], "dead_fraction_train": train_dead,
            "ce_clean": ce["ce_clean"], "ce_sae": ce["ce_sae"], "ce_zero": ce["ce_zero"],
            "ce_loss_recovered": ce["ce_loss_recovered"], "kl": ce["kl"],
            "sink_tokens": int(sum(int(s.sum()) for s in sinks[layer])), "sink_norm_ratio": sink_ratio,
            "fvu_with_sinks": rec_all["fvu"], "mse_with_sinks": rec_all["mse"],
        }
    return out


def sink_passthrough(sae, ratio: float | None):
    """The CE splice: SAE reconstruction at every token but the attention sinks, which keep their activation."""
    from saefd_ray.sae.evaluate import reconstruct
    from saefd_ray.sae.sinks import sink_mask

    def fn(h: torch.Tensor) -> torch.Tensor:
        x_hat = reconstruct(sae, h.reshape(-1, h.shape[-1]))[0].reshape(h.shape).to(h.dtype)
        return torch.where(sink_mask(h, None, ratio).unsqueeze(-1), h, x_hat)

    return fn


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}"
    return str(v)


def describe_schedule(used: dict) -> str:
    """One line: the schedule a run used, and the configured lengths when they were scaled to fit it."""
    line = (f"schedule: {used['total_steps']} steps; LR warm-up {used['lr_warmup_steps']}, cosine, linear decay over "
            f"the last {used['lr_decay_steps']}; sparsity warm-up {used['sparsity_warmup_steps']}")
    if used["scaled"]:
        c = used["configured"]
        line += (f" (configured {c['lr_warmup_steps']} / {c['lr_decay_steps']} / {c['sparsity_warmup_steps']} do not "
                 f"fit the run: scaled ×{used['factor']:.4g})")
    return line


CURVES_PNG = "sae_curves.png"


def write_curves(run_dir: Path, layers: list[int]) -> Path | None:
    """sae_curves.png (loss, FVU, L0, dead % against tokens) from the run's history.jsonl, if it has one."""
    from saefd_ray.eval.plots import sae_curves
    from saefd_ray.io import atomic_write_bytes

    path = run_dir / "history.jsonl"
    if not path.is_file():
        return None
    history = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    png = sae_curves(history, layers)
    return atomic_write_bytes(run_dir / CURVES_PNG, png) if png is not None else None


def write_report(run_dir: Path, report: dict) -> tuple[Path, Path]:
    json_path = atomic_write_text(run_dir / "sae_report.json", json.dumps(report, indent=2, default=str))
    curves = write_curves(run_dir, [int(layer) for layer in report["eval"]["layers"]])
    lines = [f"# SAE report: {report.get('run_name', run_dir.name)}", ""]
    tr = report.get("training", {})
    lines += [f"- model: `{report.get('model')}`; architecture {report.get('architecture')}, "
              f"sharding {tr.get('sharding')} × {tr.get('workers')} workers",
              f"- trained on {tr.get('tokens', 0):,} tokens in {tr.get('steps')} steps "
              f"({_fmt(tr.get('tokens_per_s'))} tok/s){'; ran out of data' if tr.get('ran_out_of_data') else ''}",
              *([f"- {describe_schedule(tr['schedule'])}"] if tr.get("schedule") else []),
              f"- activation source: {report.get('source')}; padding waste of the bucketed forwards "
              f"{100 * report.get('padding', {}).get('padding_waste', 0):.1f}% "
              f"(unsorted: {100 * report.get('padding', {}).get('unsorted_padding_waste', 0):.1f}%)",
              f"- evaluation: {report['eval']['instances']} held-out instances, {report['eval']['tokens']:,} tokens",
              *_sink_lines(report),
              "", "| layer | FVU | L0 | dead % (train) | dead % (eval) | log2 MSE | log2 MSE special | CE recovered |",
              "|---|---|---|---|---|---|---|---|"]
    for layer, m in report["eval"]["layers"].items():
        dead_t = None if m["dead_fraction_train"] is None else 100 * m["dead_fraction_train"]
        lines.append(f"| {layer} | {_fmt(m['fvu'])} | {_fmt(m['l0'])} | {_fmt(dead_t)} | "
                     f"{_fmt(100 * m['dead_fraction_eval'])} | {_fmt(m['log2_mse'])} | "
                     f"{_fmt(m['log2_mse_special'])} | {_fmt(m['ce_loss_recovered'])} |")
    if curves is not None:
        lines += ["", "## Training curves", "", "Every step's scalars: `tensorboard --logdir tb` in this folder.", "",
                  f"![SAE training: loss, FVU, L0, dead %]({CURVES_PNG})"]
    md_path = atomic_write_text(run_dir / "sae_report.md", "\n".join(lines) + "\n")
    return json_path, md_path


def _sink_lines(report: dict) -> list[str]:
    """Attention sinks: how many were kept out, and what FVU / MSE read with them (they dwarf everything else)."""
    layers = report["eval"]["layers"]
    if not any(m.get("sink_norm_ratio") for m in layers.values()):
        return []
    ratio = next(m["sink_norm_ratio"] for m in layers.values())
    trained = report.get("training", {}).get("sink_tokens")
    parts = [f"layer {layer}: {m['sink_tokens']} eval sinks (FVU with them {_fmt(m['fvu_with_sinks'])}, "
             f"MSE {_fmt(m['mse_with_sinks'])})" for layer, m in layers.items()]
    return [f"- attention sinks (norm > {ratio:g} × sequence median) left out of training"
            f"{f' ({trained:,} rows)' if trained is not None else ''} and of every metric below; " + "; ".join(parts)]
