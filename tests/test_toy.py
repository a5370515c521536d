"""Tests of svtools.toy: data distribution, losses, determinism, identities, tiny trainings."""


import pytest
import torch

from svtools import SVToolsError
from svtools.qk import rotary_matrices
from svtools.toy.training import _attn_loss, _recon_loss
from svtools.toy import (ToyConfig, linear_template, sample_batch, settle_step, summarize,
                         template_matrix, train, train_seeds)

TINY = dict(n_features=6, d_model=4, d_head=4, n_keys=4, steps=150, batch=64, log_every=50,
            device="cpu", template=[(0, 1, 1.0)], p_active=0.2)


def test_presets_match_the_paper():
    s = ToyConfig.single_pair()
    assert (s.n_features, s.d_model, s.d_head, s.template) == (20, 10, 10, [(0, 1, 1.0)])
    m = ToyConfig.many_pairs()
    assert (m.n_features, m.d_model, m.d_head) == (100, 50, 50)
    assert m.pairs == [(i, i + 20) for i in range(20)]
    st = m.strengths
    assert st[0] == pytest.approx(1.0) and st[-1] == pytest.approx(1 / 20)
    diffs = torch.tensor(st[1:]) - torch.tensor(st[:-1])
    assert torch.allclose(diffs, diffs[0].expand_as(diffs), atol=1e-6) and float(diffs[0]) < 0
    assert linear_template(1, 5) == [(0, 5, 1.0)]


def test_template_matrix_and_target_are_bilinear():
    cfg = ToyConfig(**{**TINY, "template": [(0, 1, 2.0), (2, 3, -1.0)], "target_scale": 3.0})
    T = template_matrix(cfg)
    assert T[0, 1] == 2.0 and T[2, 3] == -1.0 and int((T != 0).sum()) == 2
    b = sample_batch(cfg, 32, torch.Generator().manual_seed(0))
    expect = 3.0 * (2.0 * b.f_query[:, 0:1] * b.f_keys[:, :, 1] - b.f_query[:, 2:3] * b.f_keys[:, :, 3])
    assert torch.allclose(b.target, expect, atol=1e-6)
    assert b.f_query.shape == (32, 6) and b.f_keys.shape == (32, 4, 6)
    assert float(b.f_query.min()) >= 0 and float(b.f_query.max()) <= 1


def test_planting_puts_the_pair_in_query_and_one_key():
    cfg = ToyConfig(**{**TINY, "p_active": 0.0, "p_plant": 1.0})
    b = sample_batch(cfg, 200, torch.Generator().manual_seed(1))
    assert torch.all(b.f_query[:, 1:] == 0) and torch.all(b.f_query[:, 0] > 0)
    on = (b.f_keys > 0)
    assert torch.all(on[..., [0, 2, 3, 4, 5]].sum((1, 2)) == 0)
    assert torch.all(on[..., 1].sum(1) == 1)           # exactly one key carries feature 1
    none = sample_batch(cfg.replace(p_plant=0.0), 50, torch.Generator().manual_seed(1))
    assert float(none.f_query.abs().sum() + none.f_keys.abs().sum()) == 0.0


def test_activation_probability_and_values():
    cfg = ToyConfig(**{**TINY, "p_active": 0.3, "p_plant": 0.0})
    b = sample_batch(cfg, 20000, torch.Generator().manual_seed(2))
    frac = float((b.f_query > 0).float().mean())
    assert frac == pytest.approx(0.3, abs=0.01)
    vals = b.f_query[b.f_query > 0]
    assert float(vals.mean()) == pytest.approx(0.5, abs=0.01)    # Uniform[0, 1] when active


