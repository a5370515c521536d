"""The calibrated spectrum null: the same head, its singular values kept, its singular vectors random.

A head's terms ``t_k = sigma_k (u_k . x~)(v_k . y~)`` can be sparse for two reasons: the inputs
line up with a few singular vectors (alignment), or the singular values fall off steeply, so
that a few ``k`` carry most of any score (the spectrum). The rotated control cannot tell the two
apart: it mixes large and small singular values and so flattens the spectrum (on featureless
Gaussian inputs it reports "sparser" for every uneven spectrum, most of all for low rank). This
null keeps the spectrum and removes only the alignment.

**Definition.** For one head with ``Omega~ = U diag(S) V^T`` (``r`` singular triples, in the
homogeneous ``d_in = d_model + 1`` input space when the model has biases), a *null head* has the
same singular values ``S`` and singular vectors ``U O_q``, ``V O_k``, where ``O_q`` and ``O_k``
are independent Haar-random ``r x r`` orthogonal matrices: its left and right singular vectors
are Haar-random orthonormal bases **of the spans of the head's own left and right singular
vectors** (the column spaces of ``[W_Q; b_Q]`` and ``[W_K; b_K]``). The null head therefore reads
the same query and key subspaces of the residual stream as the real head, with the same
spectrum; only which direction inside them gets which singular value is random. A query's
projections onto the null's singular vectors are ``p O_q`` with ``p = x~^T U`` (the real ones),
so the null costs an ``r x r`` product per draw.

**Centring** (``center``): the inputs of one context share a mean (the residual stream is
far from centred). With ``center=False`` the whole projection is rotated. With centring (the
default), each projection is split into the context's mean projection ``m`` (over the
context's real tokens) and the token's deviation from it, and only the deviation is rotated:
``p' = m + (p - m) O``. Why: a singular vector that reads the shared mean gives every pair of
the context one large common term (for relative attention the key side's mean cancels anyway);
that is alignment with a direction every token carries, not with the features that make the
head prefer one key to another. Centring makes the null keep that shared part, so the ratio
measures alignment with what varies from token to token; it is also what makes the null
calibrated on featureless inputs that have a mean. ``center=False`` counts alignment with the
mean as alignment. The two answers differ on real models (see the book, Part 3).

**Which null pair.** A pair is measured because of its attention: attended pairs have large
scores, and a large sum of terms is more often made by a few large terms, whatever the basis.
Comparing an attended pair's terms with the null head's terms *for the same pair* (which the
null head need not attend) therefore favours the real head: on featureless inputs with a
random head and peaked attention the same-pair ratio of attended pairs is 0.91-0.95, not 1.
So pairs chosen by attention (attended, non-attended) are compared with the null head's pair
**of the same rank**: the same query, and the key that the null head ranks where the real head
ranks the pair's key (ranks among the keys the selection may choose). Random pairs, chosen
without looking at attention, are compared with themselves.

**Estimates.** Each pair's null Rolls-Tovee and N_recon are means over ``draws`` independent
null heads (seeded); the ratio real / null is formed from means over pairs (ratio of means),
with intervals from resampling prompts.

**Computation.** :func:`spectrum_null` is the straightforward form (every draw's null scores on full
``(..., query, key, r)`` grids); :func:`head_sparsity` uses fast forms with the same numbers (up to
float rounding of near-tied null scores), in :mod:`svtools.sad.null_fast`:
:func:`~svtools.sad.null_fast.rows_null` for absolute positions (null scores only for the query
rows of rank-matched pairs, terms only for the pairs, all draws batched) and
:func:`~svtools.sad.null_fast.rotary_rows_null` for rotary heads with absolute scores (matrix products plus a bound on
the offset-dependent part; exact scores only for keys that can rank first). Tests compare both
with :func:`spectrum_null`.

Calibration (tests): on featureless Gaussian inputs the ratio is 1 within Monte-Carlo error for
flat, random-initialisation and rank-one spectra, attended and random pairs alike; on the toy
model, whose features are planted and aligned, attended pairs give a ratio well below 1.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Literal, Optional, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

import pandas as pd

from svtools._checks import SVToolsError, as_int
from svtools.qk import DEGENERATE_TOL, QKSVD, degenerate_groups, qk_svd, rotated_factors
from svtools.rotary import one_thread
from svtools.sparsity import n_recon, rolls_tovee
from svtools.terms import homogeneous, merge_degenerate

__all__ = ["DRAWS", "SPECTRA", "null_gaussians", "haar_q", "null_rotations", "rotate_projections", "key_ranks",
           "context_mean", "canonical_means", "NullAccumulator", "spectrum_null", "null_terms",
           "featureless_calibration"]

#: Default number of null heads drawn per head.
DRAWS = 16


def null_gaussians(seed: int, draws: int, d_in: int, r: int, streams: Sequence[Sequence[int]] = ((),), *,
                   dtype: torch.dtype = torch.float64, device=None) -> tuple[Tensor, Tensor]:
    """The null heads' random draws: ``(G_q, G_k)``, each ``(draws, stream, d_in, r)`` standard normal.

    One independent stream per entry of ``streams`` (e.g. ``(layer, head)``), seeded from
    ``seed`` and the entry only, so a head's null does not depend on which other heads are
    measured with it or how the prompts are chunked. Drawn in float64 on the CPU (the same
    numbers on every device), then cast and moved.
    """
    draws = as_int(draws, "draws", min_value=1)
    streams = [tuple(s) for s in streams]
    G = torch.empty(draws, len(streams), 2, int(d_in), int(r), dtype=torch.float64)

    def draw(i: int) -> None:
        h = (int(seed) * 1_000_003 + 0x5EED) % 2**63
        for v in streams[i]:
            h = (h * 1_000_033 + int(v) + 1) % 2**63
        g = torch.Generator().manual_seed(h)
        G[:, i] = torch.randn(draws, 2, int(d_in), int(r), generator=g, dtype=torch.float64)

    # independent generators: the streams are drawn side by side on the CPU's threads (the same numbers)
    workers = min(torch.get_num_threads(), len(streams))
    if workers > 1 and draws * d_in * r >= 2**16:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(draw, range(len(streams))))
    else:
        for i in range(len(streams)):
            draw(i)
    G = G.to(dtype=dtype, device=device)  # (draws, stream, 2, d_in, r)
    return G[:, :, 0], G[:, :, 1]


def haar_q(M: Float[Tensor, "... m r"]) -> Float[Tensor, "... m r"]:
    """The orthonormal factor of ``M = Q R`` with ``diag(R) > 0`` (unique for full-rank ``M``).

    For a standard normal square ``M`` it is Haar-distributed; it is equivariant,
    ``haar_q(W M) = W haar_q(M)`` for ``W`` with orthonormal columns, which is what makes the
    null below independent of the basis an SVD picks inside a degenerate subspace.
    """
    with one_thread():
        Q, R = torch.linalg.qr(M.to(torch.float64))
    d = torch.diagonal(R, dim1=-2, dim2=-1)
    return (Q * torch.where(d < 0, -1.0, 1.0)[..., None, :]).to(M.dtype)


def null_rotations(U: Float[Tensor, "... d_in r"], G: Float[Tensor, "draw ... d_in r"]) -> Float[Tensor, "draw ... r r"]:
    """``O = haar_q(U^T G)``: the rotation taking a head's singular basis ``U`` to its null basis.

    The null head's singular vectors are ``U O = haar_q(P_U G)`` with ``P_U`` the projector onto
    the span of ``U``: a random orthonormal basis of that span that depends on the span and on
    ``G`` only, not on which basis of it ``U`` is (``U R`` gives ``R^T O`` and the same ``U O``).
    With ``G`` standard normal, ``U^T G`` is a standard normal ``r x r`` matrix and ``O`` is
    Haar-random. Identity: ``O^T O = I``.
    """
    return haar_q(U.transpose(-1, -2).to(G.dtype) @ G)


def rotate_projections(p: Float[Tensor, "... r"], O: Float[Tensor, "... r r"],
                       mean: Optional[Float[Tensor, "... r"]] = None) -> Float[Tensor, "... r"]:
    """``p' = m + (p - m) O``: a null head's projections from the real ones (``m = 0`` uncentred).

    ``p = x~^T U`` are the projections onto the real singular vectors; ``p O`` are the
    projections onto ``U O``. Shapes broadcast (``O`` acts on the last axis of ``p``).
    """
    return (mean if mean is not None else 0.0) + _vecmat(p if mean is None else p - mean, O)


def _vecmat(p: Tensor, O: Tensor) -> Tensor:
    """``(p[..., None, :] @ O)[..., 0, :]`` as one batched product over the axes where ``O`` varies:
    the other axes of ``p`` become rows of the product (no tiny matrix products per element)."""
    r = p.shape[-1]
    n = max(p.ndim - 1, O.ndim - 2)
    P = p.reshape((1,) * (n - (p.ndim - 1)) + tuple(p.shape))
    M = O.reshape((1,) * (n - (O.ndim - 2)) + tuple(O.shape))
    keep = [i for i in range(n) if M.shape[i] != 1]
    fold = [i for i in range(n) if M.shape[i] == 1]
    P = P.expand(tuple(M.shape[i] if i in keep else P.shape[i] for i in range(n)) + (r,))
    Pp = P.permute(keep + fold + [n]).reshape(math.prod(M.shape[i] for i in keep), -1, r)
    Mm = M.reshape(-1, r, O.shape[-1])
    out = torch.bmm(Pp, Mm.to(Pp.dtype))
    shape = [M.shape[i] for i in keep] + [P.shape[i] for i in fold] + [O.shape[-1]]
    inv = [0] * (n + 1)
    for j, i in enumerate(keep + fold + [n]):
        inv[i] = j
    return out.reshape(shape).permute(inv)


def context_mean(p: Float[Tensor, "... n r"], valid: Optional[Bool[Tensor, "... n"]] = None,
                 dims: Sequence[int] = (-2,)) -> Float[Tensor, "... r"]:
    """Mean of projections over the token axes ``dims`` (``valid`` True for real tokens), kept as
    size-1 axes so it broadcasts back onto ``p``."""
    if valid is None:
        return p.mean(dim=tuple(dims), keepdim=True)
    w = valid.to(p.dtype)[..., None].expand(p.shape)
    return (p * w).sum(dim=tuple(dims), keepdim=True) / w.sum(dim=tuple(dims), keepdim=True).clamp_min(1)


def key_ranks(scores: Float[Tensor, "... query key"], eligible: Bool[Tensor, "... query key"]
              ) -> tuple[Int[Tensor, "... query key"], Int[Tensor, "... query key"]]:
    """Rank of each key among its query's eligible keys by score (0 = largest), and the order.

    Returns ``(rank, order)``: ``order[..., q, i]`` is the key of rank ``i`` (ineligible keys
    come last); ``rank`` is its inverse. Ties keep key order (stable), so ranks are reproducible.
    """
    s = torch.where(eligible, scores, torch.full((), -float("inf"), dtype=scores.dtype, device=scores.device))
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(s.shape[-1], device=s.device).expand_as(order))
    return rank, order


def canonical_means(mean_a: Float[Tensor, "... r"], mean_c: Float[Tensor, "... r"], S: Float[Tensor, "... r"],
                    tol: float = DEGENERATE_TOL) -> tuple[Tensor, Tensor]:
    """Centring's kept means, written in coordinates that do not depend on a degenerate group's basis.

    Centring keeps each singular vector's reading of the context mean (``mean_a[k] = u_k . x~_mean``).
    Inside a group of equal singular values (:func:`svtools.qk.degenerate_groups`) the ``u_k``
    are any basis of the group's subspace (``U_G R``, ``V_G R``), so the individual readings are
    not defined, only their dot products. Each group's two mean vectors are therefore rotated, by
    one orthogonal matrix, into canonical coordinates: the query mean along the group's first
    axis, the key mean in the first two (Gram-Schmidt); values outside groups are unchanged.
    Shapes broadcast; returns both means at the broadcast shape. Identity: dot products inside a
    group, hence the group's merged null terms, are unchanged.
    """
    shape = torch.broadcast_shapes(mean_a.shape, mean_c.shape, S.shape)
    r = shape[-1]
    ma, mc = mean_a.expand(shape).reshape(-1, r).clone(), mean_c.expand(shape).reshape(-1, r).clone()
    first = degenerate_groups(S.expand(shape).reshape(-1, r), tol)
    k = torch.arange(r, device=first.device)
    for e in (first != k).any(-1).nonzero()[:, 0].tolist():
        for g in torch.unique(first[e][first[e] != k]).tolist():
            idx = (first[e] == g).nonzero()[:, 0]
            a, c = ma[e, idx], mc[e, idx]
            swap = bool(a.norm() < 1e-12 * (1 + c.norm()))
            M = torch.cat([torch.stack([c, a] if swap else [a, c], -1), torch.eye(len(idx), dtype=a.dtype,
                                                                                    device=a.device)], -1)
            Q = haar_q(M)
            ma[e, idx], mc[e, idx] = Q.transpose(0, 1) @ a, Q.transpose(0, 1) @ c
    return ma.reshape(shape), mc.reshape(shape)


class NullAccumulator:
    """Running sums of the null's per-pair measures over draws (means on :meth:`result`)."""

    def __init__(self, n_pairs: int, frac: float, device=None) -> None:
        self.rt = torch.zeros(n_pairs, dtype=torch.float64, device=device)
        self.nr = torch.zeros(n_pairs, dtype=torch.float64, device=device)
        self.count = torch.zeros(n_pairs, dtype=torch.float64, device=device)
        self.frac = frac

    def add(self, terms: Float[Tensor, "pair r"]) -> None:
        ok = ~torch.isnan(terms).any(-1)
        t = torch.where(ok[:, None], terms, torch.ones_like(terms))
        rt = rolls_tovee(t).double()
        ok &= ~torch.isnan(rt)  # an all-zero term vector has no sparseness
        self.rt += torch.where(ok, rt, 0.0)
        self.nr += torch.where(ok, n_recon(t, self.frac).double(), 0.0)
        self.count += ok.double()

    def result(self) -> dict[str, Tensor]:
        c = self.count
        nan = torch.full_like(c, float("nan"))
        return {"rolls_tovee": torch.where(c > 0, self.rt / c.clamp_min(1), nan),
                "n_recon": torch.where(c > 0, self.nr / c.clamp_min(1), nan), "draws": c.to(torch.int64)}


