"""Steer a model with SAE features (FAST §6): greedy generations with α·d_k added at the SAE's layer, side by side.

    python jobs/steer.py --config configs/sae_smollm2.yaml --top-features        # top-5 features of the chat tokens
    python jobs/steer.py --config configs/sae_smollm2.yaml --feature 1234 --alpha 0 4 8 16 \\
        --prompt "Write a haiku about autumn." --prompt "What is 12 * 7?"

The SAE is the run's latest checkpoint (`<output.root>/<run_name>/checkpoints/...`, from jobs/train_sae.py) or
`--sae <folder>`; the model is the config's (named models resolve as in training). `--top-features` lists, for
`<|im_start|>`, `<|im_end|>`, `user` and `assistant`, the top-5 features by average max activation over
`--instances` training instances (default 1000) and writes <run_dir>/special_features.{json,md}; without
`--feature`, steering uses the top feature of `--token` from that file. Generations go to
<run_dir>/steer.md (or `--out`): one table per feature, a row per prompt, a column per α.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from saefd_ray.errors import ArgumentParser, ConfigError, exit_on_user_error  # noqa: E402
from saefd_ray.stream.config import load_sae_config  # noqa: E402

DEFAULT_PROMPTS = ["What is the capital of France?", "Write one sentence about the sea.", "List three colours."]


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="the SAE run's config (jobs/train_sae.py)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--sae", help="SAE folder (SAELens layout); default: the run's latest checkpoint")
    p.add_argument("--layer", type=int, help="default: the config's first layer")
    p.add_argument("--top-features", action="store_true", help="write special_features.{json,md} first")
    p.add_argument("--instances", type=int, default=1000, help="training instances for --top-features")
    p.add_argument("--feature", type=int, nargs="*", default=[], help="feature ids to steer with")
    p.add_argument("--token", default="<|im_end|>", help="without --feature: steer with this token's top feature")
    p.add_argument("--alpha", type=float, nargs="+", default=[0.0, 4.0, 8.0, 16.0])
    p.add_argument("--prompt", action="append", default=[])
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--out", help="markdown file (default <run_dir>/steer.md)")
    return p.parse_args(argv)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "⏎ ").strip() or "∅"


@exit_on_user_error
def main(argv=None) -> Path:
    import torch

    from saefd_ray.io import atomic_write_text
    from saefd_ray.models.loading import check_layer, load_model, load_tokenizer, resolve_model_path
    from saefd_ray.sae.formats import load_saelens
    from saefd_ray.sae.special_features import steered_generate, top_features
    from saefd_ray.stream.harvest import render
    from saefd_ray.stream.plan import load_instances
    from saefd_ray.stream.run import tokenizer_texts
    from saefd_ray.stream.checkpoint import latest_checkpoint

    args = parse_args(argv)
    config = load_sae_config(args.config, args.overrides)
    layer = config.layers[0] if args.layer is None else args.layer
    if args.sae:
        folder = Path(args.sae)
    else:
        ckpt = latest_checkpoint(config.run_dir)
        if ckpt is None:
            raise ConfigError(f"{config.run_dir}: no SAE checkpoint; run jobs/train_sae.py first or pass --sae")
        folder = ckpt / f"layer_{layer}"
    sae = load_saelens(folder).eval()
    model_path = resolve_model_path(config.model, tokenizer_texts(config))
    tokenizer = load_tokenizer(model_path, require_chat_template=True)
    model = load_model(model_path, config.model.dtype).eval()
    check_layer(model, layer, "--layer")
    torch.manual_seed(0)
    features_path = config.run_dir / "special_features.json"
    if args.top_features:
        train, _ = load_instances(config, limit=args.instances)  # the first training instances, in id order
        seqs = [render(tokenizer, json.loads(i["messages"]), config.data.max_len) for i in train]
        table = top_features(model, tokenizer, sae, layer, seqs)
        atomic_write_text(features_path, json.dumps({"sae": str(folder), "layer": layer, "instances": len(seqs),
                                                     "tokens": table}, indent=1))
        lines = [f"# Special-token features (FAST §6): `{folder}`, layer {layer}, {len(seqs)} training instances", "",
                 "| token | instances | top-5 features (mean max activation) |", "|---|---|---|"]
        for tok, row in table.items():
            feats = ", ".join(f"{f['feature']} ({f['mean_max_activation']:.3g})" for f in row["features"]) or "–"
            lines.append(f"| `{tok}` | {row['instances']} | {feats} |")
        atomic_write_text(features_path.with_suffix(".md"), "\n".join(lines) + "\n")
        print(f"[steer] wrote {features_path.with_suffix('.md')}", flush=True)
    features = list(args.feature)
    if not features:
        if not features_path.is_file():
            if args.top_features:
                return features_path
            raise ConfigError("--feature: give feature ids, or run with --top-features first")
        row = json.loads(features_path.read_text())["tokens"].get(args.token, {})
        if not row.get("features"):
            raise ConfigError(f"--token {args.token!r}: no features listed in {features_path}")
        features = [row["features"][0]["feature"]]
    for k in features:
        if not 0 <= k < sae.cfg.d_sae:
            raise ConfigError(f"--feature {k}: out of range for an SAE with {sae.cfg.d_sae} features")
    prompts = args.prompt or DEFAULT_PROMPTS
    lines = [f"# Steering with SAE features: `{folder}`, layer {layer}", "",
             "Greedy decoding; α·d_k added to the residual stream after the layer at every position "
             "(d_k: the SAE's decoder row, raw activation units).", ""]
    for k in features:
        direction = sae.W_dec[k].detach()
        lines += [f"## feature {k} (‖d_k‖ = {float(direction.norm()):.4g})", "",
                  "| prompt | " + " | ".join(f"α = {a:g}" for a in args.alpha) + " |",
                  "|---|" + "---|" * len(args.alpha)]
        for prompt in prompts:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                tokenize=True)
            ids = ids if isinstance(ids, list) else ids["input_ids"]
            gens = steered_generate(model, tokenizer, ids, layer, direction, args.alpha, args.max_new_tokens)
            cells = [_cell(tokenizer.decode(gens[a], skip_special_tokens=False)) for a in args.alpha]
            lines.append(f"| {_cell(prompt)} | " + " | ".join(cells) + " |")
        lines.append("")
    out = Path(args.out) if args.out else config.run_dir / "steer.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "\n".join(lines))
    print(f"[steer] wrote {out}", flush=True)
    return out


if __name__ == "__main__":
    main()
