"""svtools.features, svtools.ov and svtools.ioi_causal: known-feature readouts and causal IOI tests.

Closed forms on synthetic data (planted maps and directions, Theorem 1's optimum, traces), and
identities on a tiny IOI language model trained here in seconds (the chapter measures the
default model).
"""

from __future__ import annotations


import numpy as np
import pandas as pd
import pytest
import torch

import svtools
from svtools import features as ft
from svtools import ioi_causal as ic
from svtools import ioi_lm, ov
from svtools.qk import QKSVD, RotarySpec, qk_svd
from conftest import svtools_cache_at

TINY = ioi_lm.IOILMConfig(n_layers=2, n_heads=2, d_model=16, steps=12, n_checkpoints=3, batch=8, warmup=2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    with svtools_cache_at(tmp_path_factory.mktemp("svtools_cache")):
        run = ioi_lm.train(TINY, seed=0, progress=False)
        yield run, run.load(run.checkpoints[-1])


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- features: closed forms

def test_code_map_recovers_a_planted_map():
    g = _gen(0)
    codes = torch.randn(400, 8, generator=g, dtype=torch.float64)
    P = torch.randn(12, 8, generator=g, dtype=torch.float64)
    b = torch.randn(12, generator=g, dtype=torch.float64)
    x = codes @ P.T + b + 1e-6 * torch.randn(400, 12, generator=g, dtype=torch.float64)
    P_hat, b_hat, r2 = ft.code_map(x, codes, ridge=0.0)
    assert torch.allclose(P_hat.double(), P, atol=1e-4) and torch.allclose(b_hat.double(), b, atol=1e-4)
    assert r2 > 0.999999
    _, _, r2_noise = ft.code_map(torch.randn(400, 12, generator=g), codes)  # codes explain noise: R^2 ~ 8/400
    assert r2_noise < 0.1
    with pytest.raises(svtools.SVToolsError):
        ft.code_map(x[:10], codes)


def test_feature_directions_find_planted_directions():
    g = _gen(1)
    n, pos_n, d = 50, 12, 16
    name_dir, slot_dir = torch.zeros(d), torch.zeros(d)
    name_dir[3], slot_dir[5] = 1.0, 1.0
    x = 0.01 * torch.randn(n, pos_n, d, generator=g)
    io = torch.randint(1, 4, (n,), generator=g)
    s1 = io + 1 + torch.randint(0, 2, (n,), generator=g)
    swap = torch.rand(n, generator=g) < 0.5
    io, s1 = torch.where(swap, s1, io), torch.where(swap, io, s1)
    s2 = torch.full((n,), 8)
    r = torch.arange(n)
    for p in (io, s1, s2):
        x[r, p] += 2 * name_dir
    x[r, torch.minimum(io, s1)] += slot_dir / 2  # +- so that the mean over name positions keeps no slot part
    x[r, torch.maximum(io, s1)] -= slot_dir / 2
    from svtools.data import IOIPositions

    pos = IOIPositions(io=io, s1=s1, s2=s2, end=torch.full((n,), 11), length=torch.full((n,), 12),
                       io_id=torch.zeros(n, dtype=torch.long), s_id=torch.ones(n, dtype=torch.long))
    dirs = ft.feature_directions(x, pos, torch.ones(n, pos_n))
    assert float(dirs["name"] @ name_dir) > 0.99
    assert float(dirs["first_slot"] @ slot_dir) > 0.99


def test_alignment_and_its_null():
    g = _gen(2)
    d, r = 32, 6
    f = torch.randn(d, generator=g, dtype=torch.float64)
    B = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))[0]
    B[:, 2] = f / f.norm()
    assert float(ft.alignment(f, B)[0, 2]) == pytest.approx(1.0)
    null = ft.alignment_null(f, r, 400, seed=0)
    assert null.shape == (400,) and torch.equal(null, ft.alignment_null(f, r, 400, seed=0))
    assert torch.equal(null, ft.alignment_null(f, r, 400, Sigma=torch.eye(d), seed=0))
    # the raw null does not depend on the feature (Haar invariance): same quantiles within noise
    other = ft.alignment_null(torch.randn(d, generator=g), r, 4000, seed=1)
    assert abs(float(ft.alignment_null(f, r, 4000, seed=2).quantile(0.95) - other.quantile(0.95))) < 0.03
    # a covariance dominated by the feature makes every un-whitened basis look aligned: the null sees it
    Sigma = 100 * torch.outer(f, f) / f.dot(f) + torch.eye(d)
    assert float(ft.alignment_null(f, r, 200, Sigma=Sigma, seed=0).quantile(0.05)) > 0.9
    assert float(null.quantile(0.95)) < 0.7


