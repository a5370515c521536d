"""Shared fixtures: randomly initialised models of the four supported families, built offline.

Weights are drawn with a large ``initializer_range`` so that attention is sharply peaked:
near-uniform patterns would make the exactness checks too easy to pass.
"""

from __future__ import annotations

import contextlib
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

VOCAB = 128


def _build(family: str):
    from transformers import (BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, GPTNeoXConfig,
                              GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM)

    torch.manual_seed({"gpt2": 1, "neox": 2, "llama": 3, "bert": 4}[family])
    if family == "gpt2":
        cfg = GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=VOCAB, n_positions=64,
                         initializer_range=0.4, bos_token_id=0, eos_token_id=0)
        cls = GPT2LMHeadModel
    elif family == "neox":
        cfg = GPTNeoXConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=64, intermediate_size=128,
                            vocab_size=VOCAB, max_position_embeddings=64, rotary_pct=0.5,
                            use_parallel_residual=True, attention_bias=True, initializer_range=0.4,
                            bos_token_id=0, eos_token_id=0)
        cls = GPTNeoXForCausalLM
    elif family == "llama":
        cfg = LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                          intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=64,
                          initializer_range=0.4, bos_token_id=0, eos_token_id=0, pad_token_id=0)
        cls = LlamaForCausalLM
    elif family == "bert":
        cfg = BertConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=64, intermediate_size=128,
                         vocab_size=VOCAB, max_position_embeddings=64, initializer_range=0.4, pad_token_id=0)
        cls = BertForMaskedLM
    else:  # pragma: no cover
        raise ValueError(family)
    return cls._from_config(cfg, attn_implementation="eager").eval()


FAMILIES = ["gpt2", "neox", "llama", "bert"]


@contextlib.contextmanager
def svtools_cache_at(path):
    """``SVTOOLS_CACHE`` set to ``path`` inside the block, restored after (module-scoped fixtures
    cannot use pytest's function-scoped ``monkeypatch``)."""
    old = os.environ.get("SVTOOLS_CACHE")
    os.environ["SVTOOLS_CACHE"] = str(path)
    try:
        yield str(path)
    finally:
        if old is None:
            os.environ.pop("SVTOOLS_CACHE")
        else:
            os.environ["SVTOOLS_CACHE"] = old


@pytest.fixture(scope="session")
def random_models():
    """Dict family -> TransformerBridge around a random model (built once per session)."""
    import svtools

    return {f: svtools.load_model(_build(f), device="cpu") for f in FAMILIES}


@pytest.fixture(scope="session")
def minilm():
    import svtools

    return svtools.load_model("minilm", device="cpu")


@pytest.fixture
def batch_tokens():
    """Random ids with one right-padded row."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (3, 12), generator=g)
    am = torch.ones_like(ids)
    am[1, 8:] = 0
    return ids, am


@pytest.fixture(autouse=True)
def _never_train_the_books_runs(monkeypatch):
    """Unit tests never train what the book trains: a test that would train the default IOI LM
    config (any seed; the book's runs take minutes each) fails here instead. Loading it from a
    filled cache is not training; tests train tiny configs."""
    from svtools.ioi_lm import training

    real = training._about_to_train

    def guard(cfg, seeds):
        if training._key_config(cfg) == training._key_config(training.IOILMConfig()):
            pytest.fail(f"this unit test would train the book's IOI LM (the default config, seeds {list(seeds)}): "
                        "train a tiny IOILMConfig instead", pytrace=False)
        real(cfg, seeds)

    monkeypatch.setattr(training, "_about_to_train", guard)


#: ASCII stand-ins for math that a figure's label must not show (write mathtext: r"$\sigma_k$").
ASCII_MATH = re.compile(r"sigma_|N_recon|tovee|Tovee|\|\|E_X|\bOmega\b|\bcos\(w_|\bmin\(\|cos|\+-|lam\b|"
                        r"n_features|n_keys|d_head|p_active|L_recon|L_attn|->|\bq95\b|log\(p_|logit IO|log2")


def figure_problems(figures) -> list[str]:
    """What makes each ``(name, figure)`` unfit for the book: text under ``plots.MIN_TEXT_PX`` on a
    phone, wider than the column (``plots.FIGURE_IN``), a font under ``plots.MIN_FONT_PT``, or
    ASCII math outside ``$...$`` in its labels. One line per problem; empty when all are fit."""
    from svtools import plots

    bad = []
    for name, fig in figures:
        px, text = plots.legibility(fig)
        width, texts = plots.svg_text(plots.to_svg(fig))
        if px < plots.MIN_TEXT_PX:
            bad.append(f"{name}: text {text!r} is {px:.1f} px on a phone (< {plots.MIN_TEXT_PX})")
        if width / 72 > plots.FIGURE_IN + 2 * plots.PAD_IN + 0.15:
            bad.append(f"{name}: {width / 72:.2f} in wide (> FIGURE_IN = {plots.FIGURE_IN})")
        if min(s for s, _ in texts) < plots.MIN_FONT_PT - 1e-9:
            bad.append(f"{name}: a text smaller than {plots.MIN_FONT_PT} pt")
        ascii_math = [t for _, t in texts if ASCII_MATH.search(re.sub(r"\$[^$]*\$", "", t))]
        if ascii_math:
            bad.append(f"{name}: ASCII math in labels {ascii_math[:3]}")
    return bad
