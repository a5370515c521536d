"""Numerical content of Part 2's theorems (svtools.theory): closed forms, identities, limits."""

from __future__ import annotations

import math

import pytest
import torch

from svtools import SVToolsError, qk_svd
from svtools import theory as th

F64 = torch.float64


def _abs_cos(a, b):
    return float((a @ b).abs() / (a.norm() * b.norm()))


@pytest.fixture(scope="module")
def aniso():
    """An anisotropic frame in superposition: 24 unit features in R^8, ||E_X|| = 3."""
    return th.frame(24, 8, 3.0, seed=3, spectrum="power", dtype=F64)


# --------------------------------------------------------------------------- activations
def test_activation_moments_match_samples():
    act = th.Activation(p_active=0.3, low=0.2, high=1.4)
    g = torch.Generator().manual_seed(0)
    f = act.sample((400_000, 3), g, dtype=F64)
    assert abs(float(f.mean()) - act.mean) < 3e-3
    assert abs(float(f.var()) - act.variance) < 3e-3
    F_mc = f.T @ f / f.shape[0]
    assert torch.allclose(F_mc, act.second_moment(3), atol=5e-3)
    fc = th.Activation(p_active=0.3, low=0.2, high=1.4, centered=True).sample((400_000, 2), g, dtype=F64)
    assert abs(float(fc.mean())) < 3e-3 and abs(float(fc.var()) - act.variance) < 3e-3
    assert th.Activation.from_sparsity(0.9).p_active == pytest.approx(0.1)


@pytest.mark.parametrize("kw", [dict(p_active=0.0), dict(p_active=1.2), dict(low=1.0, high=0.5),
                                dict(p_active=1.0, low=1.0, high=1.0)])
def test_activation_rejects_bad_laws(kw):
    with pytest.raises(SVToolsError):
        th.Activation(**kw)


# --------------------------------------------------------------------------- Theorem 1
def test_theorem1_rank_one_and_whitened(aniso):
    X = aniso
    Y = th.frame(24, 8, 1.5, seed=4, dtype=F64)
    act = th.Activation(centered=True)
    Om = th.optimal_omega(X, Y, [(2, 5, 1.0)], act)
    U, S, Vh = torch.linalg.svd(Om)
    assert float(S[1] / S[0]) < 1e-10                        # rank one
    u, v = th.whitened_directions(X, Y, 2, 5)
    assert _abs_cos(U[:, 0], u) > 1 - 1e-12 and _abs_cos(Vh[0], v) > 1 - 1e-12
    assert _abs_cos(U[:, 0], X[:, 2]) < 0.99                  # raw feature is NOT the answer here
    # normal equations: Sigma_X Omega Sigma_Y = X T Y^T  (F = G = variance * I)
    T = torch.zeros(24, 24, dtype=F64)
    T[2, 5] = 1
    assert torch.allclose(X @ X.T @ Om @ Y @ Y.T, X @ T @ Y.T, atol=1e-10)


def test_corollary_isotropic_is_exact():
    X = th.frame(20, 10, 0.0, seed=1)                          # tight frame, float32
    assert th.interference(X) < 1e-5
    u, v = th.whitened_directions(X, X, 0, 1)
    assert _abs_cos(u, X[:, 0]) >= 0.9999 and _abs_cos(v, X[:, 1]) >= 0.9999
    Om = th.optimal_omega(X, X, [(0, 1, 1.0)], th.Activation(centered=True))
    qk = qk_svd(Om, torch.eye(10))
    assert _abs_cos(qk.U[:, 0], X[:, 0]) >= 0.9999 and _abs_cos(qk.V[:, 0], X[:, 1]) >= 0.9999
    assert torch.allclose(th.whitening_alignment(X), torch.ones(20), atol=1e-5)


def test_batched_indices_and_templates(aniso):
    u, v = th.whitened_directions(aniso, aniso, [0, 3], [1, 4])
    assert u.shape == (8, 2) and v.shape == (8, 2)
    u3, _ = th.whitened_directions(aniso, aniso, 3, 4)
    assert torch.allclose(u[:, 1], u3)
    T = torch.zeros(2, 24, 24, dtype=F64)
    T[0, 0, 1] = T[1, 3, 4] = 1
    Om = th.optimal_omega(aniso, aniso, T, th.Activation(centered=True))
    assert Om.shape == (2, 8, 8)
    assert torch.allclose(Om[1], th.optimal_omega(aniso, aniso, [(3, 4, 1.0)], th.Activation(centered=True)))


