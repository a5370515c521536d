"""svtools.sad: pair selection, head_sparsity against a direct per-pair computation, summaries."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

import svtools
from svtools import SVToolsError
from svtools.decomposition import layer_qk
from svtools.decomposition import head_rotations
from svtools.qk import rotated_factors
from svtools.terms import homogeneous
from svtools.ioi import label_ioi_roles
from svtools.sad import (COLUMNS, bootstrap, head_sparsity, pair_measures, reuse,
                         select_pairs, singular_vector_usage)
from svtools.toy import toy_sparsity


# ----------------------------------------------------------------------------- selection

def _causal(n):
    return torch.ones(n, n, dtype=torch.bool).tril()


def test_select_threshold_excludes_first_key_and_masked():
    p = torch.tensor([[1.0, 0.0, 0.0],
                      [0.6, 0.4, 0.0],
                      [0.1, 0.5, 0.4]])
    sel = select_pairs(p, _causal(3), threshold=0.5)
    want = torch.zeros(3, 3, dtype=torch.bool)
    want[2, 1] = True  # (1, 0) and (0, 0) have key 0; 0.4 < 0.5
    assert torch.equal(sel, want)
    sel = select_pairs(p, _causal(3), threshold=0.5, exclude_first=False)
    want[0, 0] = want[1, 0] = True
    assert torch.equal(sel, want)
    # a weight above threshold where the mask forbids attention is never selected
    bad = p.clone()
    bad[0, 2] = 0.9
    assert not select_pairs(bad, _causal(3), threshold=0.5)[0, 2]


def test_select_acc_rule_is_one_over_visible_keys():
    # causal: query q sees q + 1 keys, so the ACC threshold is 1 / (q + 1)
    p = torch.tensor([[1.0, 0, 0, 0],
                      [0.5, 0.5, 0, 0],
                      [0.30, 0.34, 0.36, 0],
                      [0.25, 0.24, 0.26, 0.25]])
    sel = select_pairs(p, _causal(4), select="acc")
    want = torch.zeros(4, 4, dtype=torch.bool)
    want[1, 1] = True                        # 0.5 >= 1/2
    want[2, 1] = want[2, 2] = True           # 0.34, 0.36 >= 1/3; 0.30 < 1/3
    want[3, 2] = want[3, 3] = True           # 0.26, 0.25 >= 1/4; 0.24 < 1/4
    assert torch.equal(sel, want)
    # bidirectional with padding: the threshold is 1 / number of real keys
    mask = torch.tensor([True, True, True, False]).expand(4, 4)
    p2 = torch.tensor([0.2, 0.3, 0.5, 0.0]).expand(4, 4)
    sel2 = select_pairs(p2, mask, select="acc", exclude_first=False, query_mask=torch.tensor([1, 1, 1, 0]))
    assert sel2[:3].sum(-1).tolist() == [1, 1, 1] and sel2[:3, 2].all()  # only 0.5 >= 1/3
    assert not sel2[3].any()  # padding query


def test_select_errors():
    p = torch.full((2, 2), 0.5)
    with pytest.raises(SVToolsError, match="unknown pair selection"):
        select_pairs(p, _causal(2), select="top")
    with pytest.raises(SVToolsError, match="threshold"):
        select_pairs(p, _causal(2), threshold=0.0)
    with pytest.raises(SVToolsError, match="boolean"):
        select_pairs(p, _causal(2).float())
    with pytest.raises(SVToolsError, match="NaN"):
        select_pairs(torch.full((2, 2), float("nan")), _causal(2))


def test_pair_measures_one_hot_and_dense():
    t = torch.tensor([[0.0, 3.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [-1.0, -4.0, 2.0, 0.5]])
    m = pair_measures(t)
    # third: total -2.5, so terms count in the negative direction: -t sorted = 4, 1, -0.5, -2 -> n = 1
    assert m["n_recon"].tolist() == [1, 4, 1]
    assert m["dominant_k"].tolist()[0] == 1 and m["dominant_k"].tolist()[2] == 1
    torch.testing.assert_close(m["rolls_tovee"][:2], torch.tensor([0.25, 1.0]))
    # the N_recon set reconstructs the score: sum of the first n_recon ordered terms reaches it
    for row, n, o in zip(t, m["n_recon"], m["order"]):
        s = math.copysign(1.0, float(row.sum()))
        assert s * float(row[o[:n]].sum()) >= abs(float(row.sum())) - 1e-6


# ----------------------------------------------------------------------------- head_sparsity

def _direct(model, ids, am, layer, threshold, seed, relative=False):
    """Per-pair reference: the model's own pattern from hooks, sad_terms pair by pair."""
    pre = f"blocks.{layer}.attn."
    names = [pre + "q.hook_in", pre + "k.hook_in", pre + "hook_pattern"]
    with torch.no_grad():
        _, cache = model.run_with_cache(ids, attention_mask=am, names_filter=lambda n: n in names,
                                        stop_at_layer=layer + 1)
    xq, xk, pat = (cache[n] for n in names)
    xq, xk = xq.double(), xk.double()
    n_pos = ids.shape[1]
    qk = layer_qk(model, layer, n_pos=n_pos, dtype=torch.float64)
    # the control's rotations: one stream per (seed, layer, head), as HeadDecomposition draws them
    rot = head_rotations(seed, layer, range(model.cfg.n_heads), qk.batch_shape[1:], qk.r, dtype=torch.float64,
                         offsets=None if qk.rotary is None else qk.rotary.offsets)
    left, right = rotated_factors(qk, rotation=rot)
    rows = []
    causal = svtools.decomposition.is_causal(model)
    B, H = pat.shape[:2]
    for b in range(B):
        n = int(am[b].sum())
        for h in range(H):
            for q in range(n):
                for k in range(1, (q + 1) if causal else n):
                    if pat[b, h, q, k] < threshold:
                        continue
                    off = {} if qk.rotary is None else {"offset": q - k}
                    head_qk = qk[h]
                    if not relative:
                        t = svtools.sad_terms(head_qk, xq[b, q], xk[b, k], **off)
                        lr = left[h] if qk.rotary is None else left[h, qk.rotary.offset_index(q - k)]
                        rr = right[h] if qk.rotary is None else right[h, qk.rotary.offset_index(q - k)]
                        tr = (homogeneous(xq[b, q], qk) @ lr) * (homogeneous(xk[b, k], qk) @ rr)
                    else:
                        keys = range(q + 1) if causal else range(n)
                        tt = [svtools.sad_terms(head_qk, xq[b, q], xk[b, j], **({} if qk.rotary is None else
                                                                                 {"offset": q - j})) for j in keys]
                        t = tt[k] - sum(tt[j] for j in keys if j != k) / (len(keys) - 1)
                        tr = None
                    rows.append(dict(prompt=b, head=h, query=q, key=k, attention=float(pat[b, h, q, k]),
                                     score=float(t.sum()), n_recon=int(svtools.n_recon(t)),
                                     rolls_tovee=float(svtools.rolls_tovee(t)),
                                     n_recon_rotated=None if tr is None else int(svtools.n_recon(tr)),
                                     rolls_tovee_rotated=None if tr is None else float(svtools.rolls_tovee(tr))))
    return pd.DataFrame(rows).sort_values(["head", "prompt", "query", "key"]).reset_index(drop=True)