def _scores(a: Tensor, c: Tensor, S: Tensor) -> Tensor:
    """``sum_k a_k S_k c_k`` over broadcast grids ``(..., q, k, r)``; a matrix product when
    ``a`` is constant along keys and ``c`` along queries (absolute positions)."""
    if a.shape[-2] == 1 and c.shape[-3] == 1 and S.shape[-2:-1] in ((), (1,)) and (S.ndim < 3 or S.shape[-3] == 1):
        s = S if S.ndim == 1 else S[..., 0, 0, :]
        return (a[..., 0, :] * s[..., None, :]) @ c[..., 0, :, :].transpose(-1, -2)
    return (a * S * c).sum(-1)


def spectrum_null(
    a: Float[Tensor, "... query key r"],
    c: Float[Tensor, "... query key r"],
    S: Float[Tensor, "... query key r"],
    pairs: Int[Tensor, "pair idx"],
    rotations: Optional[tuple[Float[Tensor, "draw ... r r"], Float[Tensor, "draw ... r r"]]] = None,
    *,
    projections: Optional[Callable[[int], tuple[Tensor, Tensor]]] = None,
    draws: Optional[int] = None,
    mask: Bool[Tensor, "... query key"],
    eligible: Optional[Bool[Tensor, "... query key"]] = None,
    match: Bool[Tensor, "pair"] | bool = True,
    mean_a: Optional[Float[Tensor, "... query key r"]] = None,
    mean_c: Optional[Float[Tensor, "... query key r"]] = None,
    relative: bool = False,
    frac: float = 1.0,
    merge_tol: Optional[float] = None,
) -> dict[str, Tensor]:
    """Per-pair null Rolls-Tovee and N_recon, averaged over null heads (see the module docstring).

    Grids broadcast to ``(..., query, key, r)``: ``a`` the query-side projections onto the real
    left singular vectors (``x~_q^T U``; constant along ``key`` for absolute positions, one per
    offset for rotary heads), ``c`` the key-side ones (``y~_k^T V``), ``S`` the singular values
    (``r`` for absolute positions; per offset for rotary heads). The real terms are
    ``a * S * c``. ``pairs`` indexes ``(..., query, key)`` (one column per leading axis, then
    query, then key). ``rotations``: ``(O_q, O_k)``, each ``(draw, *lead, r, r)`` with ``lead``
    broadcasting against the grids' ``(..., query, key)`` (:func:`null_rotations`);
    ``mean_a``/``mean_c``: the context means kept by centring (None: rotate the whole
    projection). Instead of ``rotations``, ``projections(d)`` may return draw ``d``'s null
    projections directly (``draws`` of them; used for rotary heads, whose null basis is one
    basis of the head's span at every offset).

    For each draw, the null head's projections are :func:`rotate_projections` of ``a`` and ``c``;
    a pair with ``match`` True is compared with the null pair of the same rank among its query's
    ``eligible`` keys (default ``mask``), one with ``match`` False with itself. ``relative``:
    terms minus their mean over the query's other visible keys (``mask``), as in
    :func:`svtools.relative_terms`. ``merge_tol``: sum the terms of (near-)degenerate singular
    values first (:func:`svtools.terms.merge_degenerate`, as the real terms are), and write the
    kept means in coordinates that do not depend on a group's basis (:func:`canonical_means`);
    None = no.

    Returns ``rolls_tovee``, ``n_recon`` (float: means over draws) and ``draws`` (the number of
    draws that gave the pair a defined value), each ``(pair,)``.
    """
    if (rotations is None) == (projections is None):
        raise SVToolsError("give either rotations=(O_q, O_k) or projections= (with draws=)")
    if rotations is not None:
        shift_a = shift_c = 0.0  # kept means in basis-free coordinates inside degenerate groups
        if merge_tol is not None and mean_a is not None and mean_c is not None:
            ca, cc = canonical_means(mean_a, mean_c, S, merge_tol)
            shift_a, shift_c = ca - mean_a, cc - mean_c
        O_q, O_k = (o.to(dtype=a.dtype, device=a.device) for o in rotations)
        if O_q.shape != O_k.shape or O_q.shape[-1] != O_q.shape[-2] or O_q.shape[-1] != a.shape[-1]:
            raise SVToolsError(f"rotations must be two (draw, ..., r, r) tensors with r = {a.shape[-1]}, got "
                               f"{tuple(O_q.shape)} and {tuple(O_k.shape)}")
        draws = O_q.shape[0]

        def projections(d: int) -> tuple[Tensor, Tensor]:
            return (rotate_projections(a, O_q[d], mean_a) + shift_a, rotate_projections(c, O_k[d], mean_c) + shift_c)
    elif draws is None:
        raise SVToolsError("projections= needs draws=")
    lead = torch.broadcast_shapes(a.shape[:-1], c.shape[:-1], S.shape[:-1], mask.shape)
    eligible = mask if eligible is None else eligible
    mask_b, elig_b = mask.expand(lead), eligible.expand(lead)
    idx = tuple(pairs.unbind(-1))
    if len(idx) != len(lead):
        raise SVToolsError(f"pairs must have {len(lead)} index columns (leading axes, query, key), "
                           f"got {pairs.shape[-1]}")
    match_t = torch.as_tensor(match, device=pairs.device).expand(pairs.shape[:1])
    real_rank = None
    if bool(match_t.any()):
        real_rank, _ = key_ranks(_scores(a, c, S).expand(lead), elig_b)
    acc = NullAccumulator(len(pairs), frac, device=pairs.device)
    if relative:
        maskf = mask_b.to(a.dtype)
        count = maskf.sum(-1)
    Sb = S
    for d in range(int(draws)):
        an, cn = projections(d)
        key = idx[-1]
        if real_rank is not None:
            _, order = key_ranks(_scores(an, cn, Sb).expand(lead), elig_b)
            rk = real_rank[idx]
            key = torch.where(match_t, order[idx[:-1] + (rk,)], idx[-1])
        pick = idx[:-1] + (key,)
        A, C, SS = an.expand(lead + a.shape[-1:]), cn.expand(lead + c.shape[-1:]), Sb.expand(lead + S.shape[-1:])
        t = A[pick] * SS[pick] * C[pick]
        if relative:
            # the query's sum of terms over its visible keys
            if cn.shape[-3] == 1 and an.shape[-2] == 1:
                ksum = torch.einsum("...qk,...kr->...qr", maskf, cn[..., 0, :, :].expand(lead[:-2] + cn.shape[-2:]))
                tot = A[pick] * SS[pick] * ksum[idx[:-1]]
            else:
                tot = (A * SS * C * maskf[..., None]).sum(-2)[idx[:-1]]
            cnt = count[idx[:-1]]
            t = t - (tot - t) / (cnt - 1).clamp_min(1)[:, None]
            t = torch.where((cnt >= 2)[:, None], t, torch.full_like(t, float("nan")))
        if merge_tol is not None:
            t = merge_degenerate(t, SS[pick], merge_tol)
        acc.add(t)
    return acc.result()