def test_nonzero_mean_changes_direction_only_in_superposition(aniso):
    act = th.Activation(p_active=0.2)                          # mean != 0
    Om = th.optimal_omega(aniso, aniso, [(0, 1, 1.0)], act)
    U, S, Vh = torch.linalg.svd(Om)
    assert float(S[1] / S[0]) < 1e-10                          # still rank one
    pu, pv = th.probe_directions(aniso, aniso, 0, 1, act)
    assert _abs_cos(U[:, 0], pu) > 1 - 1e-12 and _abs_cos(Vh[0], pv) > 1 - 1e-12
    wu, _ = th.whitened_directions(aniso, aniso, 0, 1)
    assert _abs_cos(U[:, 0], wu) < 0.9999                      # N > D: the mean matters
    # N <= D (features linearly independent): X^T Sigma^+ X = I, the mean correction vanishes
    g = torch.Generator().manual_seed(5)
    Z = torch.randn(8, 6, generator=g, dtype=F64)
    U2, _, _ = torch.linalg.svd(th.optimal_omega(Z, Z, [(0, 1, 1.0)], act))
    wz, _ = th.whitened_directions(Z, Z, 0, 1)
    assert _abs_cos(U2[:, 0], wz) > 1 - 1e-10


def test_correlated_activations_use_probe_direction(aniso):
    g = torch.Generator().manual_seed(2)
    A = torch.eye(24, dtype=F64) + 0.3 * torch.randn(24, 24, generator=g, dtype=F64)
    F = A @ A.T                                                # correlated features
    Om = th.optimal_omega(aniso, aniso, [(0, 1, 1.0)], F)
    U, _, Vh = torch.linalg.svd(Om)
    pu, pv = th.probe_directions(aniso, aniso, 0, 1, F)
    assert _abs_cos(U[:, 0], pu) > 1 - 1e-10 and _abs_cos(Vh[0], pv) > 1 - 1e-10
    wu, _ = th.whitened_directions(aniso, aniso, 0, 1)
    assert _abs_cos(U[:, 0], wu) < 0.999
    with pytest.raises(SVToolsError):
        th.optimal_omega(aniso, aniso, [(0, 1, 1.0)], -F)      # not PSD


def test_attention_loss_formula_and_minimum(aniso):
    act = th.Activation(p_active=0.3)
    T = [(0, 1, 1.0), (2, 3, -0.5)]
    g = torch.Generator().manual_seed(1)
    Om0 = 0.3 * torch.randn(8, 8, generator=g, dtype=F64)
    x, y, t = th.sample_pairs(aniso, aniso, T, act, 300_000, g)
    mc = float((((x @ Om0) * y).sum(-1) - t).pow(2).mean())
    exact = float(th.attention_loss(aniso, aniso, Om0, T, act))
    assert exact == pytest.approx(mc, rel=0.03)
    Om = th.optimal_omega(aniso, aniso, T, act).requires_grad_(True)
    L = th.attention_loss(aniso, aniso, Om, T, act)
    (grad,) = torch.autograd.grad(L, Om)
    assert float(grad.abs().max()) < 1e-10                     # stationary
    assert float(th.attention_loss(aniso, aniso, Om.detach() + 1e-2 * Om0, T, act)) > float(L.detach())
    assert float(th.attention_loss(aniso, aniso, torch.zeros(8, 8, dtype=F64), T, act, relative=True)) == \
        pytest.approx(1.0)


def test_sample_least_squares_identity_and_consistency(aniso):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(500, 5, generator=g, dtype=F64), torch.randn(500, 4, generator=g, dtype=F64)
    Om0 = torch.randn(5, 4, generator=g, dtype=F64)
    assert torch.allclose(th.least_squares_omega(x, y, ((x @ Om0) * y).sum(-1)), Om0, atol=1e-9)
    act = th.Activation(p_active=0.3)
    x, y, t = th.sample_pairs(aniso, aniso, [(0, 1, 1.0)], act, 200_000, g)
    Om_ls = th.least_squares_omega(x, y, t)
    Om = th.optimal_omega(aniso, aniso, [(0, 1, 1.0)], act)
    U1, _, V1 = torch.linalg.svd(Om_ls)
    U, _, V = torch.linalg.svd(Om)
    assert _abs_cos(U1[:, 0], U[:, 0]) > 0.99 and _abs_cos(V1[0], V[0]) > 0.99


