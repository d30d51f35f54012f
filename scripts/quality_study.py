#!/usr/bin/env python
"""The quality study of issue 24 (logic: lightning_moe/evaluation/study.py): base, LoRA r16, LoRA at the design's
trainable-parameter count, LoRA + experts (token top-2) and the servable form, over seeds, each trained, evaluated
(counsel-chat's held-out split, ESConv, bias probes) and asked fixed prompts through train.py, evaluate.py and
generate.py. Steps whose outputs exist are skipped: rerun the same command to continue.

    python scripts/quality_study.py --model cache/models/smollm2-135m-instruct \\
        --out benchmarks/2026-12-06_smollm2_quality --seeds 0 1 2 \\
        --esconv data/generated/esconv.jsonl --esconv-sample 300 \\
        --crows-pairs ../shared/datasets/crows_pairs/crows_pairs_anonymized.csv \\
        --stereoset ../shared/datasets/stereoset/intrasentence_stereo_set.csv \\
        --train-args "trainer.accelerator=gpu model.dtype=bfloat16" --eval-args "device=cuda model.dtype=bfloat16"
    python scripts/quality_study.py --model DIR --out /tmp/q --smoke      # the machinery, tiny steps, CPU
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lightning_moe.cli import exit_on_user_error  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True, help="the converted model folder (scripts/get_model.py)")
    p.add_argument("--out", type=Path, required=True, help="results folder (raw evals, replies, results.json/.md)")
    p.add_argument("--runs", type=Path, default=REPO / "runs" / "quality_study", help="training runs (not committed)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, help="trainer.max_steps of every row (default: the recipes')")
    p.add_argument("--train-args", default="", help="overrides for train.py, e.g. 'trainer.accelerator=gpu'")
    p.add_argument("--eval-args", default="", help="overrides for evaluate.py and generate.py, e.g. 'device=cuda'")
    p.add_argument("--esconv", type=Path, help="converted ESConv (scripts/convert_esconv.py); none: left out")
    p.add_argument("--esconv-sample", type=int, help="a fixed sample of about N dialogues stratified by domain")
    p.add_argument("--crows-pairs", type=Path)
    p.add_argument("--stereoset", type=Path)
    p.add_argument("--probe-limit", type=int, help="the first N items of each probe set")
    p.add_argument("--max-new-tokens", type=int, default=160)
    p.add_argument("--rows", nargs="+", help="only these rows (default: all); e.g. one process per row and seed")
    p.add_argument("--matched-rank", type=int, help="the matched LoRA's rank if counted before (default: count it "
                                                     "from the first seed's LoRA r16 and design runs, run first)")
    p.add_argument("--probe-seeds", type=int, nargs="+", help="score the bias probes on these seeds' models only "
                                                               "(default: every seed)")
    p.add_argument("--smoke", action="store_true", help="tiny data and steps: check the machinery on a CPU")
    a = p.parse_args()
    from lightning_moe.evaluation.study import StudyOptions, run_study

    options = StudyOptions(model=a.model, out=a.out, runs=a.runs, seeds=a.seeds, steps=a.steps,
                           train_args=shlex.split(a.train_args), eval_args=shlex.split(a.eval_args), esconv=a.esconv,
                           esconv_sample=a.esconv_sample, crows_pairs=a.crows_pairs, stereoset=a.stereoset,
                           probe_limit=a.probe_limit, max_new_tokens=a.max_new_tokens, smoke=a.smoke,
                           rows=a.rows, matched_rank=a.matched_rank, probe_seeds=a.probe_seeds)
    exit_on_user_error(lambda: run_study(options, REPO))


if __name__ == "__main__":
    main()
