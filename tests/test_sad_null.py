"""The calibrated spectrum null (svtools.sad.null): exact plumbing, calibration that could fail, and the
engine's per-pair null values against a brute-force computation on decompose's full grids."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from svtools.decomposition import decompose_layers
from svtools.qk import QKSVD, qk_svd
from svtools.sad import KINDS, head_sparsity, null_ratio
from svtools.sad.null import (context_mean, featureless_calibration, haar_q, key_ranks, null_gaussians, null_terms,
                              null_rotations, rotate_projections, spectrum_null)
from svtools.sparsity import n_recon, rolls_tovee
from svtools.terms import homogeneous, relative_terms
from svtools.toy import ToyConfig, linear_template, toy_sparsity, train

KEY = ["kind", "layer", "head", "prompt", "query", "key"]


def test_null_rotations_are_orthogonal_per_stream_and_basis_free():
    G_q, G_k = null_gaussians(3, 5, 10, 6, [(0, 1), (0, 2)])
    assert G_q.shape == G_k.shape == (5, 2, 10, 6) and not torch.equal(G_q, G_k)
    # a stream's draws do not depend on the other streams drawn with it
    alone = null_gaussians(3, 5, 10, 6, [(0, 2)])
    assert torch.equal(alone[0][:, 0], G_q[:, 1]) and torch.equal(alone[1][:, 0], G_k[:, 1])
    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(10, 6, generator=g, dtype=torch.float64))[0]
    O = null_rotations(U, G_q[:, 0])
    assert O.shape == (5, 6, 6)
    assert torch.allclose(O.transpose(-1, -2) @ O, torch.eye(6, dtype=torch.float64), atol=1e-12)
    # another basis of the same span gives the same null basis U O
    R = haar_q(torch.randn(6, 6, generator=g, dtype=torch.float64))
    assert torch.allclose((U @ R) @ null_rotations(U @ R, G_q[:, 0]), U @ O, atol=1e-10)


def test_rotate_projections_keeps_the_mean_and_the_deviation_norm():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(7, 4, generator=g, dtype=torch.float64)
    m = p.mean(0, keepdim=True)
    O = haar_q(torch.randn(4, 4, generator=g, dtype=torch.float64))
    q = rotate_projections(p, O, m)
    assert torch.allclose(q.mean(0), m[0], atol=1e-12)
    assert torch.allclose((q - m).norm(dim=-1), (p - m).norm(dim=-1), atol=1e-12)
    assert torch.allclose(rotate_projections(p, O), p @ O, atol=1e-12)


def test_key_ranks_inverse_of_order():
    s = torch.tensor([[3.0, 1.0, 2.0, 5.0]])
    elig = torch.tensor([[True, True, True, False]])
    rank, order = key_ranks(s, elig)
    assert order[0, :3].tolist() == [0, 2, 1] and rank[0, :3].tolist() == [0, 2, 1]


def _grid_problem(seed=0, B=6, n=9, d=12, r=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, n, d, generator=g, dtype=torch.float64)
    qk = qk_svd(torch.randn(d, r, generator=g, dtype=torch.float64), torch.randn(d, r, generator=g, dtype=torch.float64))
    a, c = (x @ qk.U)[:, :, None, :], (x @ qk.V)[:, None, :, :]
    mask = torch.tril(torch.ones(n, n, dtype=torch.bool)).expand(B, n, n)
    return a, c, qk.S, mask


@pytest.mark.parametrize("relative", [False, True])
def test_identity_rotations_give_the_real_measures(relative):
    """With O = I the null head is the real head: every pair (rank-matched or not) gets its own values."""
    a, c, S, mask = _grid_problem()
    pairs = mask.nonzero()
    pairs = pairs[pairs[:, 1] >= 1]
    eye = torch.eye(S.shape[0], dtype=torch.float64).expand(3, -1, -1)
    res = spectrum_null(a, c, S, pairs, (eye, eye), mask=mask, match=torch.arange(len(pairs)) % 2 == 0,
                        mean_a=context_mean(a, dims=(-3,)), mean_c=context_mean(c, dims=(-2,)), relative=relative)
    T = a * S * c
    T = relative_terms(T, mask) if relative else T
    t = T[tuple(pairs.unbind(-1))]
    np.testing.assert_allclose(res["rolls_tovee"].numpy(), rolls_tovee(t).double().numpy(), rtol=1e-12)
    np.testing.assert_allclose(res["n_recon"].numpy(), n_recon(t).double().numpy())
    assert (res["draws"] == 3).all()


def test_featureless_inputs_calibrate_the_null_not_the_rotation():
    """No features: the null's ratio is 1 for every spectrum; the rotated control calls uneven spectra sparse."""
    for mean in (0.0, 8.0):
        cal = featureless_calibration(seed=0, mean=mean)
        assert set(cal["spectrum"]) == {"flat", "random init", "rank one"}
        assert cal["ratio_null"].between(0.95, 1.05).all(), cal
        rank_one = cal[cal["spectrum"] == "rank one"]
        assert (rank_one["ratio_rotated"] < 0.3).all()
    init = featureless_calibration(seed=0)
    assert float(init.loc[(init.spectrum == "random init") & (init.kind == "attended"), "ratio_rotated"].iloc[0]) < 0.95


