"""Typed schemas of the config sections this project owns (model, data, lora, moe, optim).

Registered with Hydra's ConfigStore as `lightning_moe_schema`, the first entry of conf/train.yaml's defaults, so
every owned key exists in every composition and a wrong type fails at composition. Trainer, callbacks and
loggers are Lightning objects built with `hydra.utils.instantiate`. No torch here: see config/validate.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, make_dataclass
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from lightning_moe.config.errors import ConfigError, RunFailure  # noqa: F401  (raised everywhere as schema's)
from lightning_moe.config.registry import SECTIONS
from lightning_moe.config.routers import MOVED


DISPATCH = ("auto", "dense", "grouped", "loop")
DTYPES = ("float32", "bfloat16", "float16")
SCHEDULERS = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "adamw_8bit")
DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class ModelConfig:
    name_or_path: Optional[str] = None  # HF Hub id or local directory with config.json + weights
    init: str = "pretrained"  # pretrained: load weights; random: same architecture, random weights, no download
    arch: Optional[str] = None  # architecture json (lightning_moe/models/architectures/NAME.json) used by init=random
    # null: the model's own, falling back to the bundled one (lightning_moe/assets/tokenizer/) for init=random
    tokenizer: Optional[str] = None
    dtype: str = "float32"  # dtype of the frozen base weights; trainable weights stay float32
    # sdpa | eager | flex_attention | varlen: packed rows through torch's variable-length FlashAttention, each
    # conversation its own span and no mask (lightning_moe/models/varlen.py; padded batches and generation: SDPA)
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    # with gradient_checkpointing: checkpoint this many decoder layers, spread over the depth (null: all); the
    # others keep their activations: faster, more memory (MOE_TRAINING_GUIDE.md section 8 has the measured sizes)
    gradient_checkpointing_layers: Optional[int] = None
    # keep the activations saved for the backward pass (with checkpointing: each layer's input) in pinned CPU
    # memory, copied on a side stream: the memory floor for long rows or small GPUs, at a measured speed cost; CUDA
    offload_activations: bool = False
    # bf16 | fp8: the frozen base projections under LoRA run their forward and input-gradient matmuls in FP8
    # (torchao's float8 training, e4m3 forward, e5m2 gradients; lightning_moe/models/fp8.py); the adapters, experts,
    # routers and lm_head stay in model.dtype / float32. fp8 needs a GPU of compute capability >= 8.9 (Ada, Hopper),
    # model.dtype=bfloat16 and LoRA; measured: MOE_TRAINING_GUIDE.md section 8
    base_precision: str = "bf16"
    # with base_precision=fp8: cast each frozen weight to FP8 once and keep only that copy (the base's projections in
    # half their bf16 memory; the model files are not touched) instead of casting it in every forward and backward
    fp8_weight_cache: bool = False
    # with base_precision=fp8: the output gradients' format. e5m2 (torchao's default: range, 2 mantissa bits) |
    # e4m3 (one more mantissa bit, the forward's format; the tensorwise scale covers the range)
    fp8_grad_dtype: str = "e5m2"
    load_in_4bit: bool = False  # QLoRA: bitsandbytes 4-bit base weights (CUDA only)
    liger_kernel: bool = False  # Liger's Triton kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy); CUDA
    # torch.compile for training, per decoder layer (lightning_moe/models/compilation.py): none | layers (those
    # without an MoE block) | moe (the MoE blocks alone) | all (every layer, MoE included); measured: guide section 8.
    # With liger_kernel, a compiled model keeps Liger's fused cross-entropy only (inductor fuses the rest)
    compile: str = "none"
    # where model.compile keeps torch's compile caches (inductor's FX graphs, AOTAutograd's, Triton's kernels), so a
    # resume or the next run that names the same folder starts warm; null: <run_dir>/compile_cache (travels with the
    # run). A folder shared by runs of one recipe warms their first start too
    compile_cache_dir: Optional[str] = None
    compile_backend: str = "inductor"  # torch.compile's backend (aot_eager: no code generation, for debugging)
    compile_mode: Optional[str] = None  # torch.compile's mode: null (default) | max-autotune-no-cudagraphs | ...
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_compute_dtype: str = "bfloat16"
    bnb_4bit_use_double_quant: bool = True
    # QLoRA: peft's prepare_model_for_kbit_training casts the weights left unquantised (embeddings, lm_head, norms)
    # to float32 (the measured cost: MOE_TRAINING_GUIDE.md section 8); false keeps them in model.dtype (frozen either way)
    upcast_non_quantized: bool = True
    trust_remote_code: bool = False
    revision: Optional[str] = None


@dataclass
class DataConfig:
    train_files: List[str] = field(default_factory=list)
    val_files: List[str] = field(default_factory=list)  # empty: hold out val_fraction of train_files
    val_fraction: float = 0.1
    split_seed: int = 42
    max_length: int = 2048
    overlong: str = "truncate"  # truncate: keep the first max_length tokens; drop: skip the conversation
    on_error: str = "raise"  # a bad row: raise (name file, line, problem) | skip (count per reason, report)
    packing: bool = False  # padding-free: conversations share rows of max_length, attention kept inside each
    batch_size: int = 4
    # micro-batches by tokens: each filled from the shuffled stream up to this many tokens (lightning_moe/data/
    # sampler.py); batch_size is then unused. null: batch_size conversations a micro-batch
    batch_tokens: Optional[int] = None
    # packing: the most tokens in one packed row (null: max_length). With a document-masking attention
    # (model.attn_implementation=varlen or flex_attention) a micro-batch can be one row of batch_tokens: the
    # fullest packing
    row_length: Optional[int] = None
    num_workers: int = 0
    pin_memory: bool = False
    chat_template: Optional[str] = None  # path to a .jinja file that replaces the tokenizer's template
    system_prompt: Optional[str] = None  # added to conversations that have no system turn
    map_num_proc: Optional[int] = None  # processes for tokenisation (datasets.map)


@dataclass
class LoRAConfig:
    enabled: bool = True
    r: int = 16
    alpha: int = 32  # LoRA's scale is alpha / r
    dropout: float = 0.05
    target_modules: List[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))  # or [all-linear]
    bias: str = "none"


@dataclass
class MoEShared:
    """What every router and expert form shares; MoEConfig (below) adds each router's own section."""

    enabled: bool = True
    num_experts: int = 4  # one per entry of `domains` when domain_loss_coef > 0 (domain i is expert i)
    top_k: int = 2  # experts per token (topk, deepseek; expert choice when generating); the reference for dynamic
    layers: Optional[List[int]] = None  # decoder-layer indices (negative counts from the end); null: spread
    num_layers: int = 4  # with layers=null: this many layers evenly spread over the depth
    # routing
    # topk | switch | expert_choice | dynamic | deepseek (config/registry.py); a router's own knobs are in its
    # section, moe.<router>.<knob> (config/routers.py)
    router: str = "topk"
    # token | sequence (one decision per conversation, from its opening prompt) | turn (one decision before each
    # assistant turn, from the conversation so far; it routes that turn): lightning_moe.data.collate.routing_units
    routing_level: str = "token"
    pooling: str = "mean"  # sequence/turn: mean of the tokens before the turn | last_turn: only since the last reply
    # sequence/turn: the first MoE layer decides for all of them (one expert index per conversation or turn in every
    # layer), which is what makes a conversation's model one standard adapter (export.py format=per_domain)
    tied_router: bool = False
    router_init_std: float = 0.02
    # RMS-normalise what the router reads (each token, or each pooled unit) before scoring it. A pretrained model's
    # MLP input is small (its norm's gains: RMS about 0.1-0.4 in SmolLM2) and dominated by a few outlier dimensions
    # shared by every token, so the logits start near zero (routing entropy = ln E) and Adam's bounded steps move
    # them slowly: the first expert to pull ahead takes every token. At unit RMS the logits move by the same amount a
    # step whatever the model's scale (MOE_TRAINING_GUIDE.md section 5). Off for the random-weight tiny models.
    router_input_norm: bool = False
    # experts
    # adapter | lora | upcycled (config/registry.py's EXPERTS); a form's own knobs are in its section,
    # moe.<form>.<knob> (config/expert_forms.py: moe.upcycled.train, moe.upcycled.noise)
    expert: str = "adapter"
    expert_dim: int = 64  # adapter bottleneck width; an expert has ~3 * hidden * expert_dim parameters
    lora_r: int = 8  # lora experts / upcycled-through-LoRA: rank per expert
    lora_alpha: float = 16.0
    # the MLP projections LoRA experts adapt; Phi-3 fuses gate and up: [gate_up_proj, down_proj]
    lora_targets: List[str] = field(default_factory=lambda: ["gate_proj", "up_proj", "down_proj"])
    num_shared_experts: int = 0  # always-on experts beside the routed ones
    shared_expert_dim: Optional[int] = None  # null: expert_dim
    shared_expert_gate: bool = False  # Qwen2-MoE's sigmoid gate on the shared expert
    dispatch: str = "auto"  # auto (the form's own: dense for adapter, grouped for upcycled) | dense | grouped | loop
    # balancing: every coefficient 0 turns its term off
    aux_loss_coef: float = 0.01  # Switch/Mixtral load balancing over all MoE layers
    z_loss_coef: float = 0.001  # ST-MoE router z-loss
    domain_loss_coef: float = 0.1  # pulls a labelled conversation's rows toward expert[domain]
    domain_loss_balance: bool = False  # weight domains by the inverse of their share of the training data
    loramoe_coef: float = 0.0  # LoRAMoE localized balancing...
    loramoe_delta: float = 0.1  # ...with importance 1 +/- delta
    entropy_coef: float = 0.0  # routing-entropy penalty (dynamic routing)