def test_unwhitened_alignment_recovers_theorem_one_features():
    g = _gen(3)
    d = 10
    A = torch.randn(d, d, generator=g, dtype=torch.float64)
    Sigma = A @ A.T + 0.1 * torch.eye(d, dtype=torch.float64)
    x, y = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    Si = torch.linalg.inv(Sigma)
    W_Q, W_K = (Si @ x)[:, None], (Si @ y)[:, None]  # Omega = Sigma^-1 x y^T Sigma^-1, rank one
    qk = qk_svd(W_Q, W_K)
    cq, ck = ft.unwhitened_alignment(torch.stack([x, y]), qk, Sigma)
    assert float(cq[0, 0]) == pytest.approx(1.0, abs=1e-9) and float(ck[1, 0]) == pytest.approx(1.0, abs=1e-9)
    assert float(ft.alignment(x, qk.U)[0, 0]) < 0.99  # the raw vector is the whitened one


@pytest.mark.parametrize("bias,rotary", [(False, False), (True, False), (True, True)])
def test_bilinear_mass_sums_to_the_trace(bias, rotary):
    g = _gen(4)
    d, dh, c, heads = 12, 4, 5, 3
    W_Q = torch.randn(heads, d, dh, generator=g, dtype=torch.float64)
    W_K = torch.randn(heads, d, dh, generator=g, dtype=torch.float64)
    b = (torch.randn(heads, dh, generator=g, dtype=torch.float64),) * 2 if bias else (None, None)
    spec = RotarySpec.from_base(dh, [0, 3]) if rotary else None
    qk = qk_svd(W_Q, W_K, *b, rotary=spec)
    P, R = torch.randn(d, c, generator=g, dtype=torch.float64), torch.randn(d, c, generator=g, dtype=torch.float64)
    L = torch.randn(c, c, generator=g, dtype=torch.float64)
    C = L @ L.T
    m = ft.bilinear_mass(qk, P, R, C=C, offset=3 if rotary else None)
    one = qk.at_offset(3) if rotary else qk
    Om = one.omega()[..., :d, :d]
    want = torch.stack([torch.trace(C @ P.T @ Om[h] @ R) for h in range(heads)])
    assert m.shape == (heads, dh)
    assert torch.allclose(m.sum(-1), want, rtol=1e-9, atol=1e-9)
    k = 1  # the k-th term: sigma_k u_k^T P C R^T v_k
    u, v = one.U[..., :d, k], one.V[..., :d, k]
    assert torch.allclose(m[:, k], one.S[:, k] * torch.einsum("hd,dc,ce,fe,hf->h", u, P, C, R, v))
    with pytest.raises(svtools.SVToolsError):
        ft.bilinear_mass(qk, P[:-1], R, offset=3 if rotary else None)


# ----------------------------------------------------------------------------- OV

@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_ov_svd_is_w_v_w_o(random_models, family):
    model = random_models[family]
    W_V, W_O = ov.ov_weights(model, 1)
    dec = ov.ov_svd(model, 1, dtype=torch.float64)
    want = W_V.double() @ W_O.double()
    assert torch.allclose(dec.omega(), want, atol=1e-9 * float(want.abs().max()))
    if family == "llama":  # grouped-query: value head h // 2 serves query heads h
        assert torch.equal(W_V[0], W_V[1]) and torch.equal(W_V[0], model.W_V[1, 0])
    assert torch.allclose(ov.ov_svd(model, 1, [2], dtype=torch.float64).S[0], dec.S[2])


def test_token_readout_and_copying_mass():
    g = _gen(5)
    d, vocab = 8, 20
    V = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    S = torch.linspace(2, 1, d, dtype=torch.float64)
    one = QKSVD(U=V, S=S, V=V)  # W_OV = V S V^T: symmetric, copies every direction
    W_U = 0.01 * torch.randn(d, vocab, generator=g, dtype=torch.float64)
    W_U[:, 7] = V[:, 0]
    W_U[:, 9] = -V[:, 0]
    tokens = [f"t{i}" for i in range(vocab)]
    table = ov.ov_token_readout(one, W_U, tokens, directions=[0], top=2)
    assert table.loc[0, "raises"].startswith("t7") and table.loc[0, "lowers"].startswith("t9")
    assert list(ov.ov_token_readout(one, W_U, tokens, among=[7, 9, 3], top=1)["raises"])[0] == "t7"
    R = torch.eye(d, dtype=torch.float64)
    mass = ov.copying_mass(one, R, R)  # identity code maps: trace(W_OV) = sum S, term k = sigma_k
    assert torch.allclose(mass, S)
    with pytest.raises(svtools.SVToolsError):
        ov.ov_token_readout(QKSVD(U=V[None], S=S[None], V=V[None]), W_U, tokens)


