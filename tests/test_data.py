"""Reading, normalising, rendering, masking, splitting and packing conversations."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO, tiny_model

from lightning_moe.config.schema import DataConfig
from lightning_moe.data.chat import ChatRenderer, TemplateError
from lightning_moe.data.collate import ChatCollator
from lightning_moe.data.formats import DataError, read_conversations
from lightning_moe.data.chat import IGNORE_INDEX
from lightning_moe.data.datamodule import ChatDataModule
from lightning_moe.models.varlen import varlen_inputs

DOMAINS = ["psychology", "mental_health", "bias_detection", "general_therapeutic"]
CONV = [
    {"role": "system", "content": "You are a supportive assistant."},
    {"role": "user", "content": "I keep putting off my thesis."},
    {"role": "assistant", "content": "That sounds stressful. What is the smallest next step?"},
    {"role": "user", "content": "Opening the file, I guess."},
    {"role": "assistant", "content": "Then let's make that the whole goal for today."},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def labelled_text(tokenizer, out) -> str:
    return tokenizer.decode([t for t, lab in zip(out["input_ids"], out["labels"]) if lab != IGNORE_INDEX])


def test_messages_jsonl_and_sharegpt_json_read_the_same(tmp_path):
    msgs = write_jsonl(tmp_path / "a.jsonl", [{"messages": CONV, "domain": "psychology"}])
    sharegpt = [{
        "conversations": [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]} for m in CONV],
        "domain": "psychology",
    }]
    sg = tmp_path / "b.json"
    sg.write_text(json.dumps(sharegpt))
    a, b = read_conversations(msgs, DOMAINS)[0], read_conversations(sg, DOMAINS)[0]
    assert a == b and a["domain_id"] == 0 and a["messages"] == CONV


def test_domain_is_optional(tmp_path):
    ds = read_conversations(write_jsonl(tmp_path / "a.jsonl", [{"messages": CONV}]), DOMAINS)
    assert ds[0]["domain_id"] == -1


@pytest.mark.parametrize(
    "record, problem",
    [
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}, "unknown role 'robot'"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
        ({"messages": CONV, "domain": "astrology"}, "unknown domain 'astrology'"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}, "turn 1 (assistant) has empty content"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}, {"role": "assistant", "content": "y"}]}, "only the first turn"),
        ({"messages": []}, "empty"),
    ],
)
def test_bad_rows_name_file_row_and_problem(tmp_path, record, problem):
    path = write_jsonl(tmp_path / "conv.jsonl", [{"messages": CONV}, record])
    with pytest.raises(DataError, match="conv.jsonl: row 2") as err:
        read_conversations(path, DOMAINS)
    assert problem in str(err.value)


def test_malformed_json_and_missing_file_are_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []\n')
    with pytest.raises(DataError, match="bad.jsonl"):
        read_conversations(bad, DOMAINS)
    with pytest.raises(DataError, match="file not found"):
        read_conversations(tmp_path / "nope.jsonl", DOMAINS)


def test_mask_equals_transformers_generation_mask_and_trains_terminators(tokenizer):
    out = ChatRenderer(tokenizer, 4096)(CONV)
    ref = tokenizer.apply_chat_template(CONV, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert out["input_ids"] == list(ref["input_ids"])
    assert [lab != IGNORE_INDEX for lab in out["labels"]] == [bool(m) for m in ref["assistant_masks"]]
    # exactly the assistant contents, each followed by its turn terminator
    assert labelled_text(tokenizer, out) == "".join(m["content"] + "<|im_end|>" for m in CONV if m["role"] == "assistant")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ends = [i for i, t in enumerate(out["input_ids"]) if t == im_end]
    assert [out["labels"][i] == im_end for i in ends] == [False, False, True, False, True]  # system, user, asst, user, asst


def test_mask_works_for_a_template_without_generation_tags(tokenizer):
    """Another layout (Llama-3-like headers, a different terminator), no {% generation %} tags."""
    tokenizer = type(tokenizer).from_pretrained(REPO / "lightning_moe" / "assets" / "tokenizer")
    tokenizer.chat_template = (
        "{{ '<|endoftext|>' }}{% for m in messages %}{{ '### ' + m['role'] + ':\\n' + m['content'] + '<|endoftext|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### assistant:\\n' }}{% endif %}"
    )
    out = ChatRenderer(tokenizer, 4096)(CONV)
    expected = "".join(m["content"] + "<|endoftext|>" for m in CONV if m["role"] == "assistant")
    assert labelled_text(tokenizer, out) == expected


def test_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    tokenizer = type(tokenizer).from_pretrained(REPO / "lightning_moe" / "assets" / "tokenizer")
    # like Mistral's v1 template: the system prompt is glued to the *last* user message
    tokenizer.chat_template = (
        "{% for m in messages if m['role'] != 'system' %}{% if m['role'] == 'user' %}"
        "{% if loop.last or messages[loop.index0 + 2] is not defined %}{{ messages[0]['content'] }}{% endif %}"
        "{{ '[INST]' + m['content'] + '[/INST]' }}{% else %}{{ m['content'] + '<|endoftext|>' }}{% endif %}{% endfor %}"
    )
    with pytest.raises(TemplateError, match="data.chat_template"):
        ChatRenderer(tokenizer, 4096)(CONV)


def test_truncation_keeps_the_start_and_drop_skips(tokenizer):
    full = ChatRenderer(tokenizer, 4096)(CONV)
    n = len(full["input_ids"])
    cut = ChatRenderer(tokenizer, n - 5)(CONV)
    assert cut["overlong"] and cut["input_ids"] == full["input_ids"][: n - 5] and not cut["dropped"]
    assert ChatRenderer(tokenizer, n - 5, "drop")(CONV)["dropped"] == "overlong"
    tiny = ChatRenderer(tokenizer, 16)(CONV)  # cut before the first assistant token: nothing to learn
    assert tiny["dropped"] == "no_target_tokens"


def _datamodule(tokenizer, tmp_path, **cfg):
    rows = [{"messages": CONV, "domain": DOMAINS[i % 4]} for i in range(10)]
    rows += [{"messages": CONV[:3] + [{"role": "user", "content": "ok " * 400}, CONV[4]], "domain": "psychology"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    dm = ChatDataModule(DataConfig(train_files=[str(path)], max_length=128, batch_size=4, **cfg), tokenizer, DOMAINS)
    dm.setup()
    return dm


def test_overlong_rows_are_counted_never_silently_lost(tokenizer, tmp_path):
    stats = _datamodule(tokenizer, tmp_path, val_fraction=0.5).stats
    assert stats["train"]["conversations"] + stats["val"]["conversations"] == 11
    assert stats["train"]["overlong"] + stats["val"]["overlong"] == 1
    kept = stats["train"]["kept"] + stats["val"]["kept"]
    assert kept == 11  # truncation keeps the first assistant turn of the long row
    dropped = _datamodule(tokenizer, tmp_path, val_fraction=0.5, overlong="drop").stats
    assert sum(dropped[s]["dropped"].get("overlong", 0) for s in ("train", "val")) == 1
    assert dropped["train"]["kept"] + dropped["val"]["kept"] == 10


def test_split_is_90_10_and_deterministic_by_seed(tokenizer):
    def split(seed):
        dm = ChatDataModule(
            DataConfig(train_files=["data/therapeutic_sample.jsonl"], split_seed=seed, max_length=256), tokenizer, DOMAINS
        )
        dm.setup()
        return [tuple(x) for x in dm.val_set["input_ids"]], len(dm.train_set) + len(dm.val_set)

    a, total = split(42)
    b, _ = split(42)
    c, _ = split(7)
    assert a == b and a != c
    assert len(a) == round(0.1 * total)


def _packed_logits(out, packed, feats):
    """Each conversation's logits out of a packed batch, found through its segment id."""
    return [out.logits[packed["segment_ids"] == i] for i in range(len(feats))]