def null_terms(qk: QKSVD, x_query: Float[Tensor, "... d_model"], x_key: Float[Tensor, "... d_model"], *,
               seed: int = 0, draw: int = 0, mean_query: Optional[Float[Tensor, "d_model"]] = None,
               mean_key: Optional[Float[Tensor, "d_model"]] = None) -> Float[Tensor, "... r"]:
    """The terms of one null head for given inputs (the same pair; for figures and checks).

    ``qk``: one head (no batch dims, absolute positions). Null head ``draw`` of ``seed``
    (:func:`null_gaussians` with one stream, :func:`null_rotations`): singular values ``S``,
    singular vectors ``U O_q``, ``V O_k``. With ``mean_query``/``mean_key`` (centring), each
    projection keeps the mean's projection onto the real singular vectors and rotates the rest,
    as :func:`spectrum_null` does. Identity: with ``O = I`` these are :func:`svtools.sad_terms`.
    """
    if qk.rotary is not None or qk.batch_shape != ():
        raise SVToolsError("null_terms takes one head with absolute positions (index qk first, e.g. qk[head])")
    G_q, G_k = null_gaussians(seed, int(draw) + 1, qk.d_in, qk.r, dtype=qk.U.dtype, device=qk.U.device)
    O_q, O_k = null_rotations(qk.U, G_q[int(draw), 0]), null_rotations(qk.V, G_k[int(draw), 0])
    a, c = homogeneous(x_query, qk, "x_query") @ qk.U, homogeneous(x_key, qk, "x_key") @ qk.V
    ma = None if mean_query is None else homogeneous(mean_query, qk, "mean_query") @ qk.U
    mc = None if mean_key is None else homogeneous(mean_key, qk, "mean_key") @ qk.V
    return rotate_projections(a, O_q, ma) * qk.S * rotate_projections(c, O_k, mc)