# ----------------------------------------------------------------------------- on the tiny IOI model

def test_ioi_behaviour_matches_the_logits_and_patterns(tiny):
    run, model = tiny
    ds = run.prompts(24, seed=3, split="train")
    b = ic.ioi_behaviour(model, ds, heads=[(1, 0), (0, 1)])
    logits = run.logits(run.checkpoints[-1], ds)
    pos = ds.positions(run.tokenizer)
    r = torch.arange(len(ds))
    ld = (logits[r, pos.io_id] - logits[r, pos.s_id]).numpy()
    one = b[(b["layer"] == 1) & (b["head"] == 0)].sort_values("prompt")
    assert np.allclose(one["logit_diff"], ld, atol=1e-4)
    assert np.array_equal(one["io_over_s"], (ld > 0).astype(float))
    roles = ioi_lm.role_attention(model, ds)
    want = roles[(roles.layer == 1) & (roles["head"] == 0) & (roles.query_role == "END") & (roles.key_role == "IO")]
    assert one["end_io"].mean() == pytest.approx(float(want["mean"].iloc[0]), abs=1e-6)
    assert np.allclose(one["selectivity"], np.log(one["end_io"]) - np.log(one["end_s1"]))
    summ = ic.behaviour_summary(b, by=["layer"])
    assert set(summ["column"]) >= {"logit_diff", "end_io", "selectivity"}
    assert (summ["lo"] <= summ["mean"]).all() and (summ["mean"] <= summ["hi"]).all()


def test_role_terms_sum_to_relative_scores_and_sets(tiny):
    run, model = tiny
    ds = run.prompts(16, seed=4, split="train")
    t = ic.role_terms(model, ds, 1, [0, 1])
    ids, am, pos = svtools.ioi.ioi_tokens(model, ds)
    dec = svtools.decompose(model, ids, 1, attention_mask=am, dtype=torch.float64)
    rel = svtools.relative_terms(dec.terms, dec.mask).sum(-1)  # (b, head, q, k)
    r = torch.arange(len(ds))
    assert torch.allclose(t[("END", "IO")].sum(-1), rel[r, :, pos.end, pos.io])
    assert torch.allclose(t[("END", "S1")].sum(-1), rel[r, :, pos.end, pos.s1])
    fake = {("END", "IO"): torch.tensor([[0.0, 5.0, 1.0, 3.0]] * 3), ("END", "S1"): torch.tensor([[1.0, 5.0, -2.0, 2.5]] * 3)}
    sets = ic.direction_sets(fake, 2)  # decision means: -1, 0, 3, 0.5
    assert sets["sad"] == (1, 3) and sets["decision"] == (2, 3)
    prof = ic.direction_profile(model, ds, 1, [0, 1])
    assert set(prof["spread"]["head"]) == {0, 1}
    assert ((prof["spread"]["decision_rt"] > 0) & (prof["spread"]["decision_rt"] <= 1)).all()


def test_intervention_effects_and_summary(tiny):
    run, model = tiny
    ds = run.prompts(16, seed=5, split="train")
    head = (1, 1)
    eff = ic.intervention_effects(model, ds, {"top": {head: (0,)}}, heads=[head], r=8, n_null=3, band=4)
    none = eff[eff.intervention == "none"].sort_values("prompt")
    assert np.allclose(none["end_io"], ic.ioi_behaviour(model, ds, heads=[head]).sort_values("prompt")["end_io"])
    assert sorted(eff[eff.intervention == "top null"]["draw"].unique()) == [0, 1, 2]
    # zeroing Omega: uniform attention from END over the END + 1 keys it sees
    zo = eff[eff.intervention == "zero omega"].sort_values("prompt")
    ids, am, pos = svtools.ioi.ioi_tokens(model, ds)
    assert np.allclose(zo["end_io"], 1.0 / (pos.end.numpy() + 1), atol=1e-6)
    assert eff[eff.intervention == "zero pattern"]["end_io"].isna().all()
    summ = ic.effect_summary(eff)
    nul = summ[(summ.intervention == "top null") & (summ.column == "end_io")]
    assert int(nul["draws"].iloc[0]) == 3 and 0.0 <= float(nul["p_null"].iloc[0]) <= 1.0
    # p_null by hand: share of draws at least as far below "none" as the set itself
    per_draw = eff[eff.intervention == "top null"].groupby("draw")["end_io"].mean().to_numpy()
    base, own = none["end_io"].mean(), eff[eff.intervention == "top"]["end_io"].mean()
    assert float(nul["p_null"].iloc[0]) == pytest.approx(float(((base - per_draw) >= (base - own)).mean()))


