"""Benchmark: option scoring with the prompt pass's LM head at the last position only vs at every position.

What an R-matrix row costs on the CL benchmark with SmolLM2-135M-Instruct (budget `smollm2` of
configs/bench/cl4.yaml: prompts cut to their last 128 tokens, answers to 8, evaluation batch 16): 16 test prompts
of each of the 4 tasks (64 in all), each task ranked over its own label options by `eval.scoring.option_scores`
on the model as a worker has it at stage 0 (LoRA-wrapped, `method.prepare_model`). "last" is the code as it is
(`logits_to_keep` = the last position); "full" runs the same function on the same model with `logits_to_keep`
forced to 0 (logits at every prompt position: the code before). The two are timed alternately round by round, in
one process with `--threads` torch threads (1 = what a Ray worker gets), so load drifting over the run hits both
alike; the figure is the ratio of the medians of the per-round times (and the median of per-round ratios).

    python bench/scoring.py [--rounds 5] [--threads 1] [--data-root ../shared/data] [--out bench/results/scoring.json]

The model must already be converted in `model.cache_dir` (`smollm2-135m-instruct`, models/registry.py): this
script never fetches it. The data are read from `--data-root`, never copied.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import positive_int  # noqa: E402
from saefd_ray.config import load_config  # noqa: E402
from saefd_ray.errors import ArgumentParser  # noqa: E402
from saefd_ray.data.render import prompt_ids  # noqa: E402
from saefd_ray.data.tasks import load_tasks  # noqa: E402
from saefd_ray.eval.scoring import option_scores  # noqa: E402
from saefd_ray.methods import build_method  # noqa: E402
from saefd_ray.methods.base import TaskContext  # noqa: E402
from saefd_ray.models.loading import load_model, load_tokenizer  # noqa: E402
from saefd_ray.models.registry import NAMED_MODELS, named_model_dir  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"


class FullLogits(torch.nn.Module):
    """The model with `logits_to_keep` forced to 0: the LM head over every prompt position (the code before)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **kwargs):
        return self.model(**{**kwargs, "logits_to_keep": 0})


def main(argv=None) -> dict:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=positive_int, default=5)
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--per-task", type=positive_int, default=16, help="test prompts per task (4 tasks)")
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "scoring.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    load_before = [round(x, 2) for x in os.getloadavg()]
    config = load_config(REPO / "configs" / "cl4.yaml", [
        f"tasks.data_root={args.data_root}", f"model.name_or_path={MODEL}", "model.dtype=float32",
        "distributed.use_gpu=false", "training.max_prompt_len=128", "training.max_answer_len=8",
        "evaluation.batch_size=16", "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
        *[f"tasks.sequence.{i}.max_train=8" for i in range(4)],
        *[f"tasks.sequence.{i}.max_test={args.per_task}" for i in range(4)]])
    model_path = named_model_dir(NAMED_MODELS[MODEL], config.model.cache_dir)
    if not (model_path / "config.json").is_file():
        raise SystemExit(f"error: {model_path}: not converted yet (run any job with model.name_or_path={MODEL})")
    tasks = load_tasks(config)
    tokenizer = load_tokenizer(str(model_path))
    ctx = TaskContext(config=config, task_index=0, task_names=[t.name for t in tasks], model_path=str(model_path),
                      tokenizer=tokenizer, state_in=None, state_out=Path("/nonexistent"))
    model = build_method(config).prepare_model(load_model(str(model_path)), ctx).eval()
    variants = {"last": model, "full": FullLogits(model)}
    cpu = torch.device("cpu")

    def score_all(which: str) -> tuple[float, list[torch.Tensor]]:
        began = time.perf_counter()
        scores = [option_scores(variants[which], tokenizer, task.test, task.options, config, cpu) for task in tasks]
        return time.perf_counter() - began, scores

    score_all("last")  # warm-up (allocator, first-call overheads)
    times: dict[str, list[float]] = {"last": [], "full": []}
    round_ratios, max_diff, same_choice = [], 0.0, True
    for r in range(args.rounds):
        this_round = {}
        for which in (("last", "full") if r % 2 == 0 else ("full", "last")):
            seconds, this_round[which] = score_all(which)
            times[which].append(seconds)
        round_ratios.append(times["full"][-1] / times["last"][-1])
        for kept, full in zip(this_round["last"], this_round["full"]):
            max_diff = max(max_diff, float((kept - full).abs().max()))
            same_choice &= bool(torch.equal(kept.argmax(-1), full.argmax(-1)))
    median = {k: statistics.median(v) for k, v in times.items()}
    prompts = [len(prompt_ids(tokenizer, e.prompt, 128)) for task in tasks for e in task.test]
    result = {
        "ratio_full_over_last": round(median["full"] / median["last"], 4),
        "median_of_round_ratios": round(statistics.median(round_ratios), 4),
        "median_s_per_row": {k: round(v, 3) for k, v in median.items()},
        "ms_per_prompt": {k: round(1000 * v / len(prompts), 2) for k, v in median.items()},
        "max_abs_score_difference": max_diff,
        "same_predictions": same_choice,
        "setup": {
            "model": MODEL, "tasks": {t.name: {"prompts": len(t.test), "options": len(t.options)} for t in tasks},
            "prompts": len(prompts), "mean_prompt_tokens": round(statistics.fmean(prompts), 1),
            "max_prompt_len": 128, "evaluation_batch_size": 16, "rounds": args.rounds, "threads": args.threads,
            "model_wrapped": "LoRA r 8 all-linear (B = 0), as at stage 0",
        },
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
                    "load_average_before": load_before, "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"last position only {median['last']:.2f} s/row, every position {median['full']:.2f} s/row: "
          f"full/last x{result['ratio_full_over_last']:.3f} (median of round ratios x{result['median_of_round_ratios']:.3f});"
          f" max |score diff| {max_diff:.2e}, same predictions {same_choice}; load {load_before} -> "
          f"{result['machine']['load_average_at_end']}")
    print(f"results: {args.out}")
    return result


if __name__ == "__main__":
    main()
