"""svtools.intervene: removing singular directions and zeroing heads, exactly, on copies.

The identities are checked against the model's *own* scores after the intervention (its
``hook_attn_scores``, or for BERT, whose attention runs inside Hugging Face, ``q . k`` from its
edited ``hook_q``/``hook_k``) and against its own attention weights, on random GPT-2, GPT-NeoX
(partial rotary), Llama (rotary, grouped-query) and BERT models.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

import svtools
from svtools import intervene as iv
from svtools.decomposition import attention_scale, layer_qk
from svtools._checks import UnsupportedModelError

FAMILIES = ["gpt2", "neox", "llama", "bert"]
#: tolerance relative to the largest |score| of the head (float32: measured 2-4e-7)
REL_TOL = 1e-5


def _own_scores(family, cache, layer, scale):
    """The model's own unscaled scores ``(batch, head, query, key)`` from its hooks."""
    if family != "bert":
        return cache[f"blocks.{layer}.attn.hook_attn_scores"].double() / scale
    q = cache[f"blocks.{layer}.attn.hook_q"].double()
    k = cache[f"blocks.{layer}.attn.hook_k"].double()
    return torch.einsum("bqhd,bkhd->bhqk", q, k)


def _run(model, ids, am):
    with torch.no_grad():
        logits, cache = model.run_with_cache(ids, attention_mask=am)
    return logits, cache


@pytest.mark.parametrize("family", FAMILIES)
def test_remove_and_keep_equal_scores_minus_terms(random_models, batch_tokens, family):
    model = random_models[family]
    ids, am = batch_tokens
    remove = {(1, 2): [0, 3], (1, 0): [1]}
    keep = {(1, 3): [2, 5]}
    twin = iv.intervene(model, remove=remove, keep=keep, zero_omega=[(0, 1)])
    _, c = _run(twin, ids, am)
    for layer in (0, 1):
        dec = svtools.decompose(twin, ids, layer, attention_mask=am, dtype=torch.float64, check_tol=None)
        got = _own_scores(family, c, layer, attention_scale(model, layer))
        mask = dec.mask[:, 0]
        want = dec.scores.clone()
        for h in range(model.cfg.n_heads):
            if (layer, h) in remove:
                want[:, h] = dec.scores[:, h] - dec.terms[:, h][..., remove[(layer, h)]].sum(-1)
            elif (layer, h) in keep:
                want[:, h] = dec.terms[:, h][..., keep[(layer, h)]].sum(-1)
            elif (layer, h) == (0, 1):
                want[:, h] = 0.0
            err = float((got[:, h] - want[:, h]).abs()[mask].max())
            assert err <= REL_TOL * float(dec.scores[:, h].abs()[mask].max()), (family, layer, h, err)
        # the model's own attention weights are the softmax of the changed scores
        pat = c[f"blocks.{layer}.attn.hook_pattern"].double()
        full = dec.mask.expand_as(want)
        soft = torch.softmax(torch.where(full, dec.scale * want, torch.finfo(torch.float64).min), -1)
        assert float((soft - pat)[full].abs().max()) < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_other_heads_and_earlier_layers_bitwise_unchanged(random_models, batch_tokens, family):
    model = random_models[family]
    ids, am = batch_tokens
    twin = iv.intervene(model, remove={(1, 2): [0, 1, 2]})
    _, c0 = _run(model, ids, am)
    _, c1 = _run(twin, ids, am)
    assert torch.equal(c0["blocks.1.hook_resid_pre"], c1["blocks.1.hook_resid_pre"])
    name = "blocks.1.attn.hook_attn_scores" if family != "bert" else "blocks.1.attn.hook_pattern"
    others = [h for h in range(model.cfg.n_heads) if h != 2]
    assert torch.equal(c0[name][:, others], c1[name][:, others])
    assert not torch.equal(c0[name][:, 2], c1[name][:, 2])
    # decompose reads the weights: it still describes the original head and says so
    svtools.decompose(twin, ids, 1, head=others, attention_mask=am)
    with pytest.raises(UnsupportedModelError):
        svtools.decompose(twin, ids, 1, head=2, attention_mask=am)