def test_trained_bilinear_head_matches_closed_form():
    X = th.frame(12, 6, 2.0, seed=0, spectrum="power")
    act = th.Activation(p_active=0.25, centered=True)
    run = th.train_bilinear(X, X, [(0, 1, 1.0)], act, steps=400, batch=2048, lr=2e-2, progress=False)
    u, v = th.whitened_directions(X, X, 0, 1)
    assert _abs_cos(run.qk.U[:, 0], u) >= 0.99 and _abs_cos(run.qk.V[:, 0], v) >= 0.99
    assert torch.allclose(run.omega, run.W_Q @ run.W_K.T)


def test_toy_optimal_omega_minimises_the_toy_loss():
    from svtools.toy import ToyConfig, sample_batch, train

    run = train(ToyConfig.single_pair(attn_loss="mse", steps=20, batch=64), progress=False)
    Om = th.toy_optimal_omega(run, 4096, seed=7).double()
    bt = sample_batch(run.cfg, 4096, torch.Generator().manual_seed(7), dtype=F64)
    W = run.features.double()

    def loss(O):
        return float(((torch.einsum("bd,de,bme->bm", bt.f_query @ W.T, O, bt.f_keys @ W.T) - bt.target) ** 2).mean())

    assert loss(Om) < loss(run.omega.double())
    for E in (torch.eye(10, dtype=F64), torch.ones(10, 10, dtype=F64)):
        assert loss(Om) <= loss(Om + 1e-3 * E)                 # a minimum on the same samples


# --------------------------------------------------------------------------- interference, Theorem 2
@pytest.mark.parametrize("spectrum", ["spike", "power"])
@pytest.mark.parametrize("e", [0.0, 0.4, 3.0, 20.0])
def test_frame_has_prescribed_interference(spectrum, e):
    X = th.frame(64, 32, e, seed=2, spectrum=spectrum, dtype=F64)
    assert torch.allclose(X.norm(dim=0), torch.ones(64, dtype=F64), atol=1e-9)
    assert th.interference(X) == pytest.approx(e, abs=1e-6)
    lam = th.frame_spectrum(32, e, spectrum)
    assert float(lam.mean()) == pytest.approx(1.0) and float((lam - 1).abs().max()) == pytest.approx(e, abs=1e-9)


def test_interference_definitions():
    X = th.frame(30, 10, 2.5, seed=0, dtype=F64)
    E = th.interference_matrix(X)
    assert float(torch.linalg.matrix_norm(E, 2)) == pytest.approx(2.5, abs=1e-8)
    assert th.interference(7.0 * X) == pytest.approx(2.5, abs=1e-8)               # scale-free
    assert th.interference(X, "none") == pytest.approx(2.5 * 30 / 10, abs=1e-7)  # N/D larger
    assert th.interference(th.frame(30, 10, 0.75, seed=0, normalise="none")) == pytest.approx(0.25, abs=1e-5)
    Q, _ = torch.linalg.qr(torch.randn(10, 10, dtype=F64))
    assert th.interference(Q) < 1e-12                                              # orthonormal basis


def test_theorem2_worst_case_floor_is_valid_and_tight():
    g = torch.Generator().manual_seed(0)
    D, e = 12, 0.6
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=F64))
    lam = 1 + e * (2 * torch.rand(D, generator=g, dtype=F64) - 1)
    lam[0], lam[-1] = 1 + e, 1 - e
    Sig = (Q * lam) @ Q.T
    x = torch.randn(D, 5000, generator=g, dtype=F64)
    z = torch.linalg.solve(Sig, x)
    cos = (x * z).sum(0) / (x.norm(dim=0) * z.norm(dim=0))
    floor = float(th.alignment_floor(e))
    assert floor == pytest.approx(math.sqrt(1 - e * e))
    assert float(cos.min()) >= floor - 1e-12
    xw = math.sqrt(1 + e) * Q[:, 0] + math.sqrt(1 - e) * Q[:, -1]   # the worst direction attains it
    assert _abs_cos(xw, torch.linalg.solve(Sig, xw)) == pytest.approx(floor, abs=1e-12)
    assert float(th.alignment_floor(1.5)) == 0.0


@pytest.mark.parametrize("spectrum", ["spike", "power"])
def test_theorem2_mean_bound(spectrum):
    for e in (0.5, 5.0, 25.0):
        X = th.frame(64, 32, e, seed=1, spectrum=spectrum, dtype=F64)
        cos = th.whitening_alignment(X)
        b = float(th.mean_alignment_bound(X))
        assert float(cos.mean()) >= b - 1e-12 and float((cos ** 2).mean()) >= b - 1e-12
        assert b == pytest.approx(float(th.mean_alignment_bound(eigenvalues=th.frame_spectrum(32, e, spectrum))))
    assert float(th.mean_alignment_bound(eigenvalues=torch.ones(5))) == pytest.approx(1.0)