#: The spectra of :func:`featureless_calibration`.
SPECTRA = ("flat", "random init", "rank one")


def featureless_calibration(
    spectra: Sequence[str] = SPECTRA,
    *,
    prompts: int = 64,
    n_tokens: int = 20,
    d_model: int = 64,
    d_head: int = 16,
    weight_scale: float = 0.6,
    mean: float = 0.0,
    draws: int = DRAWS,
    seed: int = 0,
) -> pd.DataFrame:
    """Both controls on inputs with no features: what each reports when there is nothing to find.

    Tokens are i.i.d. Gaussian ``x ~ N(mean * e_1, I)`` in ``d_model`` dimensions (``prompts``
    contexts of ``n_tokens``, causal mask); one head with homogeneous factors of Gaussian weights
    (std ``weight_scale``, zero biases) whose spectrum is replaced by ``"flat"`` (every
    ``sigma_k`` equal to the mean), kept (``"random init"``) or cut to its largest value
    (``"rank one"``). Its attention is ``softmax(scores / sqrt(d_head))``; attended pairs follow
    the ACC rule (attention >= 1 / visible keys, first key excluded), random pairs are a seeded
    20% sample. Nothing aligns with anything here, so a calibrated control must report a ratio
    real / control of 1.

    Returns one row per (spectrum, kind): ``spectrum, kind, pairs, rt`` (mean Rolls-Tovee in the
    singular basis), ``rt_rotated`` (the same scores over a Haar rotation of the basis,
    :func:`svtools.qk.rotated_factors`), ``rt_null`` (this module's null: rank-matched, centred),
    ``ratio_rotated = rt / rt_rotated``, ``ratio_null = rt / rt_null``.
    """
    g = torch.Generator().manual_seed(int(seed))
    x = torch.randn(prompts, n_tokens, d_model, generator=g, dtype=torch.float64)
    x[..., 0] += float(mean)
    W_Q = torch.randn(d_model, d_head, generator=g, dtype=torch.float64) * weight_scale
    W_K = torch.randn(d_model, d_head, generator=g, dtype=torch.float64) * weight_scale
    zero = torch.zeros(d_head, dtype=torch.float64)
    qk = qk_svd(W_Q, W_K, zero, zero)
    xt = torch.cat([x, torch.ones_like(x[..., :1])], -1)
    mask = torch.tril(torch.ones(n_tokens, n_tokens, dtype=torch.bool)).expand(prompts, n_tokens, n_tokens)
    eligible = mask.clone()
    eligible[..., 0] = False
    rows = []
    for name in spectra:
        if name == "flat":
            S = torch.full_like(qk.S, float(qk.S.mean()))
        elif name == "random init":
            S = qk.S
        elif name == "rank one":
            S = torch.cat([qk.S[:1], torch.zeros_like(qk.S[1:])])
        else:
            raise SVToolsError(f"unknown spectrum {name!r}: use one of {SPECTRA}")
        a, c = xt @ qk.U, xt @ qk.V  # (prompt, token, r)
        T = a[:, :, None, :] * S * c[:, None, :, :]
        scores = torch.where(mask, T.sum(-1) / d_head ** 0.5, torch.full((), -float("inf"), dtype=T.dtype))
        p = scores.softmax(-1)
        attended = (p >= 1.0 / mask.sum(-1, keepdim=True)) & eligible
        rnd = (torch.rand(mask.shape, generator=g, dtype=torch.float64) < 0.2) & eligible
        L, R = rotated_factors(QKSVD(U=qk.U, S=S, V=qk.V, has_bias=True), seed=int(seed))
        Tr = (xt @ L)[:, :, None, :] * (xt @ R)[:, None, :, :]
        A, C = a[:, :, None, :], c[:, None, :, :]
        for kind, sel in (("attended", attended), ("random", rnd)):
            pairs = sel.nonzero()
            G = null_gaussians(seed, draws, qk.d_in, qk.r)
            rot = (null_rotations(qk.U, G[0][:, 0]), null_rotations(qk.V, G[1][:, 0]))
            res = spectrum_null(A, C, S, pairs, rot, mask=mask, eligible=eligible,
                                match=kind == "attended", mean_a=context_mean(A, dims=(-3,)),
                                mean_c=context_mean(C, dims=(-2,)))
            idx = tuple(pairs.unbind(-1))
            rt, rt_rot = float(rolls_tovee(T[idx]).mean()), float(rolls_tovee(Tr[idx]).mean())
            rt_null = float(res["rolls_tovee"].mean())
            rows.append({"spectrum": name, "kind": kind, "pairs": len(pairs), "rt": rt, "rt_rotated": rt_rot,
                         "rt_null": rt_null, "ratio_rotated": rt / rt_rot, "ratio_null": rt / rt_null})
    return pd.DataFrame(rows)
