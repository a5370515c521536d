"""Inputs to the toy model, the theory, the prompt data, geometry and alignment (issue 11, items 5, 13)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import svtools.theory as th
from svtools import SVToolsError, qk_svd
from svtools.alignment import chance_cosine, match_pairs
from svtools.data import ioi_prompts, plain_sentences
from svtools.geometry import max_interference, span_dims
from svtools.toy import ToyConfig, train


# ----------------------------------------------------------------------------- toy

def test_train_needs_a_config():
    with pytest.raises(SVToolsError, match="ToyConfig"):
        train({"steps": 3})


@pytest.mark.parametrize("change,match", [
    ({"seed": 2**64}, "seed"), ({"seed": -1}, "seed"), ({"seed": 1.5}, "seed"),
    ({"target_scale": float("nan")}, "target_scale"),
    ({"rotary": True, "rotary_base": 0.0}, "rotary_base"), ({"rotary": True, "rotary_base": -5.0}, "rotary_base"),
    ({"warmup": -5}, "warmup"), ({"template": [(0.5, 1, 1.0)]}, "integer"),
    ({"template": [(0, 1, float("nan"))]}, "strength"), ({"init_scale": 0.0}, "init_scale"),
    ({"betas": (0.9, 1.5)}, "betas"), ({"lr": float("inf")}, "lr"), ({"n_keys": True}, "n_keys"),
])
def test_toy_config_rejects(change, match):
    cfg = ToyConfig(steps=2, batch=4).replace(**change)
    with pytest.raises(SVToolsError, match=match):
        cfg.validate()
    with pytest.raises(SVToolsError, match=match):
        train(cfg, progress=False)


def test_toy_numpy_integers_accepted():
    run = train(ToyConfig(steps=2, batch=4, seed=int(np.int64(3)), template=[(np.int64(0), np.int64(1), 1.0)]),
                progress=False)
    assert run.cfg.pairs == [(0, 1)]


# ----------------------------------------------------------------------------- theory

def _frame_xy():
    return th.frame(12, 6, 0.5, seed=0, dtype=torch.float64), th.frame(12, 6, 0.3, seed=1, dtype=torch.float64)


def test_float_feature_indices_rejected():
    X, Y = _frame_xy()
    with pytest.raises(SVToolsError, match="integer"):
        th.whitened_directions(X, Y, 1.7, 2)
    with pytest.raises(SVToolsError, match="integer"):
        th.whitened_directions(X, Y, [0, 1.5], 2)
    u, v = th.whitened_directions(X, Y, np.int64(1), np.arange(3))
    assert u.shape == (6,) and v.shape == (6, 3)


def test_frame_size_must_be_integer():
    with pytest.raises(SVToolsError, match="N must be an integer"):
        th.frame(20.7, 10, 0.5)
    with pytest.raises(SVToolsError, match="interference"):
        th.frame(20, 10, float("nan"))
    assert th.frame(np.int64(20), 10, 0.5).shape == (10, 20)


def test_alignment_floor_nan():
    with pytest.raises(SVToolsError, match="non-finite"):
        th.alignment_floor(float("nan"))
    assert float(th.alignment_floor(0.6)) == pytest.approx(0.8, abs=1e-12)


def test_unwhiten_checks_sigma_and_never_returns_zero_unit_vectors():
    X, _ = _frame_xy()
    qk = qk_svd(X[:, :4], X[:, 4:8])
    S = X @ X.T
    with pytest.raises(SVToolsError, match="positive semi-definite"):
        th.unwhiten(qk, -S)
    # a singular Sigma: singular vectors in its null space get NaN, not a zero "unit" vector
    P = torch.zeros(6, 6, dtype=torch.float64)
    P[0, 0] = 1.0
    qk_axes = qk_svd(torch.eye(6, dtype=torch.float64)[:, :2], torch.eye(6, dtype=torch.float64)[:, :2])
    U, V = th.unwhiten(qk_axes, P)
    norms = U.norm(dim=0)
    assert torch.isnan(norms).sum() == 1 and float(norms[~torch.isnan(norms)][0]) == pytest.approx(1.0)
    Ue, _ = th.unwhiten(qk, S)
    assert torch.allclose(Ue.norm(dim=0), torch.ones(4, dtype=torch.float64))


def test_whitened_direction_of_a_zero_feature():
    X, Y = _frame_xy()
    X = X.clone()
    X[:, 3] = 0
    with pytest.raises(SVToolsError, match=r"X feature\(s\) \[3\] have no whitened direction"):
        th.whitened_directions(X, Y, 3, 0)


# ----------------------------------------------------------------------------- prompts

def test_ioi_numpy_n_and_format_specs():
    assert len(ioi_prompts(np.int64(3))) == 3
    for bad in (2.0, True, "3"):
        with pytest.raises(SVToolsError, match="positive int"):
            ioi_prompts(bad)
    for tpl in ("When {A:>10} and {B} went out, {S} waved to", "When {A!r} and {B} went out, {S} waved to"):
        with pytest.raises(SVToolsError, match="format spec"):
            ioi_prompts(2, templates=[tpl])
    assert plain_sentences(np.int64(2)) == plain_sentences(2)
    with pytest.raises(SVToolsError, match="int"):
        plain_sentences(2.0)


# ----------------------------------------------------------------------------- geometry and alignment

def test_geometry_and_alignment_indices():
    X, _ = _frame_xy()
    assert torch.equal(max_interference(X, np.arange(3)), max_interference(X, [0, 1, 2]))
    with pytest.raises(SVToolsError, match="integer"):
        max_interference(X, [0.5])
    with pytest.raises(SVToolsError, match="index out of range"):
        span_dims(X, [12])
    qk = qk_svd(X[:, :4], X[:, 4:8])
    with pytest.raises(SVToolsError, match="integer"):
        match_pairs(X, qk, [(0.5, 1)])
    assert match_pairs(X, qk, [(np.int64(0), np.int64(4))]).pairs.tolist() == [[0, 4]]
    with pytest.raises(SVToolsError, match="dim"):
        chance_cosine(2.5)
    assert chance_cosine(np.int64(2)) == pytest.approx(2 / np.pi)


# ----------------------------------------------------------------------------- no function mutates its inputs

def test_public_functions_leave_tensor_inputs_untouched():
    import svtools
    from svtools import geometry
    from svtools.sad import select_pairs

    X, Y = _frame_xy()
    qk = qk_svd(X[:, :4], X[:, 4:8])
    S = X @ X.T
    g = torch.Generator().manual_seed(0)
    terms = torch.randn(2, 5, 5, 4, generator=g, dtype=torch.float64)
    mask = torch.ones(5, 5, dtype=torch.bool).tril()
    pattern = torch.softmax(torch.randn(2, 5, 5, generator=g).masked_fill(~mask, -1e9), -1)
    act = th.Activation(0.2)
    args = [X, Y, S, terms, mask, pattern, qk.U, qk.S, qk.V]
    before = [a.clone() for a in args]
    th.whitened_directions(X, Y, [0, 1], [2, 3])
    th.probe_directions(X, Y, 0, 1, act)
    th.optimal_omega(X, Y, [(0, 1, 1.0)], act)
    th.unwhiten(qk, S)
    th.interference(X)
    th.whitening_alignment(X)
    th.mean_alignment_bound(X)
    geometry.gram(X, normalize=True)
    geometry.feature_dimensionality(X)
    geometry.max_interference(X)
    geometry.outside_energy(X, [0, 1], [2, 3])
    match_pairs(X, qk, [(0, 4)])
    svtools.relative_terms(terms, mask)
    svtools.n_recon(terms)
    svtools.rolls_tovee(terms)
    svtools.sad_terms(qk, X[:, 0], X[:, 1])
    svtools.rotated_terms(qk, X[:, 0], X[:, 1])
    select_pairs(pattern, mask, select="acc")
    for a, b in zip(args, before):
        assert torch.equal(a, b)


def test_train_leaves_the_config_untouched():
    cfg = ToyConfig(steps=2, batch=4, template=[(0, 1, 1.0)])
    snapshot = cfg.replace()
    train(cfg, progress=False)
    assert cfg == snapshot
