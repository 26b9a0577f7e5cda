"""Diagnostic: how far each layer's residual stream moves on an earlier task's anchors while later tasks train.

SAE-FD holds the SAE codes of one layer in place on a few anchor instances. Whether that protects the task depends
on where the forgetting happens: if layer L (the SAE's) barely moves while the layers after it move a lot, the
distillation loss is small at every step, its adaptive λ sits at the clip, and the drift that costs accuracy
happens where nothing looks. This measures that on finished CL runs, with no training:

for each run, each anchor task k (the instances and token ids the sae_fd run stored, `sae_fd/anchors/`) and each
decoder layer l, the model after task k and the model after the last task (base + their LoRA adapters) read the
same tokens, and

    relative drift_l = mean over tokens of ‖h_l(last) − h_l(k)‖ / ‖h_l(k)‖    (h_l: residual after layer l)

with position 0 (the attention sink, norm ~100× any other) left out, as in SAE training. One process, no Ray.

    python bench/drift_by_layer.py                          # the CL suite's order-2 sae_fd and ewc runs
    python bench/drift_by_layer.py --runs RUN_DIR [RUN_DIR ...] --anchors-from SAE_FD_RUN_DIR

Writes bench/results/drift_by_layer.{json,md}.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import CACHE, REPO, RESULTS, exit_2_on_error, positive_int, read_json_file  # noqa: E402
from saefd_ray.errors import ArgumentParser  # noqa: E402
from saefd_ray.io import atomic_write_text  # noqa: E402

DEFAULT_RUNS = ("o2/sae_fd", "o2/ewc")  # the same order, one with the SAE-FD loss and one without
REPORT = RESULTS / "cl4_smollm2.json"


def run_dirs(keys: list[str]) -> list[Path]:
    """The cache folders of runs the committed CL report names (bench/cache/runs/...)."""
    runs = read_json_file(REPORT, "the CL suite's report")["runs"]
    missing = [k for k in keys if k not in runs]
    if missing:
        raise SystemExit(f"error: {REPORT}: no run {missing[0]}")
    for key in keys:
        if not (REPO / runs[key]["run_dir"] / "config.json").is_file():
            raise SystemExit(f"error: {runs[key]['run_dir']}: the report's {key} run is not in this clone's cache; "
                             f"run `bench/cl_replication.py --model smollm2` first, or name run dirs with --runs")
    return [REPO / runs[k]["run_dir"] for k in keys]


def stage_folders(run_dir: Path) -> list[Path]:
    folders = sorted(p for p in (run_dir / "tasks").glob("[0-9][0-9]-*") if (p / "adapter").is_dir())
    if len(folders) < 2:
        raise SystemExit(f"error: {run_dir}: expected a finished run with an adapter per task (tasks/NN-name/adapter)")
    return folders


def read_anchors(run_dir: Path) -> dict[str, list[torch.Tensor]]:
    """Token ids of every anchor instance of every earlier task, as the sae_fd run stored them (last stage's set)."""
    from safetensors.torch import load_file

    files = sorted(stage_folders(run_dir)[-1].glob("sae_fd/anchors/*.safetensors"))
    if not files:
        raise SystemExit(f"error: {run_dir}: no sae_fd/anchors in its last task folder (expected an sae_fd run)")
    anchors = {}
    for path in files:
        tensors = load_file(str(path))
        anchors[path.stem.split("-", 1)[1]] = list(torch.split(tensors["input_ids"].long(), tensors["lengths"].tolist()))
    return anchors


@torch.no_grad()
def residuals(model, instances: list[torch.Tensor], n_layers: int) -> list[list[torch.Tensor]]:
    """Per instance, the residual after every decoder layer [seq - 1, d] (position 0 left out)."""
    from saefd_ray.models.loading import residual_stream

    out = []
    for ids in instances:
        acts = residual_stream(model, ids[None], None, list(range(n_layers)))
        out.append([acts[layer][0, 1:].float() for layer in range(n_layers)])
    return out


def drift(a: list[list[torch.Tensor]], b: list[list[torch.Tensor]], layer: int) -> float:
    """Mean over tokens of ‖b − a‖ / ‖a‖ at `layer`."""
    ratios = torch.cat([(y[layer] - x[layer]).norm(dim=-1) / x[layer].norm(dim=-1).clamp_min(1e-6)
                        for x, y in zip(a, b)])
    return float(ratios.mean())


def measure(run_dir: Path, anchors: dict[str, list[torch.Tensor]]) -> dict:
    from peft import PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file

    from saefd_ray.config import RunConfig
    from saefd_ray.models.loading import load_model, resolve_model_path

    config = RunConfig.model_validate(read_json_file(run_dir / "config.json", "a run's config.json")["config"])
    folders = stage_folders(run_dir)
    model = load_model(resolve_model_path(config.model)).eval()
    n_layers = model.config.num_hidden_layers
    model = PeftModel.from_pretrained(model, str(folders[0] / "adapter")).eval()

    def at(folder: Path, instances):
        set_peft_model_state_dict(model, load_file(str(folder / "adapter" / "adapter_model.safetensors")))
        return residuals(model, instances, n_layers)

    tasks = {}
    for folder in folders[:-1]:
        name = folder.name.split("-", 1)[1]
        if name not in anchors:
            continue
        own, last = at(folder, anchors[name]), at(folders[-1], anchors[name])
        tasks[name] = [drift(own, last, layer) for layer in range(n_layers)]
    return {"run": run_dir.name,  # named by the hash of its settings (bench/common.py run_yaml), on any clone
            "method": config.method.name, "sae_layer": getattr(getattr(config.method, "sae", None), "layer", None),
            "after": folders[-1].name.split("-", 1)[1], "drift": tasks,
            "mean": [statistics.fmean(d[layer] for d in tasks.values()) for layer in range(n_layers)]}


def markdown(result: dict) -> str:
    runs = result["runs"]
    layer = next((r["sae_layer"] for r in runs if r["sae_layer"] is not None), None)
    lines = ["# Residual drift by layer on earlier tasks' anchors", "",
             f"Relative drift ‖h(after {runs[0]['after']}) − h(after task k)‖ / ‖h(after task k)‖ of the residual "
             "after each decoder layer, on the anchor instances sae_fd stored for each earlier task k (token "
             "mean, the attention-sink position left out), averaged over k. `bench/drift_by_layer.py`; no training.",
             "", "| layer | " + " | ".join(f"{r['method']}" for r in runs) + " |",
             "|---|" + "---|" * len(runs)]
    for i in range(len(runs[0]["mean"])):
        mark = " **(SAE)**" if i == layer else ""
        lines.append(f"| {i}{mark} | " + " | ".join(f"{r['mean'][i]:.3f}" for r in runs) + " |")
    lines += ["", "Per anchor task (layer " + str(layer) + " → last layer):", ""]
    for r in runs:
        for task, values in r["drift"].items():
            lines.append(f"- {r['method']}, {task}: {values[layer]:.3f} → {values[-1]:.3f}")
    return "\n".join(lines) + "\n"


@exit_2_on_error
def main(argv=None) -> dict:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=None, help="finished CL run dirs (default: the report's "
                        + ", ".join(DEFAULT_RUNS) + ")")
    parser.add_argument("--anchors-from", default=None, help="an sae_fd run dir whose stored anchors are read "
                        "(default: the first of --runs that is an sae_fd run)")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "drift_by_layer"))
    args = parser.parse_args(argv)
    dirs = [Path(p).resolve() for p in args.runs] if args.runs else run_dirs(list(DEFAULT_RUNS))
    for run_dir in dirs:
        if not (run_dir / "config.json").is_file():
            raise SystemExit(f"error: {run_dir}: not a run dir (no config.json); the suite's runs live in {CACHE}")
    anchors = read_anchors(Path(args.anchors_from).resolve() if args.anchors_from else dirs[0])
    torch.set_num_threads(args.threads)
    result = {"anchors": {k: len(v) for k, v in anchors.items()}, "runs": [measure(d, anchors) for d in dirs]}
    out = Path(args.out)
    atomic_write_text(out.with_suffix(".json"), json.dumps(result, indent=1))
    atomic_write_text(out.with_suffix(".md"), markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