@pytest.mark.parametrize("family", ["gpt2", "neox", "llama", "bert"])
def test_head_sparsity_matches_direct_per_pair(random_models, batch_tokens, family):
    model = random_models[family]
    ids, am = batch_tokens
    layer, thr = 1, 0.4
    df = head_sparsity(model, ids, attention_mask=am, layers=[layer], threshold=thr, progress=False,
                       dtype=torch.float64, seed=3)
    assert tuple(df.columns) == COLUMNS
    ref = _direct(model, ids, am, layer, thr, seed=3)
    assert len(ref) > 10  # peaked random attention: plenty of pairs
    got = df.drop(columns=["layer"]).sort_values(["head", "prompt", "query", "key"]).reset_index(drop=True)
    for c in ("prompt", "head", "query", "key", "n_recon", "n_recon_rotated"):
        assert got[c].tolist() == ref[c].tolist(), c
    for c in ("attention", "score", "rolls_tovee", "rolls_tovee_rotated"):
        np.testing.assert_allclose(got[c].to_numpy(), ref[c].to_numpy(), rtol=1e-4, atol=1e-5, err_msg=c)
    assert (df["n_recon"] <= df["r"]).all() and (df["dominant_sigma"] <= 1 + 1e-9).all()
    assert [u[0] for u in df["used"]] == df["dominant_k"].tolist()
    assert (df["used"].map(len) == df["n_recon"]).all()


def test_head_sparsity_relative_matches_direct(random_models, batch_tokens):
    model = random_models["gpt2"]
    ids, am = batch_tokens
    df = head_sparsity(model, ids, attention_mask=am, layers=0, threshold=0.4, attention="relative",
                       control=None, progress=False, dtype=torch.float64)
    ref = _direct(model, ids, am, 0, 0.4, seed=0, relative=True)
    ref = ref[ref["query"] >= 1]
    got = df.sort_values(["head", "prompt", "query", "key"]).reset_index(drop=True)
    assert got[["prompt", "head", "query", "key", "n_recon"]].values.tolist() == \
        ref[["prompt", "head", "query", "key", "n_recon"]].values.tolist()
    np.testing.assert_allclose(got["score"], ref["score"], rtol=1e-6, atol=1e-6)
    assert got["n_recon_rotated"].isna().all()