# MoEShared plus moe.<router> for every router and moe.<form> for every expert form registered with a config class
# that has knobs (config/registry.py's SECTIONS): a plug-in's section appears without an edit here
MoEConfig = make_dataclass("MoEConfig", [(name, cls, field(default_factory=cls)) for name, (_, cls) in SECTIONS.items()
                                         if fields(cls)], bases=(MoEShared,))
# Hydra's schema of `moe`: MoEConfig plus the flat keys that moved into a router's or a form's section, null unless
# set, so an old command line composes and validation names the new key (config/routers.py) instead of "not in struct"
MoESchema = make_dataclass("MoESchema", [(old, Any, None) for old in MOVED], bases=(MoEConfig,))
MoEConfig.__module__ = MoESchema.__module__ = __name__


@dataclass
class OptimConfig:
    # adamw: torch's (fused on CUDA); adamw_8bit: bitsandbytes' AdamW8bit, moments in 8 bits (a quarter of the state):
    # the memory floor, with QLoRA or offloading
    name: str = "adamw"
    lr: float = 3e-4
    weight_decay: float = 0.01  # on matrices only; biases and vectors get none
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    fused: Optional[bool] = None  # null: fused AdamW on CUDA, foreach elsewhere
    scheduler: str = "cosine"  # cosine | linear | constant, after warmup_steps of linear warm-up
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0  # floor of the cosine schedule as a fraction of lr
    budget_aware_schedule: bool = False  # size the schedule from the wall-clock budget (callbacks.budget)
    nonfinite: str = "skip"  # a NaN/Inf gradient: skip the step (up to max_nonfinite_skips, then stop) | stop
    max_nonfinite_skips: int = 3


