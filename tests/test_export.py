"""export.py as a user runs it: a merged model plain transformers loads, a PEFT adapter peft loads, and one adapter
per domain with its router, each giving exactly the trained model's logits; stop tokens; refusals."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import FAST, REPO, clean_env, free_port, run_entry, run_guarded, run_train

from lightning_moe.checkpointing.load import load_trained, plan_load
from lightning_moe.config.schema import ConfigError, LoRAConfig, MoEConfig
from lightning_moe.config.export_forms import check_format
from lightning_moe.generation.prompts import render_prompt, routing_of
from lightning_moe.models.build import build_model
from lightning_moe.moe.layer import RoutingContext

REPLY = "I hear you."
QUESTIONS = ["hi", "hello", "I feel sad", "help me", "good morning", "I am tired", "can we talk", "I worry a lot"]


def export(*args: str):
    return run_entry("export.py", *args)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A LoRA-only run that learns one reply (so generation's stop at the end of the turn shows)."""
    root = tmp_path_factory.mktemp("lora_run")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant",
                    "content": REPLY}]}) + "\n" for q in QUESTIONS * 4))
    out = run_train("moe=none", f"data.train_files=[{data}]", "trainer.max_steps=30", "trainer.val_check_interval=30",
                    "optim.lr=1e-2", "optim.warmup_steps=2", "data.max_length=64", f"hydra.run.dir={root}/run")
    assert out.returncode == 0, out.stdout[-3000:]
    return root / "run"


@pytest.fixture(scope="module")
def merged_export(lora_run, tmp_path_factory):
    """lora_run exported by export.py as format=merged (what the user would load or serve): the folder, and what
    export.py printed. A space in the path: the printed commands must survive copy and paste."""
    out_dir = tmp_path_factory.mktemp("my exports") / "merged"
    out = export(f"run={lora_run}", "format=merged", f"out={out_dir}")
    assert out.returncode == 0, out.stderr[-3000:]
    return SimpleNamespace(folder=out_dir, printed=out.stdout)


def _base(plan):
    """The run's random base, rebuilt from its recorded seed (what a served model would download)."""
    s = plan.sections
    model, _ = build_model(s.model, LoRAConfig(enabled=False), MoEConfig(enabled=False), plan.hf_config,
                           RoutingContext(), 2048, seed=plan.record["seed"], training=False)
    return model


