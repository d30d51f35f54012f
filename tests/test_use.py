"""Using a trained run: loading it (the same model as training), evaluate.py, generate.py and chat.py as a user
runs them, and their refusals of bad input before any weights load."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO, SHARED, clean_env, read_summary, run_entry, run_guarded

from lightning_moe.checkpointing.io import load_checkpoint_file
from lightning_moe.checkpointing.load import load_trained, plan_load
from lightning_moe.config.schema import ConfigError
from lightning_moe.data.datamodule import ChatDataModule
from lightning_moe.training.module import MoELoRAModule

CROWS = SHARED / "datasets" / "crows_pairs" / "crows_pairs_anonymized.csv"
STEREOSET = SHARED / "datasets" / "stereoset" / "intrasentence_stereo_set.csv"


@pytest.mark.slow
def test_loaded_model_gives_the_training_modules_logits(trained_run):
    """load_trained (a run directory, its export/ folder, a checkpoint) against the LightningModule rebuilt as
    training built it with the same checkpoint loaded: the same logits on a validation batch."""
    plan = plan_load(trained_run)
    loaded = load_trained(plan, "cpu")
    module = MoELoRAModule(plan.sections, plan.hf_config, len(loaded.tokenizer), seed=plan.record["seed"])
    module.configure_model()
    module.load_state_dict(load_checkpoint_file(plan.checkpoint)["state_dict"], strict=False)
    module.eval()
    s = plan.sections
    dm = ChatDataModule(s.data, loaded.tokenizer, s.domains, s.moe.routing_level, s.moe.pooling)
    batch = next(iter(dm.evaluation_dataloader()))
    with torch.no_grad():
        loaded.routing.start_batch(batch)
        ours = loaded.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        module.routing.start_batch(batch)
        theirs = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              use_cache=False).logits
    torch.testing.assert_close(ours, theirs)
    export = load_trained(plan_load(trained_run / "export"), "cpu")
    for (name, a), (_, b) in zip(loaded.model.named_parameters(), export.model.named_parameters()):
        torch.testing.assert_close(a, b, msg=name)  # the export folder holds the final checkpoint's tensors


def test_loading_refuses_what_does_not_fit_before_any_weights(trained_run, tmp_path):
    with pytest.raises(ConfigError, match="was trained on base model 'tiny-mistral'"):
        plan_load(trained_run, overrides=["model.arch=tiny-llama"])
    with pytest.raises(ConfigError, match="lora.r: 16 in the checkpoint, 8 now"):
        plan_load(trained_run, overrides=["lora.r=8"])
    with pytest.raises(ConfigError, match="no checkpoint of step 7"):
        plan_load(trained_run, checkpoint=7)
    with pytest.raises(ConfigError, match="drawn on cpu"):  # a random base comes back only on its generator's device
        plan_load(trained_run, device="cuda")
    (tmp_path / "config.yaml").write_text((trained_run / "config.yaml").read_text())
    with pytest.raises(ConfigError, match="has no last checkpoint"):
        plan_load(tmp_path)


@pytest.mark.slow
def test_evaluate_reports_per_domain_gain_routing_and_probes_without_touching_the_run(trained_run, tmp_path):
    before = {p: p.stat().st_mtime for p in trained_run.rglob("*") if p.is_file()}
    probes = [f"probes.crows_pairs={CROWS}", f"probes.stereoset={STEREOSET}", "probes.limit=6"] if CROWS.is_file() else []
    out = run_entry("evaluate.py", f"run={trained_run}", f"out={tmp_path}/eval", *probes)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"evaluation -> {tmp_path}/eval" in out.stdout
    # issue #26 item 2: progress as plain lines when stdout is a file, and the training split is never tokenised
    assert "evaluating set 1: batch 4/4" in out.stdout and "tokenising train" not in out.stdout + out.stderr
    assert (out.stdout + out.stderr).count("GPU available") == 1  # issue #26 item 7: it was printed twice
    r = json.loads((tmp_path / "eval" / "eval.json").read_text())
    # the random base (model.init=random) came back: the run's own validation loss, to float precision
    assert r["overall"]["trained"]["loss"] == pytest.approx(read_summary(trained_run)["val_loss"], abs=1e-4)
    assert r["overall"]["gain"] > 0.2 and r["overall"]["base"]["loss"] > r["overall"]["trained"]["loss"]
    assert set(r["per_domain"]) == {"psychology", "mental_health", "bias_detection", "general_therapeutic"}
    assert sum(d["conversations"] for d in r["per_domain"].values()) == r["overall"]["conversations"]
    m = r["routing"]["domain_expert_matrix"]
    assert 0 <= m["nmi"] <= 1 and len(m["all_layers"]) == 4 and set(r["routing"]["dead_experts"]) == set(m["per_layer"])
    assert (tmp_path / "eval" / "domain_expert_matrix.png").stat().st_size > 1000
    assert "| **all** |" in (tmp_path / "eval" / "eval.md").read_text()
    if probes:
        for kind in ("crows_pairs", "stereoset"):
            assert r["probes"][kind]["trained"]["pairs"] == 6
            assert 0 <= r["probes"][kind]["base"]["stereotype_preference"] <= 1
    after = {p: p.stat().st_mtime for p in trained_run.rglob("*") if p.is_file()}
    assert after == before  # nothing of the training run was written


def test_compare_table_puts_runs_side_by_side():
    from lightning_moe.evaluation.report import compare_table

    def result(name, moe_on, loss):
        return {"run": name, "settings": {"lora": {"r": 16}, "moe": {"enabled": moe_on}}, "trained_params": 100,
                "overall": {"trained": {"loss": loss}, "gain": 0.5},
                "per_domain": {"psychology": {"trained": {"loss": loss}, "gain": 0.4}}}

    table = compare_table([result("a", True, 1.0), result("b", False, 1.2)])
    assert "| a | moe.enabled=True | 100 | 1.0000 | 0.5000 | 1.0000 (0.4000) |" in table
    assert "moe.enabled=False" in table and "psychology loss (gain)" in table


@pytest.mark.slow
def test_generate_writes_one_reply_per_row_and_chat_answers_until_end_of_input(trained_run, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a", "messages": [{"role": "user", "content": "I cannot sleep before exams."}]},
        {"id": "b", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                 {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "I'm sad."}]},
    ]) + "\n")
    out = run_entry("generate.py", f"run={trained_run}", f"prompts={prompts}", f"out={tmp_path}/replies.jsonl",
                    "max_new_tokens=8", "batch_size=2")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "generating (2 prompts, 2 a batch): 1/1" in out.stdout  # progress, as plain lines in a log file
    rows = [json.loads(line) for line in (tmp_path / "replies.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b"] and all(isinstance(r["reply"], str) for r in rows)
    assert all(r["finish_reason"] in ("stop", "length") and r["routing"]["level"] == "token" for r in rows)

    chat = run_entry("chat.py", f"run={trained_run}", "max_new_tokens=6", stdin="I feel anxious.\n/reset\nHello\n")
    assert chat.returncode == 0, chat.stderr[-3000:]
    assert chat.stdout.count("assistant> ") == 2 and "(conversation reset)" in chat.stdout
    assert "(end of conversation, 2 replies)" in chat.stdout and "routed per token" in chat.stdout


@pytest.mark.parametrize("case", ["bad_row", "too_long", "no_checkpoint"])
def test_generate_refuses_bad_input_naming_it_before_any_weights(trained_run, tmp_path, case):
    prompts, run = tmp_path / "p.jsonl", trained_run
    rows = [{"messages": [{"role": "user", "content": "fine"}]}]
    if case == "bad_row":
        rows.append({"messages": [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "ends here"}]})
    if case == "too_long":
        rows.append({"messages": [{"role": "user", "content": "word " * 5000}]})
    if case == "no_checkpoint":
        run = tmp_path / "run"
        run.mkdir()
        (run / "config.yaml").write_text((trained_run / "config.yaml").read_text())
    prompts.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out, report = run_guarded(f"run={run}", f"prompts={prompts}", f"out={tmp_path}/o.jsonl", entry="generate.py")
    expected = {"bad_row": f"{prompts}: row 2: the last turn is 'assistant'",
                "too_long": f"{prompts}: row 2: ", "no_checkpoint": "has no last checkpoint"}[case]
    assert out.returncode == 2 and expected in out.stderr, out.stderr[-2000:]
    assert not report["weights_built"] and not (tmp_path / "o.jsonl").exists()


def test_compare_table_shows_every_setting_that_differs():
    """Issue #26 item 4 (README: `evaluate.py run=SWEEP_DIR`, "one comparison table"): after
    `-m moe.top_k=1,2 optim.lr=1e-4,3e-4` two trials read "differs in: moe.top_k=1" because only the lora and moe
    settings were kept; every key of the runs' configs that differs is shown (run_dir aside: the row names the run)."""
    from lightning_moe.evaluation.report import compare_table

    def result(name, top_k, lr):
        return {"run": name, "trained_params": 100, "overall": {"trained": {"loss": 1.0}, "gain": 0.5}, "per_domain": {},
                "settings": {"run_dir": f"runs/{name}", "seed": 0, "moe": {"top_k": top_k, "enabled": True},
                             "logger": {"csv": {"save_dir": f"runs/{name}"}},
                             "optim": {"lr": lr, "betas": [0.9, 0.95]}, "data": {"train_files": ["a.jsonl"]}}}

    table = compare_table([result("t0", 1, 1e-4), result("t1", 1, 3e-4), result("t2", 2, 1e-4)])
    assert "| t0 | moe.top_k=1 optim.lr=0.0001 |" in table and "| t1 | moe.top_k=1 optim.lr=0.0003 |" in table
    assert "run_dir" not in table and "seed" not in table and "save_dir" not in table
