"""svtools.sae: a sparse autoencoder recovers planted features; shapes, identities, determinism."""

from __future__ import annotations

import pytest
import torch

from svtools import SVToolsError
from svtools import sae


def _planted(n=20_000, d=32, n_true=64, p=0.05, seed=0):
    """``n`` rows ``x = W f``: ``n_true`` random unit directions in ``R^d``, each active with
    probability ``p`` with a Uniform[0, 1] magnitude."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, n_true, generator=g)
    W = W / W.norm(dim=0)
    f = (torch.rand(n, n_true, generator=g) < p) * torch.rand(n, n_true, generator=g)
    return f @ W.T, W


@pytest.mark.parametrize("seed", [0, 1])
def test_recovers_planted_features_with_defaults(seed):
    x, W = _planted(seed=seed)
    model = sae.train(x, 128, seed=seed, progress=False)
    best = (W.T @ model.W_dec).abs().max(1).values           # each planted direction's best match
    assert float((best >= 0.9).float().mean()) >= 0.8
    # and it is not a property of any 128 directions: random unit directions find almost none
    R = torch.randn(32, 128, generator=torch.Generator().manual_seed(9))
    assert float(((W.T @ (R / R.norm(dim=0))).abs().max(1).values >= 0.9).float().mean()) < 0.1
    assert model.held_out["fvu"] < 0.3 and model.held_out["l0"] < 16 and model.held_out["n"] == 2000


def test_identities_and_determinism():
    x, _ = _planted(n=3000)
    a = sae.train(x, 48, steps=200, seed=3, progress=False)
    b = sae.train(x, 48, steps=200, seed=3, progress=False)
    assert a.W_dec.shape == (32, 48) and a.W_enc.shape == (48, 32)
    torch.testing.assert_close(a.W_dec.norm(dim=0), torch.ones(48), rtol=0, atol=1e-5)
    assert torch.equal(a.W_dec, b.W_dec) and a.held_out == b.held_out
    z = a.encode(x[:10])
    assert z.shape == (10, 48) and bool((z >= 0).all())
    torch.testing.assert_close(a.reconstruct(x[:10]), a.decode(z))
    # decode is affine in z with the scale applied: decode(0) = scale * b_dec
    torch.testing.assert_close(a.decode(torch.zeros(48)), a.scale * a.b_dec)
    # inputs are normalised by one scalar: rescaling the data rescales the reconstruction
    c = sae.train(10.0 * x, 48, steps=200, seed=3, progress=False)
    torch.testing.assert_close(c.W_dec, a.W_dec, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(c.reconstruct(10.0 * x[:10]), 10.0 * a.reconstruct(x[:10]), rtol=1e-3, atol=1e-3)


def test_bad_input():
    x, _ = _planted(n=100)
    with pytest.raises(SVToolsError, match="shape"):
        sae.train(x[0], 8, progress=False)
    with pytest.raises(SVToolsError, match="n_features"):
        sae.train(x, 0, progress=False)
    with pytest.raises(SVToolsError, match="non-finite"):
        sae.train(torch.full((10, 4), float("nan")), 8, progress=False)
    with pytest.raises(SVToolsError, match="l1"):
        sae.train(x, 8, l1=-1.0, progress=False)
    with pytest.raises(SVToolsError, match="constant"):
        sae.train(torch.ones(50, 4), 8, progress=False)
    model = sae.train(x, 8, steps=5, progress=False)
    with pytest.raises(SVToolsError, match="shape"):
        model.encode(torch.zeros(3, 5))