def test_alignment_sweep_small():
    df = th.alignment_sweep([0.0, 4.0], N=16, D=8, n_check=3, n_cov=2000, progress=False)
    assert list(df["level"]) == [0.0, 4.0]
    assert (df["svd_check"] < 1e-9).all()
    assert (df["cos_raw"] >= df["bound_mean"] - 1e-12).all()
    assert df["cos_raw"].iloc[0] == pytest.approx(1.0) and df["cos_raw"].iloc[1] < 0.99


# --------------------------------------------------------------------------- Theorem 3
def _theorem3_setup():
    D, N, i, j, sig = 6, 10, 0, 1, 2.0
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=F64))
    u, v = Q[:, 0], Q[:, 1]
    W = torch.zeros(D, N, dtype=F64)
    W[:, i], W[:, j] = u, 0.5 * v                               # sigma * (w_i.u) (w_j.v) = 1
    W[:, 2:] = Q[:, 2:] @ torch.randn(D - 2, N - 2, generator=g, dtype=F64)  # others in {u,v}-perp
    return W, sig * torch.outer(u, v), u, v, (i, j)


def test_theorem3_zero_loss_iff_others_avoid_u_and_v():
    W, Om, u, v, (i, j) = _theorem3_setup()
    T = [(i, j, 1.0)]
    act = th.Activation(p_active=0.3)
    assert float(th.attention_loss(W, W, Om, T, act, relative=True)) < 1e-20
    W2 = W.clone()
    W2[:, 4] += 0.1 * u                                         # one interfering feature
    assert float(th.attention_loss(W2, W2, Om, T, act, relative=True)) > 1e-4
    W3 = W.clone()
    W3[:, i] += 0.1 * v                                         # target i must avoid v
    assert float(th.attention_loss(W3, W3, Om, T, act, relative=True)) > 1e-4


def test_theorem3_gradient_on_non_target_lies_in_head_plane():
    g = torch.Generator().manual_seed(1)
    D, N, i, j, sig = 6, 10, 0, 1, 1.7
    W = torch.randn(D, N, generator=g, dtype=F64).requires_grad_(True)
    Q, _ = torch.linalg.qr(torch.randn(D, 2, generator=g, dtype=F64))
    u, v = Q[:, 0], Q[:, 1]
    act = th.Activation(p_active=0.3, centered=True)
    L = th.attention_loss(W, W, sig * torch.outer(u, v), [(i, j, 1.0)], act)
    (grad,) = torch.autograd.grad(L, W)
    a, b = W.detach().T @ u, W.detach().T @ v
    s4 = act.variance ** 2
    for k in range(2, N):
        pred = 2 * sig ** 2 * s4 * (b.norm() ** 2 * a[k] * u + a.norm() ** 2 * b[k] * v)
        assert torch.allclose(grad[:, k], pred, atol=1e-12)


def test_theorem3_training_pushes_non_targets_out():
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(8, 16, generator=g)
    W0 = W0 / W0.norm(dim=0)
    act = th.Activation(p_active=0.2)
    Om = th.optimal_omega(W0, W0, [(0, 1, 1.0)], act)
    run = th.train_frame(W0, Om, (0, 1), act, recon="none", steps=300, lr=1e-2, progress=False)
    assert float(run.overlap_u[-1]) < 0.1 * float(run.overlap_u[0])
    assert float(run.overlap_v[-1]) < 0.1 * float(run.overlap_v[0])
    assert float(run.loss_attn[-1]) < 1e-3 * float(run.loss_attn[0])
    assert torch.equal(run.omega, Om)


# --------------------------------------------------------------------------- corollary
def test_unwhiten_recovers_features(aniso):
    X = aniso
    Om = th.optimal_omega(X, X, [(0, 1, 1.0)], th.Activation(centered=True))
    qk = qk_svd(Om, torch.eye(8, dtype=F64))
    Ue, Ve = th.unwhiten(qk, X @ X.T)
    assert _abs_cos(Ue[:, 0], X[:, 0]) > 1 - 1e-10 and _abs_cos(Ve[:, 0], X[:, 1]) > 1 - 1e-10
    assert _abs_cos(qk.U[:, 0], X[:, 0]) < 0.99
    assert torch.allclose(Ue.norm(dim=0), torch.ones(Ue.shape[1], dtype=F64))
    with pytest.raises(SVToolsError):
        th.unwhiten(qk, torch.eye(7))


