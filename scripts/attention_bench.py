"""Attention alone, forward + backward, for packed rows at the Mistral-NeMo-12B shape (32 query heads, 8 key/value
heads, head dim 128, bf16): where the time of rows of several conversations goes.

    python scripts/attention_bench.py            # one GPU, ~20 s; prints a table, --out FILE also writes JSON

Each row of the table is one way to run 4 rows of `--width` tokens: SDPA's causal kernel on rows of one
conversation (the reference: no mask), SDPA with the block-diagonal boolean mask transformers builds for packed
rows (key/value heads repeated, as transformers does when there is a mask), at an aligned and an unaligned width,
and torch's varlen FlashAttention over the same conversations as spans.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch
import torch.nn.functional as F


def timed(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats * 1e3


def lengths_of_rows(rows: int, width: int, rng: random.Random) -> list[list[int]]:
    """Conversations of 140-1000 tokens filling each row; the last one of a row takes what is left."""
    out = []
    for _ in range(rows):
        row, left = [], width
        while left > 0:
            n = min(left, rng.randint(140, 1000))
            row.append(n)
            left -= n
        out.append(row)
    return out


def block_mask(row_lengths: list[list[int]], width: int) -> torch.Tensor:
    mask = torch.zeros(len(row_lengths), 1, width, width, dtype=torch.bool, device="cuda")
    causal = torch.ones(width, width, dtype=torch.bool, device="cuda").tril()
    for r, row in enumerate(row_lengths):
        start = 0
        for n in row:
            mask[r, 0, start:start + n, start:start + n] = causal[:n, :n]
            start += n
    return mask


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--unaligned", type=int, default=1954, help="a width that is not a multiple of 8")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out")
    a = p.parse_args()
    from lightning_moe.models.varlen import varlen_kernel

    varlen_attn, has_is_causal, has_gqa, _ = varlen_kernel()
    causal = {"is_causal": True} if has_is_causal else {"window_size": (-1, 0)}
    heads, kv, dim = 32, 8, 128
    results = {}

    def make(width):
        q = torch.randn(a.rows, heads, width, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(a.rows, kv, width, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(a.rows, kv, width, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        return q, k, v

    def step(out):
        out.float().sum().backward()

    for width in (a.width, a.unaligned):
        q, k, v = make(width)
        rows = lengths_of_rows(a.rows, width, random.Random(0))
        mask = block_mask(rows, width)
        rep = lambda x: x.repeat_interleave(heads // kv, dim=1)  # noqa: E731
        if width == a.width:
            results["sdpa causal, one conversation a row"] = timed(
                lambda: step(F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)), a.repeats)
        results[f"sdpa block-diagonal mask, width {width}"] = timed(
            lambda: step(F.scaled_dot_product_attention(q, rep(k), rep(v), attn_mask=mask)), a.repeats)
        if width != a.width:
            continue
        starts = torch.tensor([0, *[n for row in rows for n in row]], device="cuda").cumsum(0).to(torch.int32)
        longest = max(n for row in rows for n in row)
        flat = lambda x: x.transpose(1, 2).reshape(a.rows * width, x.shape[1], dim)  # noqa: E731
        for label, kk, vv in (("varlen spans, key heads repeated", rep(k), rep(v)), ("varlen spans, GQA", k, v)):
            gqa = {"enable_gqa": True} if has_gqa and kk.shape[1] != heads else {}
            try:
                results[label] = timed(lambda: step(varlen_attn(flat(q), flat(kk), flat(vv), starts, starts, longest,
                                                                longest, **causal, **gqa)), a.repeats)
            except Exception as e:  # noqa: BLE001  (this torch's kernel may want equal head counts)
                results[label] = f"failed: {type(e).__name__}: {str(e)[:120]}"
    base = results["sdpa causal, one conversation a row"]
    print(f"{'attention, forward + backward':52} {'ms':>8} {'vs causal':>9}")
    for label, ms in results.items():
        print(f"{label:52} {ms:8.2f} {ms / base:8.2f}x" if isinstance(ms, float) else f"{label:52} {ms}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"rows": a.rows, "width": a.width, "ms": results, "device": torch.cuda.get_device_name()}, f,
                      indent=2)


if __name__ == "__main__":
    main()
