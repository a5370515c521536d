"""Inputs to load_model and the model-level checks (issue 11, items 1, 2, 6, 8 and the pitfall).

Each test fails on the code before issue 11: load_model changed the caller's model, half-precision
models failed the exactness check, local directories were sent to the hub, raw transformers
models gave AttributeErrors.
"""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

import svtools
import svtools.decomposition as dec_mod
from svtools.models import (ModelNotFoundError, UnsupportedModelError, attention_patterns, check_bridge,
                            pattern_tolerance)

from conftest import VOCAB, _build


def _ids(n: int = 3, pos: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (n, pos), generator=g)


def _state(model: torch.nn.Module) -> dict:
    return {
        "training": model.training,
        "attn": model.config._attn_implementation,
        "dtype": next(model.parameters()).dtype,
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
    }


# ----------------------------------------------------------------------------- item 2: no mutation

def test_load_model_leaves_callers_model_untouched():
    """A float32 BertForMaskedLM in train mode with sdpa attention stays exactly that."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    cfg = BertConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=64, intermediate_size=128,
                     vocab_size=VOCAB, max_position_embeddings=64)
    hf = BertForMaskedLM._from_config(cfg, attn_implementation="sdpa")
    hf.train()
    before = _state(hf)
    assert before["attn"] == "sdpa" and before["training"] and before["dtype"] == torch.float32
    bridge = svtools.load_model(hf, device="cpu", dtype=torch.float16)
    after = _state(hf)
    assert after["training"] is True
    assert after["attn"] == "sdpa"
    assert after["dtype"] == torch.float32
    assert after["modules"] == before["modules"]  # no TransformerLens bridges spliced into the caller's tree
    for n, p in before["params"].items():
        assert torch.equal(p, after["params"][n]), n
    # the bridge got its own copy, converted as asked
    assert bridge.original_model is not hf
    assert next(bridge.original_model.parameters()).dtype == torch.float16
    assert not bridge.training
    # the caller's model still runs as a plain transformers model, in its own dtype
    hf.eval()
    assert hf(_ids(1, 8)).logits.dtype == torch.float32


def test_no_function_mutates_the_bridge(random_models):
    """decompose / head_sparsity / attention_patterns leave the bridge's weights, mode and dtype alone."""
    model = random_models["gpt2"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = _ids()
    am = torch.ones_like(ids)
    am[1, 9:] = 0
    ids0, am0 = ids.clone(), am.clone()
    svtools.decompose(model, ids, 1, attention_mask=am)
    list(svtools.decompose_layers(model, ids, [0, 1], attention_mask=am))
    svtools.sad.head_sparsity(model, ids, attention_mask=am, progress=False)
    attention_patterns(model, ids, attention_mask=am)
    assert torch.equal(ids, ids0) and torch.equal(am, am0)
    assert not model.training
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


# ----------------------------------------------------------------------------- item 1: half precision

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_half_precision_models_decompose(family, dtype):
    model = svtools.load_model(_build(family), device="cpu", dtype=dtype)
    ids = _ids()
    d = svtools.decompose(model, ids, 1)
    tol = pattern_tolerance(dtype)
    assert d.check_tol == tol
    assert d.terms.dtype == torch.float32  # decomposed in float32 from half activations
    err = d.max_pattern_error()
    assert err <= tol
    assert err > 1e-4  # the model itself rounds: a float32 tolerance of 1e-3 would not do for bfloat16
    # dtype=float16 asked for explicitly: computed in float32 as well
    assert svtools.decompose(model, ids, 0, dtype=torch.float16).terms.dtype == torch.float32
    df = svtools.sad.head_sparsity(model, ids, threshold=0.3, progress=False, dtype=torch.float16)
    assert len(df) > 0


def test_pattern_tolerance_values():
    assert pattern_tolerance(torch.float32) == 1e-3
    assert pattern_tolerance(torch.float64) == 1e-3
    assert pattern_tolerance(torch.float16) == pytest.approx(32 * 2 ** -10)
    assert pattern_tolerance("bfloat16") == pytest.approx(32 * 2 ** -7)
    with pytest.raises(svtools.SVToolsError, match="floating"):
        pattern_tolerance(torch.int32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_wrong_rotary_layout_still_caught_in_half_precision(monkeypatch, dtype):
    model = svtools.load_model(_build("neox"), device="cpu", dtype=dtype)
    real = dec_mod.rotary_spec
    monkeypatch.setattr(dec_mod, "rotary_spec", lambda m, offs: replace(real(m, offs), layout="gptj"))
    with pytest.raises(UnsupportedModelError, match=f"tolerance .* {dtype}"):
        svtools.decompose(model, _ids(), 1)


def test_check_tol_argument():
    model = svtools.load_model(_build("bert"), device="cpu")
    ids = _ids()
    assert svtools.decompose(model, ids, 0, check_tol=None).check_tol is None
    assert svtools.decompose(model, ids, 0, check_tol=0.5).check_tol == 0.5
    for bad in ("strict", -1.0, float("nan")):
        with pytest.raises(svtools.SVToolsError, match="check_tol"):
            svtools.decompose(model, ids, 0, check_tol=bad)


# ----------------------------------------------------------------------------- item 6: local directories

def test_local_directory_loads_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf = _build("gpt2")
    hf.save_pretrained(tmp_path / "tiny-gpt2")
    model = svtools.load_model(str(tmp_path / "tiny-gpt2"), device="cpu")
    assert model.cfg.n_layers == 2
    ids = _ids()
    ref = svtools.load_model(hf, device="cpu")
    assert torch.allclose(svtools.decompose(model, ids, 1).scores, svtools.decompose(ref, ids, 1).scores)
    # a pathlib.Path works too, and fallback=True does not change anything
    assert svtools.load_model(tmp_path / "tiny-gpt2", device="cpu", fallback=True).cfg.n_layers == 2


def test_missing_path_says_missing_even_with_fallback(tmp_path, capsys):
    for bad in (str(tmp_path / "no-such-model"), "./no-such-model", "~/no/such/model"):
        with pytest.raises(ModelNotFoundError, match="no such directory"):
            svtools.load_model(bad, fallback=True)
    assert "Falling back" not in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="config.json"):
        svtools.load_model(str(tmp_path / "empty"))
    assert issubclass(ModelNotFoundError, FileNotFoundError)


# ----------------------------------------------------------------------------- item 8: raw models, classes

def test_raw_transformers_model_is_refused_clearly():
    from transformers import BertModel

    hf = _build("bert")
    with pytest.raises(svtools.SVToolsError, match="load_model"):
        svtools.decompose(hf, _ids(), 0, 0)
    with pytest.raises(svtools.SVToolsError, match="load_model"):
        svtools.sad.head_sparsity(hf, _ids(), progress=False)
    with pytest.raises(svtools.SVToolsError, match="load_model"):
        list(svtools.decompose_layers(hf, _ids()))
    with pytest.raises(svtools.SVToolsError, match="class BertModel"):
        svtools.load_model(BertModel)
    with pytest.raises(svtools.SVToolsError, match="load_model"):
        check_bridge(BertModel)
    bare = BertModel(hf.config)
    with pytest.raises(UnsupportedModelError, match="BertForMaskedLM"):
        svtools.load_model(bare, device="cpu")
    bridge = svtools.load_model(hf, device="cpu")
    with pytest.raises(svtools.SVToolsError, match="already a TransformerBridge"):
        svtools.load_model(bridge)


def test_bad_dtype_and_checkpoint_arguments():
    with pytest.raises(svtools.SVToolsError, match="floating"):
        svtools.load_model(_build("gpt2"), dtype=torch.int64)
    with pytest.raises(svtools.SVToolsError, match="checkpoint"):
        svtools.load_model("EleutherAI/pythia-160m", checkpoint=1.5)


# ----------------------------------------------------------------------------- the output_attentions pitfall

def test_attention_patterns_match_unwrapped_model(random_models):
    """The supported way to get the model's own attentions equals HF's output on an unwrapped copy."""
    for family in ("bert", "gpt2", "llama"):
        hf = _build(family)  # same seed as the fixture's model: same weights, never wrapped
        ids = _ids()
        am = torch.ones_like(ids)
        am[2, 7:] = 0
        with torch.no_grad():
            ref = hf(ids, attention_mask=am, output_attentions=True).attentions
        got = attention_patterns(random_models[family], ids, attention_mask=am)
        assert got.shape[0] == len(ref) == 2
        for layer in range(2):
            valid = am.bool()[:, None, :, None] & am.bool()[:, None, None, :]
            diff = (got[layer] - ref[layer]).abs() * valid
            assert float(diff.max()) < 1e-5, (family, layer)
        # one layer, negative index, numpy int
        import numpy as np
        one = attention_patterns(random_models[family], ids, attention_mask=am, layers=np.int64(-1))
        assert torch.equal(one[0], got[1])
        d = svtools.decompose(random_models[family], ids, 1, attention_mask=am)
        assert torch.equal(d.pattern, got[1])


def test_output_attentions_pitfall_is_documented():
    """TransformerLens' in-place wrapping breaks HF's output_attentions; the docstring says what to use."""
    doc = svtools.load_model.__doc__
    assert "attention_patterns" in doc and "output_attentions" in doc
    assert "TransformerLens" in svtools.models.__doc__