@pytest.mark.parametrize("family", FAMILIES)
def test_callers_model_untouched(random_models, batch_tokens, family):
    model = random_models[family]
    ids, am = batch_tokens
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n_hooks = {n: len(hp._forward_hooks) for n, hp in model.hook_dict.items()}  # BERT's bridge has its own
    ref, _ = _run(model, ids, am)
    twin = iv.intervene(model, remove={(0, 0): [0]}, zero_pattern=[(1, 1)])
    out = twin(ids, attention_mask=am)  # with gradients on: nothing of it may stay on the caller
    assert not torch.equal(out.detach(), ref)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert {n: len(hp._forward_hooks) for n, hp in model.hook_dict.items()} == n_hooks
    again, _ = _run(model, ids, am)
    assert torch.equal(again, ref)
    copy.deepcopy(model)  # a leaked non-leaf tensor would make this raise


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_pattern_removes_the_heads_output(random_models, batch_tokens, family):
    model = random_models[family]
    ids, am = batch_tokens
    twin = iv.intervene(model, zero_pattern=[(0, 3)])
    _, c0 = _run(model, ids, am)
    _, c1 = _run(twin, ids, am)
    z0 = c0["blocks.0.attn.hook_z"]
    assert float(c1["blocks.0.attn.hook_z"][:, :, 3].abs().max()) == 0.0
    # the output projection loses exactly the head's term z_h W_O[h]
    W_O = model.W_O[0, 3]
    want = c0["blocks.0.attn.o.hook_out"] - z0[:, :, 3] @ W_O  # the output projection, before any norm
    assert torch.allclose(c1["blocks.0.attn.o.hook_out"], want, atol=1e-4, rtol=1e-5)
    if family != "bert":  # where the bridge runs the softmax, a zero pattern gives the same model
        def zero(t, hook):
            t = t.clone()
            t[:, 3] = 0
            return t
        with torch.no_grad(), model.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", zero)]):
            via_pattern = model(ids, attention_mask=am)
        with torch.no_grad():
            assert torch.allclose(twin(ids, attention_mask=am), via_pattern, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_omega_gives_uniform_attention(random_models, batch_tokens, family):
    model = random_models[family]
    ids, am = batch_tokens
    _, c = _run(iv.intervene(model, zero_omega=[(1, 0)]), ids, am)
    dec_mask = svtools.decompose(model, ids, 1, head=0, attention_mask=am).mask[:, 0]
    pat = c["blocks.1.attn.hook_pattern"][:, 0]
    uniform = dec_mask.double() / dec_mask.double().sum(-1, keepdim=True)
    assert torch.allclose(pat.double(), uniform, atol=1e-6)


def test_rotary_removal_is_per_offset(random_models):
    """For a rotary head, direction k at pair (i, j) is the k-th of offset i - j's decomposition."""
    model = random_models["neox"]
    ids = torch.randint(1, 128, (2, 10), generator=torch.Generator().manual_seed(3))
    L, h, K = 1, 1, [0, 2]
    _, c0 = _run(model, ids, torch.ones_like(ids))
    _, c1 = _run(iv.intervene(model, remove={(L, h): K}), ids, torch.ones_like(ids))
    scale = attention_scale(model, L)
    before = _own_scores("neox", c0, L, scale)[:, h]
    after = _own_scores("neox", c1, L, scale)[:, h]
    x = c0[f"blocks.{L}.attn.q.hook_in"].double()
    y = c0[f"blocks.{L}.attn.k.hook_in"].double()
    qk = layer_qk(model, L, [h], n_pos=10, dtype=torch.float64)[0]
    worst, fixed_worst = 0.0, 0.0
    for i, j in itertools.product(range(10), range(10)):
        if j > i:
            continue
        t = svtools.sad_terms(qk, x[:, i], y[:, j], offset=i - j)[:, K].sum(-1)
        worst = max(worst, float((after[:, i, j] - (before[:, i, j] - t)).abs().max()))
        t0 = svtools.sad_terms(qk, x[:, i], y[:, j], offset=0)[:, K].sum(-1)  # the wrong reading
        fixed_worst = max(fixed_worst, float((after[:, i, j] - (before[:, i, j] - t0)).abs().max()))
    scale_of = float(before[torch.ones(10, 10).tril().bool().expand_as(before)].abs().max())
    assert worst <= REL_TOL * scale_of
    assert fixed_worst > 100 * REL_TOL * scale_of  # offset 0's directions at every pair are not what is removed


@pytest.mark.parametrize("family", ["gpt2", "neox"])
def test_float64_model_is_exact_to_rounding(batch_tokens, family):
    from conftest import _build

    model = svtools.load_model(_build(family), device="cpu", dtype=torch.float64)
    ids, am = batch_tokens
    K = [1, 4]
    dec = svtools.decompose(model, ids, 1, attention_mask=am, dtype=torch.float64)
    _, c0 = _run(model, ids, am)
    _, c1 = _run(iv.intervene(model, remove={(1, 2): K}), ids, am)
    scale = attention_scale(model, 1)
    own0, own1 = _own_scores(family, c0, 1, scale)[:, 2], _own_scores(family, c1, 1, scale)[:, 2]
    mask = dec.mask[:, 0]
    # against the model's own scores before: only the removed terms differ
    err = float((own1 - (own0 - dec.terms[:, 2][..., K].sum(-1))).abs()[mask].max())
    assert err < 1e-10 * float(own0.abs()[mask].max())


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_empty_removal_is_the_identity_and_hooks_match_the_copy(random_models, batch_tokens, family):
    model = random_models[family]
    ids, am = batch_tokens
    ref, _ = _run(model, ids, am)
    same, _ = _run(iv.intervene(model, remove={(1, 2): []}), ids, am)
    assert torch.equal(same, ref)
    twin_out, _ = _run(iv.intervene(model, remove={(1, 2): [0]}), ids, am)
    with torch.no_grad(), model.hooks(fwd_hooks=iv.intervention_hooks(model, remove={(1, 2): [0]})):
        hooked = model(ids, attention_mask=am)
    assert torch.equal(hooked, twin_out)
    assert torch.equal(_run(model, ids, am)[0], ref)


def test_bad_arguments(random_models):
    model = random_models["gpt2"]
    r = min(model.cfg.d_head, model.cfg.d_model + 1)
    with pytest.raises(svtools.SVToolsError, match="head"):
        iv.intervene(model, remove={(0, 9): [0]})
    with pytest.raises(svtools.SVToolsError, match="layer"):
        iv.intervene(model, zero_omega=[(5, 0)])
    with pytest.raises(svtools.SVToolsError, match="range"):
        iv.intervene(model, remove={(0, 0): [r]})
    with pytest.raises(svtools.SVToolsError, match="twice"):
        iv.intervene(model, remove={(0, 0): [1, 1]})
    with pytest.raises(svtools.SVToolsError, match="named twice"):
        iv.intervene(model, remove={(0, 0): [1]}, zero_pattern=[(0, 0)])
    with pytest.raises(svtools.SVToolsError, match="maps"):
        iv.intervene(model, remove=[(0, 0)])
    with pytest.raises(svtools.SVToolsError, match="layer, head"):
        iv.intervene(model, zero_omega=[0])
    with pytest.raises(svtools.SVToolsError):
        iv.intervene(model.original_model, zero_omega=[(0, 0)])
    with pytest.raises(svtools.SVToolsError, match="integer"):
        iv.intervene(model, remove={(0, 0): ["a"]})
    # a single direction, a set or a generator of directions are the same plan as a list
    plans = [iv.edit_plan(model, remove={(0, 0): d}) for d in (3, {3}, (k for k in [3]), [3], torch.tensor([3]))]
    assert all(p == plans[0] for p in plans) and plans[0][0].directions == (3,)


def test_sigma_matched_sets():
    sets = iv.sigma_matched_sets([0, 5], 16, 10, band=4, seed=1)
    assert len(sets) == 10 and len(set(sets)) == 10 and (0, 5) not in sets
    for s in sets:  # one member in band [0, 4), one in [4, 8)
        assert len(s) == 2 and 0 <= s[0] < 4 <= s[1] < 8
    assert sets == iv.sigma_matched_sets([5, 0], 16, 10, band=4, seed=1)
    assert sets != iv.sigma_matched_sets([0, 5], 16, 10, band=4, seed=2)
    # few possibilities: all of them, the chosen one left out unless asked for
    small = iv.sigma_matched_sets([0, 1], 16, 50, band=4)
    assert sorted(small) == sorted(set(itertools.combinations(range(4), 2)) - {(0, 1)})
    assert len(iv.sigma_matched_sets([0, 1], 16, 50, band=4, include_chosen=True)) == 6
    # many possibilities: sampled, distinct
    big = iv.sigma_matched_sets(list(range(0, 64, 2)), 64, 20, band=8, seed=0)
    assert len(set(big)) == 20
    assert [len(b) for b in iv.rank_bands(10, 4)] == [4, 4, 2]
    with pytest.raises(svtools.SVToolsError):
        iv.sigma_matched_sets([16], 16, 3)
    with pytest.raises(svtools.SVToolsError):
        iv.sigma_matched_sets([1, 1], 16, 3)
