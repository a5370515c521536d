"""svtools.sad baselines: non-attended and random pairs beside the attended ones, and which singular
vectors each kind uses (usage_difference with its permutation null)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import svtools
from svtools import SVToolsError
from svtools.decomposition import decompose, layer_qk
from svtools.sad import (COLUMNS, KINDS, baseline_pairs, head_sparsity, pair_uniform, singular_vector_usage,
                         usage_difference)


def _pattern(model, ids, am, layer):
    return decompose(model, ids, layer, attention_mask=am, dtype=torch.float64).pattern


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_baseline_rows_are_low_attention_visible_pairs(random_models, batch_tokens, family):
    model = random_models[family]
    ids, am = batch_tokens
    thr, bound = 0.4, 0.05
    df = head_sparsity(model, ids, attention_mask=am, threshold=thr, progress=False, dtype=torch.float64,
                       baseline=["non-attended", "random"], baseline_fraction=0.3, baseline_bound=bound)
    assert tuple(df.columns) == COLUMNS
    assert set(df["kind"]) == set(KINDS)
    length = am.sum(1).numpy()
    causal = family != "bert"
    for kind, g in df.groupby("kind"):
        assert (g["key"] >= 1).all(), kind  # exclude_first
        assert (g["query"] < length[g["prompt"]]).all() and (g["key"] < length[g["prompt"]]).all(), kind
        if causal:
            assert (g["key"] <= g["query"]).all(), kind
    non = df[df["kind"] == "non-attended"]
    assert len(non) > 20
    assert (non["attention"] < bound).all()
    # the attention column is the model's own weight, for every kind
    for layer in (0, 1):
        pat = _pattern(model, ids, am, layer)
        g = df[df["layer"] == layer]
        want = pat[tuple(torch.as_tensor(g[c].to_numpy().copy()) for c in ("prompt", "head", "query", "key"))]
        np.testing.assert_allclose(g["attention"].to_numpy(), want.numpy(), rtol=1e-5, atol=1e-7)
    # attended rows are unchanged by asking for baselines
    plain = head_sparsity(model, ids, attention_mask=am, threshold=thr, progress=False, dtype=torch.float64)
    assert (plain["kind"] == "attended").all()
    pd.testing.assert_frame_equal(df[df["kind"] == "attended"].reset_index(drop=True), plain)
    # non-attended pairs are never selected pairs
    att = set(map(tuple, plain[["layer", "head", "prompt", "query", "key"]].values.tolist()))
    assert not att & set(map(tuple, non[["layer", "head", "prompt", "query", "key"]].values.tolist()))


def test_baseline_sample_size_and_chunking(random_models, batch_tokens):
    model = random_models["gpt2"]
    ids, am = batch_tokens
    kw = dict(attention_mask=am, threshold=0.4, progress=False, baseline="random", baseline_fraction=0.25,
              control=None)
    df = head_sparsity(model, ids, batch_size=8, **kw)
    # the sample does not depend on chunking
    pd.testing.assert_frame_equal(df, head_sparsity(model, ids, batch_size=1, **kw), check_exact=False, rtol=1e-5)
    # eligible random pairs: causal, real queries, key >= 1 -> sum over prompts of n (n - 1) / 2, per head
    n = am.sum(1)
    eligible = int((n * (n - 1) // 2).sum()) * model.cfg.n_heads * model.cfg.n_layers
    got = int((df["kind"] == "random").sum())
    sd = (eligible * 0.25 * 0.75) ** 0.5
    assert abs(got - 0.25 * eligible) < 5 * sd
    # a different seed draws a different sample
    other = head_sparsity(model, ids, baseline_seed=1, **kw)
    assert not other[other["kind"] == "random"][["prompt", "query", "key"]].equals(
        df[df["kind"] == "random"][["prompt", "query", "key"]])


@pytest.mark.parametrize("family", ["gpt2", "neox"])
def test_every_kind_sums_to_the_models_score(random_models, batch_tokens, family):
    """Each row's score equals the pair's own score from sad_terms, whatever its kind; a pair measured
    as 'random' and 'attended' has the same values in both rows."""
    model = random_models[family]
    ids, am = batch_tokens
    layer = 1
    df = head_sparsity(model, ids, attention_mask=am, layers=[layer], threshold=0.4, progress=False,
                       dtype=torch.float64, baseline=["non-attended", "random"], baseline_fraction=0.2, seed=5)
    pre = f"blocks.{layer}.attn."
    names = [pre + "q.hook_in", pre + "k.hook_in"]
    with torch.no_grad():
        _, cache = model.run_with_cache(ids, attention_mask=am, names_filter=lambda n: n in names,
                                        stop_at_layer=layer + 1)
    xq, xk = (cache[n].double() for n in names)
    qk = layer_qk(model, layer, n_pos=ids.shape[1], dtype=torch.float64)
    for row in df.sample(60, random_state=0).itertuples():
        off = {} if qk.rotary is None else {"offset": row.query - row.key}
        t = svtools.sad_terms(qk[row.head], xq[row.prompt, row.query], xk[row.prompt, row.key], **off)
        assert row.score == pytest.approx(float(t.sum()), rel=1e-6, abs=1e-6)
        assert row.n_recon == int(svtools.n_recon(t))
    key = ["layer", "head", "prompt", "query", "key"]
    both = df[df["kind"] == "random"].merge(df[df["kind"] == "attended"], on=key, suffixes=("", "_att"))
    assert len(both) > 0
    for c in ("score", "attention", "n_recon", "rolls_tovee", "n_recon_rotated", "rolls_tovee_rotated"):
        np.testing.assert_allclose(both[c].to_numpy(float), both[c + "_att"].to_numpy(float), rtol=1e-9, err_msg=c)


def test_baseline_pairs_and_uniform_rules():
    # one prompt, one head, causal 4 x 4; pattern: query 3 attends key 2
    p = torch.tensor([[1.0, 0, 0, 0], [0.9, 0.1, 0, 0], [0.5, 0.49, 0.01, 0], [0.1, 0.05, 0.8, 0.05]])[None, None]
    mask = torch.ones(4, 4, dtype=torch.bool).tril()[None, None]
    qm = torch.tensor([[True, True, True, False]])[:, None]  # query 3 is padding
    sel = svtools.sad.select_pairs(p, mask, threshold=0.5, query_mask=qm)
    non = baseline_pairs("non-attended", p, mask, sel, query_mask=qm, layer=0, heads=[0], fraction=1.0)
    want = torch.zeros(4, 4, dtype=torch.bool)
    want[1, 1] = want[2, 1] = want[2, 2] = True
    assert torch.equal(non[0, 0], want)
    non = baseline_pairs("non-attended", p, mask, sel, query_mask=qm, layer=0, heads=[0], fraction=1.0, bound=0.05)
    want[1, 1] = want[2, 1] = False
    assert torch.equal(non[0, 0], want)
    rnd = baseline_pairs("random", p, mask, sel, query_mask=qm, layer=0, heads=[0], fraction=1.0,
                         exclude_first=False)
    assert torch.equal(rnd[0, 0], mask[0, 0] & qm[0, 0][:, None])
    # the uniform numbers: deterministic, in [0, 1), close to uniform, sensitive to every argument
    i = torch.arange(20000)
    u = pair_uniform(0, 1, 2, i % 7, i // 7, i % 13, i % 11)
    assert u.min() >= 0 and u.max() < 1 and abs(float(u.mean()) - 0.5) < 0.01
    assert torch.equal(u, pair_uniform(0, 1, 2, i % 7, i // 7, i % 13, i % 11))
    for args in ((1, 1, 2), (0, 2, 2), (0, 1, 3)):
        assert not torch.equal(u, pair_uniform(*args, i % 7, i // 7, i % 13, i % 11))


def test_baseline_errors(random_models, batch_tokens):
    model = random_models["gpt2"]
    ids, am = batch_tokens
    with pytest.raises(SVToolsError, match="baseline"):
        head_sparsity(model, ids, baseline="shuffled", progress=False)
    with pytest.raises(SVToolsError, match="baseline_fraction"):
        head_sparsity(model, ids, baseline="random", baseline_fraction=0.0, progress=False)
    with pytest.raises(SVToolsError, match="baseline_bound"):
        head_sparsity(model, ids, baseline="non-attended", baseline_bound=2.0, progress=False)


# ----------------------------------------------------------------------------- which singular vectors

def _usage_frame(used_a, used_b, r=8):
    rows = [dict(layer=0, head=0, prompt=i, kind="attended", used=u, dominant_k=u[0] if u else 0, r=r)
            for i, u in enumerate(used_a)]
    rows += [dict(layer=0, head=0, prompt=i, kind="non-attended", used=u, dominant_k=u[0] if u else 0, r=r)
             for i, u in enumerate(used_b)]
    return pd.DataFrame(rows)


def test_usage_difference_closed_forms():
    # disjoint usage: distance 1 in both measures, and no permutation reaches it
    df = _usage_frame([(0, 1)] * 30, [(5,)] * 30)
    for measure in ("js", "tv"):
        out = usage_difference(df, measure=measure, n_perm=200).iloc[0]
        assert out["distance"] == pytest.approx(1.0)
        assert out["p_value"] == pytest.approx(1 / 201) and out["null_q95"] < 0.5
        assert (out["top_k_a"], out["top_k_b"], out["pairs_a"], out["pairs_b"]) == (0, 5, 30, 30)
    # hand-computed TV: attended P = (1/2, 1/2, 0), non-attended P = (1/2, 1/4, 1/4) -> TV = 1/4
    df = _usage_frame([(0, 1), (1, 0)], [(0,), (1, 2)])
    out = usage_difference(df, measure="tv", n_perm=50).iloc[0]
    assert out["distance"] == pytest.approx(0.25)
    # dominant index only: (0, 1) vs (0, 1) -> the same distribution
    assert usage_difference(df, on="dominant", measure="tv", n_perm=50).iloc[0]["distance"] == pytest.approx(0.0)
    # usage mass of singular_vector_usage: the same distribution, summing to 1 per group
    u = singular_vector_usage(df.assign(dominant_k_rotated=0), by=["layer", "head", "kind"])
    assert u.groupby("kind")["mass"].sum().tolist() == pytest.approx([1.0, 1.0])
    nonatt = u[u["kind"] == "non-attended"].set_index("k")["mass"]
    assert nonatt.to_dict() == pytest.approx({0: 0.5, 1: 0.25, 2: 0.25})


def test_usage_difference_null_is_calibrated():
    """Both kinds drawn from one distribution: the p-values of many heads are roughly uniform."""
    rng = np.random.default_rng(0)
    rows = []
    for head in range(40):
        for i in range(60):
            k = rng.choice(8, size=rng.integers(1, 4), replace=False, p=np.arange(8, 0, -1) / 36)
            rows.append(dict(layer=0, head=head, prompt=i, kind="attended" if i % 2 else "non-attended",
                             used=tuple(int(x) for x in k), dominant_k=int(k[0]), r=8))
    out = usage_difference(pd.DataFrame(rows), n_perm=200, seed=1)
    assert len(out) == 40
    assert 0.25 < out["p_value"].mean() < 0.75
    assert (out["p_value"] < 0.05).mean() < 0.2
    assert (out["distance"] > 0).all()  # finite samples: positive even when nothing differs


def test_usage_difference_errors():
    df = _usage_frame([(0,)], [(1,)])
    with pytest.raises(SVToolsError, match="no rows of kind"):
        usage_difference(df, kinds=("attended", "random"))
    with pytest.raises(SVToolsError, match="measure"):
        usage_difference(df, measure="kl")
    with pytest.raises(SVToolsError, match="n_perm"):
        usage_difference(df, n_perm=0)
    with pytest.raises(SVToolsError, match="lacks"):
        usage_difference(df.drop(columns=["kind"]))
