"""`model.attn_implementation=varlen`: packed rows through PyTorch's variable-length FlashAttention.

transformers runs packed rows (position_ids restarting at 0) on SDPA with a block-diagonal mask, which rules out
SDPA's flash kernel. Here the rows are flattened into one stream of tokens and each conversation attends causally
inside its own span (`cu_seq_lens_q`: where each span starts, written by the collator), with no mask at all.

Registered in transformers' AttentionInterface under the name "varlen", with SDPA's mask builder, so whatever has
no spans (padded batches, generation with a KV cache) runs transformers' SDPA path unchanged. On a CPU the spans
run one SDPA call each: slow, and there only so the CPU tests check the same code path's boundaries.
"""

from __future__ import annotations

import functools
import inspect
import warnings

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "varlen"
SPAN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")  # lightning_moe.data.collate


def varlen_inputs(model, batch: dict) -> dict:
    """What a packed batch adds to the model's forward call when the model runs varlen attention: its spans."""
    if getattr(model.config, "_attn_implementation", None) != NAME:
        return {}
    return {key: batch[key] for key in SPAN_KEYS if key in batch}


@functools.cache
def varlen_kernel():
    """torch's varlen_attn, and how this torch spells causal and grouped-query heads (the API moved in 2.11/2.12)."""
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    return varlen_attn, "is_causal" in params, "enable_gqa" in params, "scale" in params


_native_gqa = [True]  # cleared the first time this torch's kernel refuses fewer key heads than query heads


def _on_cuda(q, k, v, starts, longest, scaling):
    varlen_attn, has_is_causal, has_gqa, has_scale = varlen_kernel()
    kwargs = {"is_causal": True} if has_is_causal else {"window_size": (-1, 0)}
    if has_scale:
        kwargs["scale"] = scaling
    elif scaling is not None and abs(scaling - q.shape[-1] ** -0.5) > 1e-6:
        raise ValueError(f"attn_implementation=varlen: this torch's varlen_attn has no scale (model's: {scaling})")
    if k.shape[1] != q.shape[1]:
        if has_gqa:
            kwargs["enable_gqa"] = True
        elif _native_gqa[0]:  # FlashAttention's kernel takes grouped heads; older wrappers may check
            try:
                return varlen_attn(q, k, v, starts, starts, longest, longest, **kwargs)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError:
                _native_gqa[0] = False
        if not _native_gqa[0]:
            k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    return varlen_attn(q, k, v, starts, starts, longest, longest, **kwargs)


@functools.cache
def _warn_float32() -> None:
    warnings.warn("attn_implementation=varlen on float32 CUDA tensors: FlashAttention needs bf16/fp16 (use "
                  "trainer.precision=bf16-mixed or model.dtype=bfloat16); running each span through SDPA instead")


def _span_by_span(q, k, v, starts, scaling):
    bounds = starts.tolist()
    out = [F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1),
                                          is_causal=True, scale=scaling, enable_gqa=True).transpose(0, 1)
           for a, b in zip(bounds[:-1], bounds[1:])]
    return torch.cat(out)


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, sliding_window: int | None = None, **kwargs):
    """transformers' attention-function signature: query (B, H, S, D), key/value (B, KV, S, D); returns the
    output as (B, S, H, D) and no weights."""
    starts = kwargs.pop("cu_seq_lens_q", None)
    longest = kwargs.pop("max_length_q", None)
    for unused in ("cu_seq_lens_k", "max_length_k"):
        kwargs.pop(unused, None)
    windowed = sliding_window is not None and longest is not None and longest > sliding_window
    if starts is None or query.shape[2] != key.shape[2] or windowed or (dropout and module.training):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    b, h, s, d = query.shape
    if query.is_cuda and torch.is_autocast_enabled("cuda"):  # as autocast runs SDPA: in its 16-bit dtype
        query, key, value = (x.to(torch.get_autocast_dtype("cuda")) for x in (query, key, value))
    q, k, v = (x.transpose(1, 2).reshape(b * s, x.shape[1], d) for x in (query, key, value))
    if not q.is_cuda and int(starts[-1]) != b * s:  # (on a GPU this check would cost a sync per layer)
        raise ValueError(f"cu_seq_lens_q ends at {int(starts[-1])}, the batch holds {b * s} tokens")
    starts = starts.to(q.device)
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        out = _on_cuda(q, k, v, starts, longest, scaling)
    else:  # FlashAttention takes 16-bit inputs only; float32 (no autocast) runs the spans one by one
        if q.is_cuda:
            _warn_float32()
        out = _span_by_span(q, k, v, starts, scaling)
    return out.view(b, s, h, d), None


def register() -> None:
    """Make "varlen" a name transformers accepts for attn_implementation (idempotent)."""
    AttentionInterface.register(NAME, varlen_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