@pytest.mark.parametrize("attn", ["sdpa", "varlen"])
@pytest.mark.parametrize("row_length", [None, "longest"], ids=["one-row", "rows-of-max-length"])
def test_packed_batch_equals_each_example_alone(tokenizer, row_length, attn):
    """Padding-free packing must not let attention (or the loss) cross conversation boundaries, neither inside a
    row nor into the padding segment that fills a shorter row: for SDPA's block-diagonal mask and for varlen's
    spans (its CPU form: the same spans, one SDPA call each; tests/test_gpu.py runs its kernel)."""
    model = tiny_model("tiny-mistral", seed=3, attn=attn, vocab_size=len(tokenizer))
    render = ChatRenderer(tokenizer, 4096)
    convs = [CONV, CONV[:3], [CONV[1], {"role": "assistant", "content": "Tell me more about that."}]]
    feats = [render(c) | {"domain_id": i} for i, c in enumerate(convs)]
    lengths = [len(f["input_ids"]) for f in feats]
    cap = None if row_length is None else max(lengths)  # the longest alone in a row, the two others share one
    packed = ChatCollator(tokenizer.pad_token_id, packing=True, row_length=cap)(feats)
    padded = ChatCollator(tokenizer.pad_token_id)(feats)
    if cap is None:
        assert packed["position_ids"][0].tolist() == [p for f in feats for p in range(len(f["input_ids"]))]
    else:
        assert lengths[0] > lengths[1] + lengths[2] > lengths[1]  # so: 2 rows, the second with a padding segment
        assert packed["input_ids"].shape == (2, lengths[0])
        assert packed["segment_ids"][1].tolist() == [1] * lengths[1] + [2] * lengths[2] + [-1] * (
            lengths[0] - lengths[1] - lengths[2])
    assert packed["num_tokens"] == padded["num_tokens"] == padded["attention_mask"].sum() == (
        packed["segment_ids"] >= 0).sum()
    spans = varlen_inputs(model, packed)
    assert bool(spans) == (attn == "varlen")
    if spans:  # each conversation and the padding segment one span, the rows laid end to end
        ends = [len(f["input_ids"]) for f in feats] if cap is None else [lengths[0], lengths[1], lengths[2],
                                                                          lengths[0] - lengths[1] - lengths[2]]
        assert spans["cu_seq_lens_q"].tolist() == [sum(ends[:i]) for i in range(len(ends) + 1)]
    with torch.no_grad():
        out_packed = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], labels=packed["labels"],
                           **spans)
        out_padded = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], labels=padded["labels"])
        singles = [model(input_ids=torch.tensor([f["input_ids"]]), labels=torch.tensor([f["labels"]])) for f in feats]
    for logits, single in zip(_packed_logits(out_packed, packed, feats), singles):
        torch.testing.assert_close(logits, single.logits[0], rtol=1e-4, atol=1e-4)
    if spans:  # the spans, not the mask, keep the conversations apart: one span over everything lets them mix
        total = int(spans["cu_seq_lens_q"][-1])
        whole = spans | {"cu_seq_lens_q": spans["cu_seq_lens_q"][[0, -1]], "max_length_q": total}
        with torch.no_grad():
            mixed = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], **whole)
        assert not torch.allclose(_packed_logits(mixed, packed, feats)[-1], singles[-1].logits[0], atol=1e-3)
    # token-weighted mean of per-example losses == packed loss == padded loss
    counts = [sum(lab != IGNORE_INDEX for lab in f["labels"][1:]) for f in feats]
    expected = sum(s.loss * c for s, c in zip(singles, counts)) / sum(counts)
    torch.testing.assert_close(out_packed.loss, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_padded.loss, expected, rtol=1e-5, atol=1e-5)
    for i, f in enumerate(feats):
        assert packed["token_domain"][packed["segment_ids"] == i].tolist() == [i] * len(f["input_ids"])


