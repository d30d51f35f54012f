"""scripts/quality_study.py: every row trained, evaluated and asked its prompts through the project's own
commands, the raw evaluations and an aggregated table written, and a second call continuing instead of redoing.
The machinery runs on a tiny random model folder (--smoke: tiny data and steps); the study itself runs on the
real model (benchmarks/2026-12-06_smollm2_quality/README.md)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import COUNSEL_CHAT_CSV, REPO, run_script, tiny_model

STUDY = REPO / "scripts" / "quality_study.py"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A local model folder as scripts/get_model.py writes one (weights, tokenizer with its chat template)."""
    from transformers import AutoTokenizer

    from lightning_moe.paths import BUNDLED_TOKENIZER

    folder = tmp_path_factory.mktemp("tiny_model")
    tiny_model("tiny-llama").save_pretrained(folder)
    AutoTokenizer.from_pretrained(BUNDLED_TOKENIZER).save_pretrained(folder)
    return folder


def test_the_matched_rank_counts_parameters():
    from lightning_moe.evaluation.study import lora_rank_matching

    assert lora_rank_matching(design_params=6_650_000, lora_params_r16=4_884_480) == 22


def test_the_esconv_sample_is_fixed_and_stratified_by_domain(tmp_path):
    from lightning_moe.evaluation.study import stratified_sample

    source = tmp_path / "all.jsonl"
    shares = {"a": 300, "b": 90, "c": 3}
    source.write_text("".join(json.dumps({"id": f"{d}-{i}", "domain": d, "messages": []}) + "\n"
                              for d, n in shares.items() for i in range(n)))
    ids = stratified_sample(source, 100, tmp_path / "s1.jsonl")
    assert ids == stratified_sample(source, 100, tmp_path / "s2.jsonl")  # the same for every row and every call
    per_domain = {d: sum(i.startswith(f"{d}-") for i in ids) for d in shares}
    assert per_domain == {"a": 76, "b": 23, "c": 3}  # in proportion, small domains kept whole (at least 10 or all)


def test_a_model_folder_that_is_not_one_is_refused_in_one_line(tmp_path):
    out = run_script(STUDY, "--model", tmp_path, "--out", tmp_path / "out")
    assert out.returncode == 2 and "python scripts/get_model.py" in out.stderr, out.stderr
    assert not (tmp_path / "out").exists()


def test_the_rows_are_the_issues_and_an_unknown_row_is_refused_before_anything_runs(tmp_path):
    from lightning_moe.evaluation.study import rows

    study = rows(22)
    assert [r.name for r in study] == ["lora_r16", "lora_matched", "lora_experts_token_top2", "lora_experts_servable"]
    assert "moe=none" in study[1].overrides and "lora.r=22" in study[1].overrides
    assert study[3].overrides == ["+recipe=smollm2_servable"]
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    out = run_script(STUDY, "--model", tmp_path / "model", "--out", tmp_path / "out", "--rows", "lora_r61")
    assert out.returncode == 2 and "lora_r61" in out.stderr and "lora_matched" in out.stderr, out.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.skipif(not COUNSEL_CHAT_CSV.is_file(), reason="needs ../shared/datasets/counsel_chat")
def test_a_smoke_row_is_trained_evaluated_asked_and_not_redone_even_without_its_run(tiny_model_dir, tmp_path):
    """One row (the design: routing figures) and one seed through train.py, evaluate.py (with a bias probe) and
    generate.py: three subprocesses. Every row runs the same code with other overrides (the test above)."""
    if not (REPO / "data" / "generated" / "counsel_chat.jsonl").is_file():
        assert run_script(REPO / "scripts" / "convert_counsel_chat.py").returncode == 0
    row = "lora_experts_token_top2"
    args = ["--model", tiny_model_dir, "--out", tmp_path / "results", "--runs", tmp_path / "runs", "--seeds", "0",
            "--smoke", "--crows-pairs", REPO.parent / "shared" / "datasets" / "crows_pairs" / "crows_pairs_anonymized.csv",
            "--probe-limit", "4", "--rows", row, "--matched-rank", "3"]
    out = run_script(STUDY, *args, timeout=1800)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert [Path(line.split()[1]).name for line in out.stdout.splitlines() if line.startswith("$ ")] == [
        "train.py", "evaluate.py", "generate.py"]
    results = json.loads((tmp_path / "results" / "results.json").read_text())
    assert list(results["results"]) == ["base", row] and results["matched_rank"] == 3
    design = results["results"][row]
    assert design["counsel_chat"]["nmi"]["n"] == 1 and design["trained_params"] > 0
    assert "crows_pairs_stereotype_preference" in results["results"]["base"]["counsel_chat"]
    assert (tmp_path / "results" / "raw" / row / "seed0" / "eval_counsel_chat.json").is_file()
    replies = [json.loads(line) for line in (tmp_path / "results" / "replies" / f"{row}_seed0.jsonl").open()]
    assert len(replies) == 8 and all("reply" in r for r in replies)
    assert f"| {row} |" in (tmp_path / "results" / "results.md").read_text()

    shutil.rmtree(tmp_path / "runs")  # a new machine: the results travelled, the checkpoints did not
    again = run_script(STUDY, *args, timeout=300)  # everything measured: only the table is written again
    assert again.returncode == 0 and "$ " not in again.stdout, again.stdout[-2000:]
    assert json.loads((tmp_path / "results" / "results.json").read_text())["results"] == results["results"]