# --------------------------------------------------------------------------- bad input
def test_bad_input_errors(aniso):
    bad = aniso.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(SVToolsError, match="non-finite"):
        th.whitened_directions(bad, aniso, 0, 1)
    with pytest.raises(SVToolsError, match="shape"):
        th.whitened_directions(aniso[0], aniso, 0, 1)
    with pytest.raises(SVToolsError, match="index"):
        th.whitened_directions(aniso, aniso, 24, 0)
    with pytest.raises(SVToolsError, match="template"):
        th.optimal_omega(aniso, aniso, torch.zeros(3, 3), th.Activation())
    with pytest.raises(SVToolsError, match="out of range"):
        th.optimal_omega(aniso, aniso, [(0, 30, 1.0)], th.Activation())
    with pytest.raises(SVToolsError, match="normalise"):
        th.interference(aniso, "max")
    with pytest.raises(SVToolsError, match="N >= D"):
        th.frame(4, 8, 0.0)
    with pytest.raises(SVToolsError, match="D - 1"):
        th.frame(16, 8, 7.0)
    with pytest.raises(SVToolsError, match="spectrum"):
        th.frame(16, 8, 1.0, spectrum="flat")
    with pytest.raises(SVToolsError, match="loss"):
        th.train_bilinear(aniso, aniso, [(0, 1, 1.0)], th.Activation(), loss="l1")


def test_mean_drift_limits():
    X = th.frame(24, 8, 2.0, seed=0, dtype=F64)
    assert torch.allclose(th.mean_drift(X, th.Activation(centered=True)), torch.ones(24, dtype=F64), atol=1e-10)
    assert float(th.mean_drift(X, th.Activation(p_active=0.3)).min()) < 0.9999
    Z = th.frame(8, 8, 2.0, seed=0, dtype=F64)                  # N = D: mean correction vanishes
    assert torch.allclose(th.mean_drift(Z, th.Activation(p_active=0.3)), torch.ones(8, dtype=F64), atol=1e-8)


def test_head_report_reads_top_pair(aniso):
    act = th.Activation(p_active=0.2)
    Om = th.optimal_omega(aniso, aniso, [(0, 1, 1.0)], act)
    rep = th.head_report({"closed": Om, "qk": qk_svd(Om, torch.eye(8, dtype=F64)),
                          "random": torch.randn(8, 8, dtype=F64)}, aniso, aniso, 0, 1, activation=act)
    assert list(rep.method) == ["closed", "qk", "random"]
    assert rep.cos_probe[0] > 1 - 1e-10 and rep.cos_probe[1] > 1 - 1e-10 and rep.cos_probe[2] < 0.99
    assert rep.sigma2_over_sigma1[0] < 1e-10
    with pytest.raises(SVToolsError):
        th.head_report({"bad": torch.zeros(3, 3)}, aniso, aniso, 0, 1)


def test_measure_frame_levels_and_normalisations():
    from svtools.theory import frame, measure_frame

    X = frame(24, 8, 3.0, seed=2)
    m = measure_frame(X)
    assert m["D"] == 8 and m["N"] == 24
    assert m["interference"] == pytest.approx(3.0, abs=1e-4)
    assert m["interference_abs"] == pytest.approx(3.0 * 24 / 8, abs=1e-3)    # unit-norm: N/D times larger
    assert m["bound_mean"] <= m["cos_raw"] <= 1.0 and m["cos_raw_min"] <= m["cos_raw"]
    tight = measure_frame(torch.cat([torch.eye(8), -torch.eye(8)], 1))      # tight frame: exact alignment
    assert tight["interference"] == pytest.approx(0.0, abs=1e-6) and tight["cos_raw"] == pytest.approx(1.0)


def test_alignment_sweep_light_rows_match_checked_rows():
    from svtools.theory import alignment_sweep

    full = alignment_sweep([0.0, 4.0], N=24, D=12, seeds=(0,), n_check=2, n_cov=2000, progress=False)
    light = alignment_sweep([0.0, 4.0], N=24, D=12, seeds=(0,), n_check=0, progress=False)
    assert "svd_check" not in light.columns
    for col in ["interference", "interference_abs", "cos_raw", "bound_mean"]:
        assert light[col].tolist() == pytest.approx(full[col].tolist())