def test_known_feature_summary_on_the_tiny_model(tiny):
    run, model = tiny
    ds = run.prompts(40, seed=6, split="train")
    summ, prof = ic.known_feature_summary(model, ds, [(1, 0), (1, 1)], n_null=50)
    assert list(summ["head"]) == [0, 1] and len(prof) == 2 * min(TINY.d_model // TINY.n_heads, TINY.d_model + 1)
    for col in ("name_raw", "name_unwhitened", "first_slot_raw"):
        assert ((summ[col] >= 0) & (summ[col] <= 1 + 1e-9)).all()
    feats = ft.ioi_features(model, ds, 1)
    assert all(0 <= v <= 1 for v in feats.r2.values())
    qk = svtools.decomposition.layer_qk(model, 1, [0, 1], dtype=torch.float64)
    masses = ft.code_mass_table(feats, qk, [0, 1])
    s_pair = list(ft.CODE_PAIRS)[0]
    tot = masses[masses.pair == s_pair].groupby("head")["mass"].sum().to_numpy()
    Om = qk.omega()[..., :-1, :-1]
    P, R, C = feats.maps["S@END"].double(), feats.maps["name@key"].double(), feats.code_cov
    assert np.allclose(tot, [float(torch.trace(C @ P.T @ Om[h] @ R)) for h in range(2)], rtol=1e-6)
    ot = ic.over_training(run, run.checkpoints[:2], ds, [(1, 0)], n_null=20, progress=False)
    assert list(ot["step"]) == run.checkpoints[:2] and ot["io_over_s"].between(0, 1).all()


def test_summary_shares_and_plots_fit_the_column(tiny):
    import warnings

    from svtools.plots import features as fplots

    run, model = tiny
    ds = run.prompts(40, seed=7, split="train")
    summ, prof = ic.known_feature_summary(model, ds, [(1, 0)], n_null=20)
    row = summ.iloc[0]
    dm = prof["decision_mean"].to_numpy()
    assert row["decision_topk_share"] == pytest.approx(np.sort(dm)[-2:].sum() / dm.sum())
    assert 0 < row["s_code_topk_energy"] <= 1
    eff = ic.intervention_effects(model, ds, {"sad": {(1, 0): row["sad_set"]}, "decision": {(1, 0): row["decision_set"]}},
                                  heads=[(1, 0)], r=8, n_null=2)
    summary = pd.concat([ic.effect_summary(eff).assign(seed=s) for s in (0, 1)])
    table = ic.effect_table(summary)
    assert list(table.index.get_level_values("intervention")[:3]) == ["none", "sad", "sad null"]
    ot = ic.over_training(run, run.checkpoints[-2:], ds, [(1, 0)], n_null=10, test=ds, progress=False)
    assert {"end_io_minus_sad", "selectivity_minus_decision"} <= set(ot.columns)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a figure wider than the book's column warns
        pairs = list(ft.CODE_PAIRS)
        fplots.plot_direction_profiles(prof.assign(seed=0), pair_io=pairs[1], pair_s=pairs[0])
        fplots.plot_intervention_effects(summary)
        fplots.plot_features_over_training(pd.concat([ot.assign(seed=s) for s in (0, 1)]))
    with pytest.raises(svtools.SVToolsError):
        fplots.plot_intervention_effects(summary.drop(columns="seed"))


def test_zero_head_effects_are_paired_changes_of_the_answer(tiny):
    from svtools.intervene import intervene

    run, model = tiny
    ds = run.prompts(16, seed=6, split="train")
    eff = ic.zero_head_effects(model, ds, [(1, 0), (1, 1)], reference=[(0, 0), (1, 1)]).set_index("target")
    assert list(eff["group"]) == ["chosen", "chosen", "reference", "all chosen"]  # (1, 1) is not a reference
    base = ic.ioi_behaviour(model, ds)
    after = ic.ioi_behaviour(intervene(model, zero_omega=[(1, 0)]), ds)
    d = after["logit_diff"] - base["logit_diff"]
    assert eff.loc["1.0", "change"] == pytest.approx(float(d.mean()), abs=1e-6)
    assert eff.loc["1.0", "lo"] <= eff.loc["1.0", "change"] <= eff.loc["1.0", "hi"]
    assert eff.loc["1.0", "rel_change"] == pytest.approx(float(d.mean() / base["logit_diff"].mean()), rel=1e-6)
    both = ic.ioi_behaviour(intervene(model, zero_omega=[(1, 0), (1, 1)]), ds)
    assert eff.loc["all chosen", "logit_diff"] == pytest.approx(float(both["logit_diff"].mean()), abs=1e-6)
    with pytest.raises(svtools.SVToolsError):
        ic.zero_head_effects(model, ds, [(1, 0)], mode="mlp")