@dataclass
class TrainConfig:
    """The primary config's schema (first in conf/train.yaml's defaults): every owned key exists in every
    composition, so `model.load_in_4bit=true` needs no `+`, and a wrong type fails at composition."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    moe: MoESchema = field(default_factory=MoESchema)
    optim: OptimConfig = field(default_factory=OptimConfig)
    domains: List[str] = field(default_factory=list)
    seed: int = 42
    run_name: str = "run"
    run_dir: str = "???"
    resume: bool = True
    trainer: Any = None  # Lightning objects: `_target_` dicts for hydra.utils.instantiate
    callbacks: Any = None
    logger: Any = None


ConfigStore.instance().store(name="lightning_moe_schema", node=TrainConfig)


def per_rank(total: int, devices, nodes=1) -> int:
    """`${per_rank:8,${trainer.devices},${trainer.num_nodes}}`: a step's micro-batches shared out over the ranks, so the
    effective batch stays the design's on any number of GPUs (8 on 1 GPU, 4 each on 2, 1 each on 8)."""
    ranks = int(devices) * int(nodes)
    if total % ranks:
        raise ValueError(f"{total} micro-batches a step do not divide over {ranks} ranks (trainer.devices x num_nodes)")
    return total // ranks


OmegaConf.register_new_resolver("per_rank", per_rank, replace=True)

SCHEMAS = {"model": ModelConfig, "data": DataConfig, "lora": LoRAConfig, "moe": MoEConfig, "optim": OptimConfig}


@dataclass
class Sections:
    model: ModelConfig
    data: DataConfig
    lora: LoRAConfig
    moe: MoEConfig
    optim: OptimConfig
    domains: List[str]


