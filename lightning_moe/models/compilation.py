"""`model.compile`: torch.compile per decoder layer, as torchtitan and torchtune do for training.

Compiling each decoder layer in place (`layer.compile()`) instead of the whole model keeps the state-dict names
(no `_orig_mod.`), and lets the layers of one class share one compiled graph: parameters are graph inputs, not
constants. Scopes:

    layers  every decoder layer without an MoE block, whole (the MoE layers run eagerly)
    moe     the MoE blocks alone (router, experts and their routing glue)
    all     every decoder layer; a checkpointed layer with an MoE block is compiled child by child (attention,
            norms, MoE block), so that the checkpoint around it stays eager: the block's routing record is a side
            effect that eager checkpointing replays in the backward's recomputation, and a compiled checkpoint
            would not (see `allow_restored_side_effects_under_checkpoint`)

Row counts, row lengths and conversation counts vary from one micro-batch to the next (packing, micro-batches by
tokens), so shapes are dynamic from the start (`dynamic=True`): everything compiles in the first micro-batch and
nothing after it (tests/test_compile.py counts the frames). With dynamo's default (static first, dynamic at the
first change) a 12B run on real data was still compiling after 10 micro-batches, since rare shapes come late.
Compiling is paid at every start unless its products outlive the process: `persist_compile_caches` points
torch's on-disk caches (inductor's FX graph cache, AOTAutograd's cache, the Triton kernels) at a folder kept with
the run, so a resume (even on another machine with the run directory) or the next run naming the same folder
skips code generation; dynamo still traces, which is cheap by comparison.
Measured cost and gain: MOE_TRAINING_GUIDE.md section 8.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lightning_moe.models.activation_checkpointing import decoder_layers
from lightning_moe.moe.layer import MoEBlock


def _has_moe(layer: torch.nn.Module) -> bool:
    return any(isinstance(mod, MoEBlock) for mod in layer.modules())


def compiled_modules(model: torch.nn.Module, scope: str) -> list[torch.nn.Module]:
    """The modules `scope` compiles, in depth order."""
    if scope == "moe":
        return [mod for mod in model.modules() if isinstance(mod, MoEBlock)]
    if scope not in ("layers", "all"):
        return []
    modules = []
    for layer in decoder_layers(model):
        if not _has_moe(layer):
            modules.append(layer)
        elif scope == "all":
            modules += list(layer.children()) if layer.gradient_checkpointing else [layer]
    return modules


def kernelized_attention(model: torch.nn.Module) -> bool:
    """Whether the model's modules carry `kernels`' use_kernelized_func wrapper (transformers 5.2x with `kernels`)."""
    return any(hasattr(type(m).forward, "__wrapped__") and "_ACTIVE_KERNEL_FUNCS" in type(m).forward.__globals__
               for m in model.modules())


def allow_restored_side_effects_under_checkpoint(config) -> None:
    """Let dynamo trace a checkpointed layer whose forward sets and then restores a module-level variable.

    From transformers 5.2x (which requires the `kernels` package), each attention module's `forward` is wrapped by
    kernels' `use_kernelized_func`: it sets `kernels`' `_ACTIVE_KERNEL_FUNCS` (a `CompileableContextVar`, a plain
    global while compiling) before the attention runs and resets it to its previous value after, so that a
    kernelised RoPE function could find its layer's kernel. That mutation sits inside `torch.utils.checkpoint`,
    where dynamo refuses it by default (a graph break per checkpointed layer) because eager checkpointing would
    replay it in the backward's recomputation. Not replaying it changes nothing: the pair leaves the variable as
    it found it (tests/test_compile.py checks its state after a compiled step), and nothing here kernelises a
    model, so the routed function is the plain one either way. Our own side effect, the MoE block's routing record,
    never sits inside a compiled checkpoint: `compiled_modules` compiles a checkpointed MoE layer child by child,
    so its checkpoint stays eager. torchtitan and transformers' own per-layer compile set the same switch. Set only
    where the wrapper is (`kernelized_attention`): transformers 5.17 has none, and dynamo there keeps its default."""
    if hasattr(config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):  # torch >= 2.9
        config.skip_fwd_side_effects_in_bwd_under_checkpoint = True


def compile_model(model: torch.nn.Module, scope: str, backend: str = "inductor", mode: str | None = None) -> int:
    """Compile (lazily: at the first forward) what `scope` names, in place; returns how many modules."""
    modules = compiled_modules(model, scope)
    if modules:
        # dynamo's recompile limit counts per code object, and the layers of one class share theirs: their variants
        # (checkpointed or not, the first layer's input without gradients, the backward's recomputation) must not
        # reach the default limit of 8, past which the remaining layers would run eagerly without a word
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, 64)
        if kernelized_attention(model):
            allow_restored_side_effects_under_checkpoint(config)
    for mod in modules:
        mod.compile(backend=backend, mode=mode, dynamic=True)
    return len(modules)


def persist_compile_caches(folder: str | Path) -> Path:
    """Keep torch's compile caches in `folder` from now on in this process (before the first compile)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # inductor reads these at each cache access; Triton's kernels would otherwise go to ~/.triton
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(folder / "triton")
    torch._inductor.config.fx_graph_cache = True  # the defaults since torch 2.5 / 2.6; set in case a site turned
    torch._functorch.config.enable_autograd_cache = True  # them off
    return folder