@pytest.mark.slow
@pytest.mark.xdist_group("lora_run")  # one training of lora_run and one merged export for both tests
def test_merged_and_peft_exports_load_with_plain_transformers_and_peft_to_the_same_logits(lora_run, merged_export,
                                                                                           tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out = export(f"run={lora_run}", "format=peft", f"out={tmp_path / 'peft'}")
    assert out.returncode == 0, out.stderr[-3000:]
    folders = {"merged": merged_export.folder, "peft": tmp_path / "peft"}
    plan = plan_load(lora_run)
    trained = load_trained(plan, "cpu")
    ids = torch.tensor([render_prompt(trained.tokenizer, [{"role": "user", "content": "I feel sad"}], "token",
                                      "mean").ids])
    expected = trained.model(input_ids=ids).logits
    merged = AutoModelForCausalLM.from_pretrained(folders["merged"])  # no trust_remote_code
    torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
    peft = PeftModel.from_pretrained(_base(plan), folders["peft"]).eval()
    torch.testing.assert_close(peft(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)

    # the folder's own tokenizer, chat template and generation config: greedy generation ends the turn
    tok = AutoTokenizer.from_pretrained(folders["merged"])
    gen = GenerationConfig.from_pretrained(folders["merged"])
    prompt = tok.apply_chat_template([{"role": "user", "content": "can we talk"}], add_generation_prompt=True,
                                     tokenize=False)
    x = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    gen.max_new_tokens, gen.do_sample = 20, False
    new = merged.generate(x, generation_config=gen)[0, x.shape[1]:].tolist()
    stops = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    assert trained.tokenizer.convert_tokens_to_ids("<|im_end|>") in stops  # the template's turn terminator
    assert new[-1] in stops and len(new) < 20  # stopped at the end of the assistant turn
    assert tok.decode(new, skip_special_tokens=True) == REPLY

    # issue #26 item 5: the project's generation_config.json survives save_pretrained (it wrote a scalar EOS and
    # _from_model_config), and weight files are readable by a server running as another user, like every other file
    written = json.loads((folders["merged"] / "generation_config.json").read_text())
    manifest = json.loads((folders["merged"] / "export.json").read_text())
    assert written["eos_token_id"] == manifest["stop_token_ids"] and "_from_model_config" not in written
    assert len(manifest["stop_token_ids"]) >= 1
    umask = os.umask(0)
    os.umask(umask)
    for folder in folders.values():
        modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
        assert set(modes.values()) == {0o666 & ~umask}, modes


@pytest.mark.slow
@pytest.mark.xdist_group("lora_run")
def test_transformers_serve_answers_a_chat_completion_from_the_merged_export_as_greedy_generate_does(merged_export,
                                                                                                     tmp_path):
    """Issue #26 item 8: the CPU server export.py prints (`transformers serve`, an existing engine) loads the merged
    folder as it is and answers one chat completion through the openai client, with the tokens transformers' own
    greedy `generate` gives for the same chat-templated prompt, stopping at the export's end of turn."""
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        pytest.skip("transformers serve needs its serving extra: pip install 'transformers[serving]' "
                    "(requirements.txt has it)")
    from openai import OpenAI
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    printed = {line.split()[0]: shlex.split(line.split("#")[0]) for line in merged_export.printed.splitlines()
               if line.startswith(("  transformers serve", "  vllm serve"))}
    assert printed["vllm"] == ["vllm", "serve", str(merged_export.folder)]  # the GPU engine: not run here
    words = printed["transformers"]
    assert words[:3] == ["transformers", "serve", str(merged_export.folder)]
    # the console script of this virtualenv (the user's shell would find it on PATH), on a port of its own
    words[0] = shutil.which("transformers", path=str(Path(sys.executable).parent)) or "transformers"
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen([*words, "--host", "127.0.0.1", "--port", str(port)], cwd=tmp_path, env=clean_env(),
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_until_ready(server, url, tmp_path / "serve.log")
        client = OpenAI(base_url=f"{url}/v1", api_key="not checked by a local server", timeout=300, max_retries=0)
        [served] = [m.id for m in client.models.list().data]  # the name clients use: the folder as printed
        assert served == str(merged_export.folder)
        messages = [{"role": "user", "content": "can we talk"}]
        reply = client.chat.completions.create(model=served, messages=messages, temperature=0, max_tokens=20)
    finally:
        _stop(server)
        log.close()

    # transformers' own greedy generate on the same folder and the same templated prompt (temperature 0 is greedy
    # in transformers serve: do_sample=False), with the folder's generation config (its stop tokens)
    tok = AutoTokenizer.from_pretrained(merged_export.folder)
    model = AutoModelForCausalLM.from_pretrained(merged_export.folder)
    gen = GenerationConfig.from_pretrained(merged_export.folder)
    gen.max_new_tokens, gen.do_sample = 20, False
    x = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    new = model.generate(**x, generation_config=gen)[0, x["input_ids"].shape[1]:].tolist()
    [choice] = reply.choices
    assert choice.message.role == "assistant" and choice.finish_reason == "stop", reply
    assert choice.message.content == tok.decode(new, skip_special_tokens=True) == REPLY
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (x["input_ids"].shape[1], len(new))
    assert new[-1] in gen.eos_token_id  # the served reply ended where the export's generation config says a turn ends


def _wait_until_ready(server: subprocess.Popen, url: str, log: Path, timeout: float = 300) -> None:
    """Poll the server's /health until it answers (it loads the model first), failing at once with its log if it
    exits. The timeout is only a guard against a hang: loading takes seconds, more on busy cores."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"transformers serve exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:  # not listening yet
            pass
        time.sleep(0.5)
    pytest.fail(f"transformers serve did not answer {url}/health in {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def _stop(server: subprocess.Popen) -> None:
    """SIGTERM to the server's own process group (it runs the model in a child process), SIGKILL if it lingers."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def _choose(expert: int):
    """A forward hook that makes a router choose `expert` for every unit, with gate 1 (what top-1 gives it)."""
    def hook(router, args, out):
        gates = torch.zeros_like(out.gates)
        gates[:, expert] = 1.0
        return dataclasses.replace(out, gates=gates, selected=gates.bool())
    return hook


@pytest.mark.slow
def test_per_domain_adapters_equal_the_moe_model_for_each_domain_and_the_router_agrees(tmp_path):
    from peft import PeftModel

    sys.path.insert(0, str(REPO / "lightning_moe" / "export"))
    from route import Router

    run = tmp_path / "run"
    out = run_train("+recipe=servable_tiny", *FAST, "trainer.max_steps=12", "optim.lr=1e-2", f"hydra.run.dir={run}")
    assert out.returncode == 0, out.stdout[-3000:]
    exp = tmp_path / "my exports" / "exp"  # a space: the printed commands must survive copy and paste
    out = export(f"run={run}", "format=per_domain", f"out={exp}")
    assert out.returncode == 0, out.stderr[-3000:]
    commands = [shlex.split(line.split("#")[0]) for line in out.stdout.splitlines()
                if line.startswith(("  python", "  vllm"))]
    printed = {words[0] if words[0] == "vllm" else Path(words[1]).name: words for words in commands}
    vllm = printed["vllm"]
    assert vllm[vllm.index("--lora-modules") + 1:] == [f"{n}={exp / n}" for n in plan_load(run).sections.domains]
    # a random base has no name a server knows: the export rebuilds it, with the command export.py printed
    rebuilt = subprocess.run([sys.executable, *printed["rebuild_base.py"][1:]], cwd=tmp_path, env=clean_env(),
                             capture_output=True, text=True, timeout=300)
    assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
    served_base = vllm[2]
    assert (exp / "base" / "config.json").is_file() and printed["route.py"][3] == served_base
    plan = plan_load(run)
    trained = load_trained(plan, "cpu")
    domains = plan.sections.domains
    manifest = json.loads((exp / "export.json").read_text())
    assert manifest["adapters"] == domains and manifest["rank"] in (8, 16, 32, 64)
    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS[:4]]
    ids = [torch.tensor([render_prompt(trained.tokenizer, c, *routing_of(plan.sections)).ids]) for c in conversations]
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(served_base)  # the rebuilt base is the run's base, exactly
    for (name, a), b in zip(_base(plan).state_dict().items(), base.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    for e, name in enumerate(domains):  # every domain: base + its adapter == the MoE model routed to it
        adapter = json.loads((exp / name / "adapter_config.json").read_text())
        assert adapter["r"] == manifest["rank"] and not adapter.get("modules_to_save")
        peft = PeftModel.from_pretrained(base, exp / name).eval()
        hook = trained.blocks[0].router.register_forward_hook(_choose(e))  # the tied router decides for all layers
        with torch.no_grad():
            for x in ids:
                torch.testing.assert_close(peft(input_ids=x).logits, trained.model(input_ids=x).logits,
                                           rtol=1e-4, atol=1e-4)
        hook.remove()
        base = peft.unload()

    router = Router(exp, served_base)
    from lightning_moe.generation.generate import Generator, Sampling

    gen = Generator(trained)
    for c in conversations + [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                               {"role": "user", "content": "I worry"}]]:
        reply = gen.generate([gen.render(c, 1)], Sampling(max_new_tokens=1))[0]
        assert router.pick(c) == domains[reply.routing["expert"]]


def test_formats_a_form_cannot_produce_are_refused_naming_the_forms_that_can():
    from conftest import compose

    from lightning_moe.config import registry, validate_config

    def sections(*o):
        return validate_config(compose(list(o)))

    with pytest.raises(ConfigError, match="merged needs a LoRA-only run"):
        check_format("merged", sections())
    for overrides, problem in ((["moe=lora_experts", "moe.top_k=1", "moe.tied_router=true",
                                 "moe.routing_level=sequence", "moe.expert=adapter"], "moe.expert=adapter"),
                               (["moe=lora_experts"], "moe.routing_level=token"),
                               (["moe=sequence", "moe.expert=lora", "moe.top_k=1"], "moe.tied_router=false")):
        with pytest.raises(ConfigError, match=problem.replace(".", r"\.")) as err:
            check_format("per_domain", sections(*overrides))
        assert "+recipe=servable_tiny" in str(err.value)
    check_format("per_domain", sections("+recipe=servable_tiny"))
    # every registered form and router but the servable ones, each swapped into the servable recipe: refused,
    # naming it (a newly registered one is checked here without editing a list)
    for key, names, servable in (("moe.expert", registry.EXPERTS, "lora"), ("moe.router", registry.ROUTERS, "topk")):
        for name in sorted(set(names) - {servable}):
            try:
                run = sections("+recipe=servable_tiny", f"{key}={name}", "moe.top_k=1")
            except ConfigError:
                continue  # no run trains so (expert choice routes tokens within a sequence): nothing to export
            with pytest.raises(ConfigError, match=f"{key}={name}".replace(".", r"\.")):
                check_format("per_domain", run)
    with pytest.raises(ConfigError, match="format: 'gguf' is not one of"):
        check_format("gguf", sections())


@pytest.mark.parametrize("case", ["wrong_form", "out_exists"])
def test_export_refuses_before_any_weights_and_writes_nothing(trained_run, tmp_path, case):
    out_dir = tmp_path / "out"
    if case == "out_exists":
        out_dir.mkdir()
        (out_dir / "keep.txt").write_text("mine")
    out, report = run_guarded(f"run={trained_run}", "format=merged" if case == "wrong_form" else "format=peft",
                              f"out={out_dir}", entry="export.py")
    expected = {"wrong_form": "merged needs a LoRA-only run", "out_exists": "already exists"}[case]
    assert out.returncode == 2 and expected in out.stderr, out.stderr[-2000:]
    assert not report["weights_built"]
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if case == "out_exists" else [])
    if case == "out_exists":
        assert (out_dir / "keep.txt").read_text() == "mine"