def test_varlen_model_without_spans_runs_sdpa_padded_batches_and_kv_cache_generation():
    """What has no spans (a padded batch, generation with a KV cache) runs transformers' SDPA path under varlen:
    the same logits and the same greedy tokens as the SDPA model with the same weights."""
    sdpa, var = (tiny_model("tiny-mistral", seed=5, attn=a) for a in ("sdpa", "varlen"))
    ids = torch.tensor([[0, 0, 11, 12, 13], [21, 22, 23, 24, 25]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])  # left padding, as generation pads
    with torch.no_grad():
        torch.testing.assert_close(var(input_ids=ids, attention_mask=mask).logits,
                                   sdpa(input_ids=ids, attention_mask=mask).logits)
        runs = [m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=True,
                           pad_token_id=0) for m in (sdpa, var)]
    assert torch.equal(runs[0], runs[1]) and runs[0].shape[1] == 11


def test_packing_fills_rows_of_max_length_first_fit_longest_first():
    """Conversations go into rows of at most row_length tokens; a row that holds one full-length conversation and
    no padding has position_ids 0..n-1, which transformers runs with the causal kernel and no mask."""
    feats = [{"input_ids": [5] * n, "labels": [IGNORE_INDEX] + [5] * (n - 1), "domain_id": 0}
             for n in (300, 1000, 700, 1000, 48)]
    packed = ChatCollator(0, packing=True, row_length=1048)(feats)
    rows = [sorted(set(r.tolist()) - {-1}) for r in packed["segment_ids"]]
    assert rows == [[1, 4], [3], [0, 2]]  # 1000+48 | 1000 (+48 padding) | 700+300 (+48 padding)
    assert packed["input_ids"].shape == (3, 1048) and packed["num_tokens"] == 3048
    full = ChatCollator(0, packing=True, row_length=1000)([feats[1], feats[3]])
    assert full["position_ids"].tolist() == [list(range(1000))] * 2 and (full["segment_ids"] >= 0).all()