def test_activations_are_the_where_formula_bit_for_bit():
    """sample_batch's in-place draw gives exactly torch.where(u < p, u / p, 0) of the same uniforms."""
    cfg = ToyConfig(**{**TINY, "p_active": 0.3, "p_plant": 0.0})
    b = sample_batch(cfg, 500, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    u_q, u_k = torch.rand(500, 6, generator=g), torch.rand(500, 4, 6, generator=g)
    assert torch.equal(b.f_query, torch.where(u_q < 0.3, u_q / 0.3, torch.zeros(())))
    assert torch.equal(b.f_keys, torch.where(u_k < 0.3, u_k / 0.3, torch.zeros(())))


@pytest.mark.parametrize("p", [0.05, 0.1, 0.3, 1.0, 0.0123, 0.777])
def test_activation_draw_is_the_where_formula_for_every_float32_uniform(p):
    """The in-place draw (threshold on the negated quotient) equals torch.where(u < p, u / p, 0) in every
    bit, sign of zero included, for every value torch.rand can give in float32 (multiples of 2^-24)."""
    from svtools.toy.model import _activate_

    u = torch.arange(2**24, dtype=torch.float32).mul_(2.0**-24)
    ref = torch.where(u < p, u / p, torch.zeros(()))
    got = _activate_(u.clone(), p)
    assert torch.equal(got.view(torch.int32), ref.view(torch.int32))
    assert int((got > 0).sum()) == int((u < p).sum()) - 1  # u = 0 gives 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_recon_loss_and_its_gradient_are_autograds_bit_for_bit(dtype):
    """The fused reconstruction loss gives the value and gradient autograd gives the plain
    expression, exactly (zeros of relu included), for a weighted sum of the models' losses."""
    g = torch.Generator().manual_seed(3)
    z0 = torch.randn(3, 7, 5, 11, generator=g, dtype=dtype)
    z0[0, 0, 0, :3] = 0.0  # relu's kink: no gradient there, as autograd
    f = torch.rand(3, 7, 5, 11, generator=g, dtype=dtype) * (torch.rand(3, 7, 5, 11, generator=g) < 0.3)
    w = torch.tensor([1.0, 0.3, 2.5], dtype=dtype)
    za, zb = z0.clone().requires_grad_(True), z0.clone().requires_grad_(True)
    ref = ((torch.relu(za) - f) ** 2).sum(-1).mean(dim=(1, 2))
    new = _recon_loss(zb, f)
    assert torch.equal(ref, new)
    (ref * w).sum().backward()
    (new * w).sum().backward()
    assert torch.equal(za.grad, zb.grad)
    assert torch.equal(zb, z0)  # the input is left as it was


def test_attention_losses_vanish_at_target_and_ce_is_shift_invariant():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(2, 8, 5, generator=g)
    assert torch.allclose(_attn_loss(target, target, "ce"), torch.zeros(2), atol=1e-6)
    assert torch.allclose(_attn_loss(target + 4.0, target, "ce"), torch.zeros(2), atol=1e-5)
    assert torch.allclose(_attn_loss(target, target, "mse"), torch.zeros(2))
    assert torch.allclose(_attn_loss(target + 1.0, target, "mse"), torch.ones(2))
    assert bool((_attn_loss(torch.zeros_like(target), target, "ce") > 0).all())


def test_train_is_deterministic_and_keeps_the_svd_identity():
    cfg = ToyConfig(**TINY)
    a, b = train(cfg, progress=False), train(cfg, progress=False)
    assert torch.equal(a.features, b.features) and torch.equal(a.W_Q, b.W_Q)
    assert a.features.shape == (4, 6) and a.W_Q.shape == (4, 4) and a.omega.shape == (4, 4)
    assert torch.allclose(a.omega, a.W_Q.T @ a.W_K)
    assert torch.allclose(a.qk.omega(), a.omega, atol=1e-5)
    h = a.history
    assert h.step.tolist() == [50, 100, 150]
    assert h.cos_q.shape == (3, 1) and h.interference.shape == (3, 2) and h.sigma.shape == (3, 4)
    c = train(cfg.replace(seed=1), progress=False)
    assert not torch.equal(a.features, c.features)


def test_train_seeds_batches_independent_models():
    cfg = ToyConfig(**TINY)
    single = train(cfg, progress=False)
    (same,) = train_seeds(cfg, [cfg.seed], progress=False)
    assert torch.equal(single.features, same.features)
    runs = train_seeds(cfg, [0, 1, 2], progress=False)
    assert [r.cfg.seed for r in runs] == [0, 1, 2]
    assert not torch.equal(runs[0].features, runs[1].features)
    with pytest.raises(SVToolsError, match="distinct"):
        train_seeds(cfg, [1, 1], progress=False)


def test_autoencoder_alone_reconstructs():
    cfg = ToyConfig(**{**TINY, "head": False, "steps": 300})
    run = train(cfg, progress=False)
    assert run.W_Q is None and run.qk is None and run.omega is None
    assert float(run.history.loss_recon[-1]) < 0.5 * float(run.history.loss_recon[0])
    with pytest.raises(SVToolsError, match="no attention head"):
        run.alignment()


def test_single_pair_aligns_in_a_tiny_model():
    """The paper's claim in miniature: the attended pair owns the top singular pair."""
    cfg = ToyConfig(**{**TINY, "steps": 400, "p_plant": 0.5, "lr": 1e-2})
    run = train(cfg, progress=False)
    al = run.alignment()
    assert al.index.tolist() == [0]
    assert float(al.worst.min()) > 0.9 > 2 * al.chance
    assert float(run.history.loss_attn[-1]) < 0.5 * float(run.history.loss_attn[0])
    s = summarize(run)
    assert s["n_pairs"] == 1 and s["sigma_ratio"] < 0.5


def test_rotary_run_decomposes_every_offset():
    cfg = ToyConfig(**{**TINY, "rotary": True, "steps": 20})
    run = train(cfg, progress=False)
    assert run.qk_rotary.S.shape == (cfg.n_keys, cfg.d_head)
    M = rotary_matrices(run.rotary_spec(), cfg.d_head, dtype=torch.float64)
    for d in (1, cfg.n_keys):
        expect = run.W_Q.double().T @ M[d - 1] @ run.W_K.double()
        assert torch.allclose(run.qk_rotary.at_offset(d).omega().double(), expect, atol=1e-4)
    run.alignment(offset=2)
    with pytest.raises(SVToolsError, match="offsets"):
        train(ToyConfig(**{**TINY, "steps": 2}), progress=False).alignment(offset=1)


@pytest.mark.parametrize("bad, match", [
    (dict(attn_loss="hinge"), "attn_loss"), (dict(p_active=1.5), "p_active"),
    (dict(template=[(0, 9, 1.0)]), "out of range"), (dict(n_keys=1), "n_keys"),
    (dict(d_model=0), "d_model"), (dict(rotary=True, d_head=3), "even"), (dict(lr=-1.0), "lr"),
])
def test_bad_configs_raise(bad, match):
    with pytest.raises(SVToolsError, match=match):
        train(ToyConfig(**{**TINY, **bad}), progress=False)


def test_settle_step():
    steps = torch.arange(10, 110, 10)
    vals = torch.tensor([0.0, 0.1, 0.5, 0.95, 0.98, 1.0, 1.0, 0.99, 1.0, 1.0])
    assert settle_step(steps, vals, frac=0.1) == 40       # after 0.5 at step 30 it stays within 0.1
    assert settle_step(steps, torch.ones(10)) == 10
    with pytest.raises(SVToolsError):
        settle_step(steps, vals[:3])


def test_failing_pairs_reads_antipodal_sharing():
    """Two pairs whose features are antipodal share one singular pair: the weaker is reported as
    failing, wanting the index the stronger owns, with cosines -1 on both sides."""
    from svtools.qk import qk_svd
    from svtools.toy import ToyRun, failing_pairs

    D, N = 6, 8
    cfg = ToyConfig(n_features=N, d_model=D, d_head=D, template=[(0, 1, 1.0), (2, 3, 0.5), (4, 5, 0.3)])
    W = torch.zeros(D, N)
    W[0, 0], W[1, 1], W[0, 2], W[1, 3] = 1.0, 1.0, -1.0, -1.0      # pair 1 = -pair 0
    W[2, 4], W[3, 5], W[4, 6], W[5, 7] = 1.0, 1.0, 1.0, 1.0        # pair 2 on its own plane
    W_Q = torch.zeros(D, D)
    W_K = torch.zeros(D, D)
    W_Q[0, 0], W_K[0, 1] = 2.0, 1.0                                 # Omega = 2 e0 e1^T + 1 e2 e3^T
    W_Q[1, 2], W_K[1, 3] = 1.0, 1.0
    run = ToyRun(cfg, W, torch.zeros(N), W_Q, W_K, W_Q.T @ W_K, qk_svd(W_Q.T, W_K.T), None)
    df = failing_pairs(run)
    assert df["pair"].tolist() == [1]
    row = df.iloc[0]
    assert row["best k"] == 0 and row["k owned by pair"] == 0
    assert row["cos(w_i, w_i')"] == pytest.approx(-1.0) and row["cos(w_j, w_j')"] == pytest.approx(-1.0)
    assert row["w_i's closest feature"] == 0


def test_sweep_plot_marks_the_worst_seed():
    """The red marker is the minimum for a higher-is-better metric and the maximum otherwise
    (it used to take the minimum always, marking the best seed of sigma2/sigma1)."""
    import pandas as pd

    from svtools.plots import toy as toyplots

    df = pd.DataFrame([{"param": "lam", "value": v, "seed": s, "m": v + s} for v in (1.0, 10.0) for s in range(3)])
    for better, expected in ((True, [1.0, 10.0]), (False, [3.0, 12.0])):
        fig = toyplots.sweep(df, ["lam"], "m", ylabel="m", higher_is_better=better)
        marker = [ln for ln in fig.axes[0].get_lines() if ln.get_label() == "worst seed"][0]
        assert list(marker.get_ydata()) == expected
        assert fig.get_size_inches()[0] <= toyplots.WIDTH + 1e-9


def test_sweep_trains_a_repeated_configuration_once_with_the_rows_of_separate_runs(monkeypatch):
    """The base configuration appears in every field's row (``lam=1`` and ``n_keys=8`` are both
    the base): it is trained once, and every row equals a separate run's summary."""
    from svtools.toy import summarize, sweep, training

    cfg = ToyConfig(**{**TINY, "steps": 60})
    grid = {"lam": [0.5, cfg.lam], "n_keys": [cfg.n_keys, 3]}
    calls = []
    real = training.train_seeds
    monkeypatch.setattr(training, "train_seeds", lambda c, s, **kw: calls.append(c) or real(c, s, **kw))
    df = sweep(cfg, grid, [0, 1], progress=False)
    assert len(calls) == 3 and sum(c == cfg for c in calls) == 1
    assert len(df) == 8 and list(df["param"]) == ["lam"] * 4 + ["n_keys"] * 4
    for name, values in grid.items():  # what the sweep gave before: one train_seeds call per entry
        for value in values:
            for run in real(cfg.replace(**{name: value}), [0, 1], progress=False):
                row = df[(df.param == name) & (df.value == value) & (df.seed == run.cfg.seed)]
                alone = summarize(run)
                assert len(row) == 1 and set(row.columns) == {"param", "value", "seed", *alone}
                for k, v in alone.items():
                    got = row[k].item()
                    assert got == v or (v != v and got != got), (name, value, run.cfg.seed, k)