def test_head_sparsity_chunking_and_head_pairs(random_models, batch_tokens):
    model = random_models["bert"]
    ids, am = batch_tokens
    full = head_sparsity(model, ids, attention_mask=am, threshold=0.3, progress=False, batch_size=8)
    chunked = head_sparsity(model, ids, attention_mask=am, threshold=0.3, progress=False, batch_size=1)
    pd.testing.assert_frame_equal(full, chunked, check_exact=False, rtol=1e-5)
    # no pair has key 0 or a padding query
    assert (full["key"] > 0).all()
    assert not ((full["prompt"] == 1) & (full["query"] >= 8)).any()
    # (layer, head) pairs select exactly those heads
    some = head_sparsity(model, ids, attention_mask=am, heads=[(1, 2), (0, 3)], threshold=0.3, progress=False)
    assert set(zip(some["layer"], some["head"])) <= {(1, 2), (0, 3)}
    sub = full[((full["layer"] == 1) & (full["head"] == 2)) | ((full["layer"] == 0) & (full["head"] == 3))]
    assert len(sub) == len(some)
    assert some[["prompt", "query", "key"]].values.tolist() == sub[["prompt", "query", "key"]].values.tolist()


def test_head_sparsity_errors(random_models, batch_tokens):
    model = random_models["gpt2"]
    ids, am = batch_tokens
    with pytest.raises(SVToolsError, match="attention"):
        head_sparsity(model, ids, attention="softmax", progress=False)
    with pytest.raises(SVToolsError, match="control"):
        head_sparsity(model, ids, control="shuffled", progress=False)
    with pytest.raises(SVToolsError, match="batch_size"):
        head_sparsity(model, ids, batch_size=0, progress=False)
    with pytest.raises(SVToolsError, match="unknown layer"):
        head_sparsity(model, ids, layers=[7], progress=False)
    with pytest.raises(SVToolsError, match="unknown head"):
        head_sparsity(model, ids, heads=[(0, 9)], progress=False)
    with pytest.raises(SVToolsError, match="threshold"):
        head_sparsity(model, ids, threshold=1.5, progress=False)


# ----------------------------------------------------------------------------- toy

def test_toy_sparsity_exact_alignment_is_one_term():
    """Omega = 5 e_0 e_1^T on orthonormal features: every score uses exactly singular vector 0."""
    from svtools.qk import qk_svd
    from svtools.toy import ToyConfig, ToyHistory, ToyRun

    cfg = ToyConfig.single_pair(n_features=6, d_model=6, d_head=6, n_keys=4, p_active=0.2, p_plant=1.0)
    W = torch.eye(6)
    W_Q = torch.zeros(6, 6)
    W_K = torch.zeros(6, 6)
    W_Q[0, 0], W_K[0, 1] = 5.0, 1.0
    W_Q[1:, 2:] = 1e-3 * torch.randn(5, 4, generator=torch.Generator().manual_seed(0))  # small noise: full rank
    empty = ToyHistory(*(torch.zeros(0) for _ in range(7)))
    run = ToyRun(cfg, W, torch.zeros(6), W_Q, W_K, W_Q.T @ W_K, qk_svd(W_Q.T, W_K.T), empty)
    df = toy_sparsity(run, 200, threshold=0.5, seed=1)
    att = df[df["planted"]]
    assert len(att) > 50
    assert (att["n_recon"] == 1).all() and (att["dominant_k"] == 0).all()
    assert att["rolls_tovee"].max() < 0.2
    assert att["rolls_tovee_rotated"].median() > 2 * att["rolls_tovee"].median()
    assert np.all(np.isfinite(df["score"]))


# ----------------------------------------------------------------------------- summaries

def _frame():
    return pd.DataFrame({
        "layer": [0, 0, 0, 0, 1, 1], "head": [0, 0, 0, 0, 2, 2], "prompt": [0, 0, 1, 2, 0, 1],
        "used": [(3, 1), (3,), (3, 0), (1,), (0,), (5, 0)], "dominant_k": [3, 3, 3, 1, 0, 5],
        "dominant_k_rotated": [0, 1, 2, 3, 4, 4],
        "x": [1.0, 3.0, 5.0, 7.0, 2.0, 2.0]})