def test_aligned_toy_is_sparser_than_its_null():
    base = ToyConfig.many_pairs(d_model=16, d_head=16, template=linear_template(6, 6), steps=500, batch=256, seed=0,
                                n_keys=8, p_plant=0.5, target_scale=10.0)
    run = train(base.replace(n_features=16, p_active=2.0 / 16), progress=False)
    df = toy_sparsity(run, 1000, seed=1, baseline="random")
    ratio = null_ratio(df.assign(layer=0, head=0), by=["kind"], n_boot=200)
    att = ratio.set_index("kind").loc["attended"]
    assert att["ratio"] < 0.5 and att["hi"] < 0.6
    rnd = ratio.set_index("kind").loc["random"]
    assert rnd["ratio"] > att["ratio"] + 0.2


def _brute_null(model, ids, am, got, *, attention, draws, seed, center=True):
    """Per-pair null values from decompose's full grids (dense per-offset U, V for rotary heads)."""
    out = []
    for dec in decompose_layers(model, ids, attention_mask=am, dtype=torch.float64):
        rows = got[got["layer"] == dec.layer]
        if rows.empty:
            continue
        qk, n = dec.qk, ids.shape[1]
        xq, xk = homogeneous(dec.x_query, qk), homogeneous(dec.x_key, qk)
        valid = am.bool()
        w = valid.double() / valid.double().sum(-1, keepdim=True)
        if qk.rotary is None:
            A = torch.einsum("bnd,hdr->bhnr", xq, qk.U)[:, :, :, None, :]
            C = torch.einsum("bnd,hdr->bhnr", xk, qk.V)[:, :, None, :, :]
            S = qk.S[None, :, None, None, :]
            ma = context_mean(A, valid[:, None, :, None], dims=(-3,))
            mc = context_mean(C, valid[:, None, None, :], dims=(-2,))
        else:
            pos = torch.arange(n)
            off = (pos[:, None] - pos[None, :]).clamp_min(0)
            slot = qk.rotary.offset_index(off)  # (query, key)
            U, V = qk.U[:, slot], qk.V[:, slot]  # (head, query, key, d_in, r)
            A = torch.einsum("bqd,hqkdr->bhqkr", xq, U)
            C = torch.einsum("bkd,hqkdr->bhqkr", xk, V)
            S = qk.S[:, slot][None]
            ma = torch.einsum("bd,hqkdr->bhqkr", torch.einsum("bn,bnd->bd", w, xq), U)
            mc = torch.einsum("bd,hqkdr->bhqkr", torch.einsum("bn,bnd->bd", w, xk), V)
        mask = dec.mask
        elig = mask & valid[:, None, :, None]
        elig[..., 0] = False
        pairs = torch.as_tensor(rows[["prompt", "head", "query", "key"]].to_numpy().copy())
        G_q, G_k = null_gaussians(seed, draws, qk.d_in, qk.r, [(dec.layer, h) for h in dec.heads])
        if qk.rotary is None:
            rot = (null_rotations(qk.U, G_q)[:, :, None, None], null_rotations(qk.V, G_k)[:, :, None, None])
        else:  # per offset: (draw, head, query, key, r, r)
            rot = (null_rotations(U, G_q[:, :, None, None]), null_rotations(V, G_k[:, :, None, None]))
        res = spectrum_null(A, C, S, pairs, rot, mask=mask, eligible=elig,
                            match=torch.as_tensor((rows["kind"] != "random").to_numpy().copy()),
                            mean_a=ma if center else None, mean_c=mc if center else None,
                            relative=attention == "relative")
        out.append(rows.assign(ref_rt=res["rolls_tovee"].numpy(), ref_nr=res["n_recon"].numpy()))
    return pd.concat(out)