def test_singular_vector_usage_counts():
    u = singular_vector_usage(_frame())
    h0 = u[(u["layer"] == 0)].set_index("k")
    assert h0.loc[3, "n_pairs"] == 3 and h0.loc[3, "n_prompts"] == 2
    assert h0.loc[3, "frac_pairs"] == pytest.approx(3 / 4) and h0.loc[3, "frac_prompts"] == pytest.approx(2 / 3)
    assert h0.loc[1, "n_pairs"] == 2 and h0.loc[3, "frac_dominant"] == pytest.approx(3 / 4)
    h1 = u[(u["layer"] == 1)].set_index("k")
    assert h1.loc[0, "frac_prompts"] == 1.0
    r = reuse(_frame()).set_index(["layer", "head"])
    assert r.loc[(0, 0), "top_k"] == 3 and r.loc[(0, 0), "top_share"] == pytest.approx(0.75)
    assert r.loc[(0, 0), "top_share_rotated"] == pytest.approx(0.25)
    assert r.loc[(1, 2), "top_share_rotated"] == 1.0


def test_bootstrap_mean_median_and_degenerate_ci():
    df = _frame()
    s = bootstrap(df, "x", by=["layer"], n_boot=300, seed=1)
    s0 = s[s["layer"] == 0].iloc[0]
    assert s0["estimate"] == pytest.approx(4.0) and s0["lo"] <= 4.0 <= s0["hi"]
    # mean over pooled pairs of prompts: min/max possible = all mass on prompt 0 (mean 2) or 2 (mean 7)
    assert 2.0 - 1e-9 <= s0["lo"] and s0["hi"] <= 7.0 + 1e-9 and s0["hi"] > s0["lo"]
    s1 = s[s["layer"] == 1].iloc[0]
    assert s1["estimate"] == s1["lo"] == s1["hi"] == 2.0  # constant values: no uncertainty
    m = bootstrap(df, "x", by=["layer"], stat="median", n_boot=50)
    assert m[m["layer"] == 0]["estimate"].iloc[0] == 3.0  # lower median of 1, 3, 5, 7
    with pytest.raises(SVToolsError, match="stat"):
        bootstrap(df, "x", stat="mode")
    with pytest.raises(SVToolsError, match="lacks"):
        bootstrap(df, "nope")


def test_label_ioi_roles():
    from svtools.data import IOIPositions

    t = lambda *v: torch.tensor(v)  # noqa: E731
    pos = IOIPositions(io=t(2, 3), s1=t(4, 1), s2=t(7, 8), end=t(10, 11), length=t(11, 12),
                       io_id=t(0, 0), s_id=t(0, 0))
    df = pd.DataFrame({"prompt": [0, 0, 1, 1], "query": [10, 7, 11, 5], "key": [2, 4, 3, 1]})
    out = label_ioi_roles(df, pos)
    assert out["query_role"].tolist() == ["END", "S2", "END", "other"]
    assert out["key_role"].tolist() == ["IO", "S1", "IO", "S1"]
    with pytest.raises(SVToolsError, match="prompt indices"):
        label_ioi_roles(pd.DataFrame({"prompt": [5], "query": [1], "key": [0]}), pos)


def test_ioi_tokens_on_minilm(minilm):
    from svtools.data import ioi_prompts
    from svtools.decomposition import tokenize
    from svtools.ioi import ioi_tokens

    ds = ioi_prompts(6, seed=2)
    ids, am, pos = ioi_tokens(minilm, ds)
    ids2, am2 = tokenize(minilm, ds.texts)
    assert torch.equal(ids, ids2) and torch.equal(am, am2)
    assert (ids[:, 0] == minilm.tokenizer.cls_token_id).all()
    assert (pos.end + 2 == am.sum(1)).all()  # END is the word before [SEP]


def test_head_sparsity_matches_direct_per_pair_on_minilm(minilm):
    texts = ["The river rose quickly after three days of heavy rain in the hills.",
             "When Mary and John went to the store, John gave a drink to Mary."]
    ids, am = svtools.decomposition.tokenize(minilm, texts)
    df = head_sparsity(minilm, texts, layers=[2], threshold=0.3, progress=False, dtype=torch.float64, seed=1)
    ref = _direct(minilm, ids, am, 2, 0.3, seed=1)
    assert len(ref) > 10
    got = df.drop(columns=["layer"]).sort_values(["head", "prompt", "query", "key"]).reset_index(drop=True)
    for c in ("prompt", "head", "query", "key", "n_recon", "n_recon_rotated"):
        assert got[c].tolist() == ref[c].tolist(), c
    for c in ("attention", "score", "rolls_tovee", "rolls_tovee_rotated"):
        np.testing.assert_allclose(got[c].to_numpy(), ref[c].to_numpy(), rtol=1e-4, atol=1e-5, err_msg=c)