@pytest.mark.parametrize("family", ["gpt2", "neox", "llama", "bert"])
@pytest.mark.parametrize("attention", ["absolute", "relative"])
def test_engine_null_matches_brute_force(random_models, batch_tokens, family, attention):
    model = random_models[family]
    ids, am = batch_tokens
    got = head_sparsity(model, ids, attention_mask=am, threshold=0.3, attention=attention, seed=4, null_draws=3,
                        dtype=torch.float64, progress=False, baseline=["non-attended", "random"],
                        baseline_fraction=0.3, degenerate_tol=None)
    assert set(got["kind"]) == set(KINDS)
    assert got["rolls_tovee_null"].notna().mean() > 0.95
    ref = _brute_null(model, ids, am, got, attention=attention, draws=3, seed=4)
    ok = ref["rolls_tovee_null"].notna()
    np.testing.assert_allclose(ref.loc[ok, "rolls_tovee_null"], ref.loc[ok, "ref_rt"], rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(ref.loc[ok, "n_recon_null"], ref.loc[ok, "ref_nr"], rtol=1e-7, atol=1e-9)


def test_null_does_not_change_the_real_columns(random_models, batch_tokens):
    model = random_models["gpt2"]
    ids, am = batch_tokens
    a = head_sparsity(model, ids, attention_mask=am, threshold=0.3, control="rotated", progress=False)
    b = head_sparsity(model, ids, attention_mask=am, threshold=0.3, control=["spectrum", "rotated"], progress=False)
    pd.testing.assert_frame_equal(a.drop(columns=["n_recon_null", "rolls_tovee_null"]),
                                  b.drop(columns=["n_recon_null", "rolls_tovee_null"]))
    assert a["rolls_tovee_null"].isna().all() and b["rolls_tovee_null"].notna().all()
    assert b["rolls_tovee_rotated"].notna().all()


def test_null_ratio_is_a_ratio_of_means_with_prompt_intervals():
    df = pd.DataFrame({"layer": 0, "head": 0, "kind": "attended", "prompt": np.repeat(np.arange(20), 3),
                       "rolls_tovee": np.linspace(0.1, 0.3, 60), "rolls_tovee_null": np.linspace(0.2, 0.4, 60)})
    r = null_ratio(df, n_boot=300).iloc[0]
    assert r["ratio"] == pytest.approx(df.rolls_tovee.mean() / df.rolls_tovee_null.mean())
    assert r["lo"] < r["ratio"] < r["hi"] and r["prompts"] == 20 and r["pairs"] == 60


# ----------------------------------------------------------------------------- degenerate singular values

def _degenerate_factors(seed=0, d=64, r=16):
    """Orthonormal U, V and a spectrum with a three-fold degenerate value at indices 1-3."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))[0]
    S = torch.linspace(2.0, 0.2, r, dtype=torch.float64)
    S[0], S[1:4] = 5.0, 3.0
    R = torch.eye(r, dtype=torch.float64)
    R[1:4, 1:4] = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))[0]
    return U, S, V, R


def test_degenerate_groups_and_merge_are_basis_free():
    from svtools.qk import degenerate_groups
    from svtools.terms import merge_degenerate, sad_terms

    U, S, V, R = _degenerate_factors()
    assert degenerate_groups(S).tolist() == [0, 1, 1, 1] + list(range(4, 16))
    assert degenerate_groups(S - torch.tensor([0, 0, 0, 1e-3] + [0] * 12, dtype=torch.float64)).tolist()[:5] == [0, 1, 1, 3, 4]
    a, b = QKSVD(U=U, S=S, V=V), QKSVD(U=U @ R, S=S, V=V @ R)
    assert torch.allclose(a.omega(), b.omega(), atol=1e-12)  # the same Omega, two bases of the subspace
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(200, 64, generator=g, dtype=torch.float64), torch.randn(200, 64, generator=g, dtype=torch.float64)
    ta, tb = sad_terms(a, x, y), sad_terms(b, x, y)
    assert not torch.allclose(rolls_tovee(ta), rolls_tovee(tb))  # per-k terms depend on the basis
    ma, mb = merge_degenerate(ta, S), merge_degenerate(tb, S)
    assert torch.allclose(ma.sum(-1), ta.sum(-1))
    assert torch.allclose(rolls_tovee(ma), rolls_tovee(mb), atol=1e-12)
    assert torch.equal(n_recon(ma), n_recon(mb))


def _with_head(model_hf, W_Q, W_K):
    """A copy of a random GPT-2 (HF) whose layer-0 head-0 query/key weights are W_Q, W_K (biases 0)."""
    import copy

    import svtools

    m = copy.deepcopy(model_hf)
    attn = m.transformer.h[0].attn
    d, dh = W_Q.shape
    with torch.no_grad():
        attn.c_attn.weight[:, :dh] = W_Q.float()
        attn.c_attn.weight[:, d:d + dh] = W_K.float()
        attn.c_attn.bias[:dh] = 0
        attn.c_attn.bias[d:d + dh] = 0
    return svtools.load_model(m, device="cpu")


def test_head_sparsity_is_invariant_to_the_basis_inside_a_degenerate_subspace(batch_tokens):
    """Two heads with the same Omega, one written in a rotated basis of its degenerate subspace."""
    from conftest import _build
    from svtools.sad import degeneracy

    U, S, V, R = _degenerate_factors()
    S = S * 0.6
    hf = _build("gpt2")
    one = _with_head(hf, U * S.sqrt(), V * S.sqrt())
    two = _with_head(hf, U @ R * S.sqrt(), V @ R * S.sqrt())
    ids, am = batch_tokens
    kw = dict(attention_mask=am, heads=[(0, 0)], threshold=0.2, progress=False, dtype=torch.float64,
              baseline="random", baseline_fraction=0.5, null_draws=4)
    a, b = head_sparsity(one, ids, **kw), head_sparsity(two, ids, **kw)
    assert len(a) > 20 and a[KEY].equals(b[KEY])
    for c in ("score", "rolls_tovee", "rolls_tovee_null", "n_recon_null"):
        np.testing.assert_allclose(a[c], b[c], rtol=1e-4, atol=1e-5, err_msg=c)
    assert (a["n_recon"] == b["n_recon"]).all()
    # without merging, the individual terms follow whichever basis each SVD returned
    ua = head_sparsity(one, ids, **kw, degenerate_tol=None)
    ub = head_sparsity(two, ids, **kw, degenerate_tol=None)
    assert not np.allclose(ua["rolls_tovee"], ub["rolls_tovee"], rtol=1e-3)
    rep = degeneracy(one, heads=[(0, 0), (0, 1)]).set_index("head")
    assert rep.loc[0, "groups"] == 1 and rep.loc[0, "largest_group"] == 3 and rep.loc[0, "min_gap"] < 1e-5
    assert rep.loc[1, "groups"] == 0 and rep.loc[1, "min_gap"] > 1e-5


def test_null_terms_identity_and_one_draw_of_spectrum_null():
    from svtools.terms import sad_terms

    U, S, V, R = _degenerate_factors()
    qk = QKSVD(U=U, S=torch.linspace(3, 0.5, 16, dtype=torch.float64), V=V)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(5, 64, generator=g, dtype=torch.float64), torch.randn(5, 64, generator=g, dtype=torch.float64)
    t = null_terms(qk, x, y, seed=2, draw=1)
    assert t.shape == (5, 16) and not torch.allclose(t, sad_terms(qk, x, y))
    G_q, G_k = null_gaussians(2, 2, 64, 16)
    a, c = x @ U @ null_rotations(U, G_q[1, 0]), y @ V @ null_rotations(V, G_k[1, 0])
    assert torch.allclose(t, a * qk.S * c)
    # centred: the mean input's projections onto the real singular vectors are kept
    m = x.mean(0)
    tc = null_terms(qk, m, m, seed=2, draw=1, mean_query=m, mean_key=m)
    assert torch.allclose(tc, sad_terms(qk, m, m))


def test_compare_matched_removes_what_the_score_explains_and_keeps_a_planted_offset():
    from svtools.sad import compare_matched

    g = np.random.default_rng(0)
    n = 6000
    kind = np.where(np.arange(n) < n // 3, "attended", "random")
    score = np.where(kind == "attended", g.normal(2.0, 1.0, n), g.normal(0.0, 1.0, n))
    base = 0.5 - 0.08 * score + g.normal(0, 0.02, n)  # sparseness follows the score only
    df = pd.DataFrame({"layer": 0, "head": g.integers(0, 2, n), "prompt": g.integers(0, 200, n), "kind": kind,
                       "score": score, "rolls_tovee": base})
    out = compare_matched(df, "attended", "random", by=["layer"], n_boot=200, bins=20).iloc[0]
    assert out["raw_diff"] < -0.12 and out["raw_hi"] < 0                # raw: attended look much sparser
    assert abs(out["matched_diff"]) < 0.02 and out["coverage"] > 0.9     # matched: the score explains it
    planted = df.assign(rolls_tovee=df["rolls_tovee"] - 0.05 * (df["kind"] == "attended"))
    out = compare_matched(planted, "attended", "random", by=["layer"], n_boot=200, bins=20).iloc[0]
    assert out["matched_diff"] == pytest.approx(-0.05, abs=0.02) and out["matched_hi"] < 0
    from svtools import SVToolsError

    with pytest.raises(SVToolsError):
        compare_matched(df, by=["prompt"])  # by must nest inside within
