r"""Rotary heads offset by offset: each (head, offset) decomposition, fast, from a shared factorisation.

With rotary position embeddings a head has one bilinear form per offset ``delta = i - j``,
``Omega~_delta = A M_delta B^T`` (``A = [W_Q; b_Q^T]``, ``B = [W_K; b_K^T]``, ``d_in x d_head``;
``M_delta`` turns each rotary pair of dimensions, :func:`svtools.qk.rotary_matrices`). Write
``B = Q_B R_B`` (``Q_B`` orthonormal columns, ``R_B`` upper triangular: the Cholesky factor of
``B^T B`` when ``B`` has full column rank) and ``A^T A = R_A^T R_A``. Then the right singular
vectors of ``Omega~_delta`` are ``Q_B v_k`` and its singular values ``sigma_k``, where
``v_k, sigma_k^2`` are the eigenvectors and eigenvalues of the ``r x r`` Gram matrix

.. math::

    \Gamma_\delta = C_\delta^\top C_\delta = R_B M_\delta^\top (A^\top A) M_\delta R_B^\top,
    \qquad C_\delta = R_A M_\delta R_B^\top,

and the left ones are ``u_k = A M_delta R_B^T v_k / sigma_k``. A score's terms need no ``u_k``:

.. math::

    t_k = \sigma_k (\tilde x \cdot u_k)(\tilde y \cdot Q_B v_k) = (\hat a \cdot v_k)(\hat b \cdot v_k),

    \hat a = R_B M_\delta^\top (A^\top \tilde x), \qquad
    \hat b = Q_B^\top \tilde y = R_B^{-\top} (B^\top \tilde y),

where ``A^T x~`` and ``B^T y~`` are the model's own pre-rotary query and key and ``b^`` is the same
at every offset. So each (head, offset) needs only ``V`` (``r x r``) and ``S``:
:func:`offset_eigh` computes them for any list of (head, offset) items.

How, and why this way (64 x 64 cores on one CPU thread): the eigendecomposition of ``Gamma`` in
float64 costs about half the SVD of ``C`` (``torch.linalg.eigh`` vs ``svd``), and gives the same
vectors to ~1e-12 when ``C`` is well conditioned; squaring the condition number costs accuracy
only for ill-conditioned cores, which take the SVD of ``C`` instead
(``sigma_max / sigma_min > EIGH_MAX_CONDITION``; the eigenvectors' error exceeds the SVD's by
``sigma_max / (sigma_i + sigma_j)``, which matters for close small singular values). Neighbouring
offsets share no work: the fastest rotary pair turns by about one radian per offset, so offset
``delta + 1``'s core is far from diagonal in offset ``delta``'s basis (off-diagonal 17% of its
norm on Pythia-shaped heads, 30% two offsets apart) and warm starts gain nothing. Items are decomposed in blocks spread over
``torch.get_num_threads()`` Python threads, each running single-threaded LAPACK (threads inside
one small decomposition only contend). Each item's result depends on that item alone (the same
bits whichever items are decomposed with it).

Sign convention (that of :func:`svtools.qk.qk_svd`): each ``u_k`` has a non-negative entry sum,
i.e. ``1^T A M_delta R_B^T v_k >= 0`` (``v_k`` flipped otherwise); ties of singular values are
resolved as LAPACK's ``eigh`` resolves them (deterministic).

The rotated control of :func:`svtools.sad.head_sparsity` turns each (head, offset) basis by its
own Haar rotation, drawn by :func:`offset_rotations` from ``(seed, layer, head, offset)`` alone.
:class:`RotaryFactors` / :func:`qk_svd_factored` give the same decompositions as
:func:`svtools.qk.qk_svd` in factored form (``U = A XA``, ``V = B XB`` per offset).
:mod:`svtools.factor_cache` keeps ``V, S`` and the rotations across calls.
"""

from __future__ import annotations

import functools
import hashlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from svtools._checks import SVToolsError, as_dtype, as_tensor, check_last_dims
from svtools.qk import QKSVD, RotarySpec, homogeneous_weights, qk_svd

__all__ = ["RotaryHeads", "offset_eigh", "offset_rotations", "rotation_seed", "EIGH_MAX_CONDITION", "one_thread",
           "cos_sin", "rotate_right", "RotaryFactors", "qk_svd_factored"]

#: Cores with ``sigma_max / sigma_min`` above this are decomposed by the SVD of ``C`` rather than
#: the eigendecomposition of ``C^T C`` (whose error in ``v_k`` grows with the condition number:
#: below it the two agree to ~1e-12, far under float32 rounding).
EIGH_MAX_CONDITION = 1e3
_BLOCK = 32  # items per decomposed block (64 x 64 float64 cores: ~1 MB of work arrays per block)


@contextmanager
def one_thread():
    """Run a block with one intra-op thread (restored after).

    Batched decompositions of many small (``d_head x d_head``) matrices gain nothing from
    threads inside each call and lose a lot when the machine is busy: on a loaded machine with
    two cores a batch of 64x64 SVDs ran 10-25x slower with 2 threads than with 1 (the threads
    spin-wait for each other). Process-wide setting: not for use from several threads.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _in_blocks(fn: Callable[[slice], None], n: int, block: int) -> None:
    """``fn`` on consecutive slices of ``range(n)``, over ``torch.get_num_threads()`` CPU threads."""
    slices = [slice(s, min(n, s + block)) for s in range(0, n, block)]
    workers = min(torch.get_num_threads(), len(slices))
    with one_thread():
        if workers <= 1:
            for sl in slices:
                fn(sl)
            return
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(fn, slices))


# ----------------------------------------------------------------------------- rotary algebra

def _pairs(spec: RotarySpec) -> tuple[Tensor, Tensor]:
    half = spec.rotary_dim // 2
    p = torch.arange(half)
    return (p, p + half) if spec.layout == "neox" else (2 * p, 2 * p + 1)


def cos_sin(spec: RotarySpec, offsets: Tensor) -> tuple[Tensor, Tensor]:
    """``attention_scaling^2 * (cos, sin)(delta * inv_freq)`` for each offset: ``(n, rotary_dim // 2)`` float64."""
    ang = offsets.to(torch.float64).cpu()[:, None] * spec.inv_freq.to(torch.float64).cpu()[None, :]
    a2 = float(spec.attention_scaling) ** 2
    return a2 * torch.cos(ang), a2 * torch.sin(ang)


def rotate_right(x: Float[Tensor, "... d_head"], c: Tensor, s: Tensor, spec: RotarySpec) -> Tensor:
    """``x^T M_delta`` along the last dim (row vectors), with ``c, s`` from :func:`cos_sin`
    broadcast against ``x[..., pairs]``; non-rotary dims pass unchanged.

    ``M_delta`` is :func:`svtools.qk.rotary_matrices`' matrix: ``(x^T M)_a = c x_a - s x_b``,
    ``(x^T M)_b = s x_a + c x_b`` for each rotary pair ``(a, b)``. ``M^T y = (y^T M)^T``.
    """
    ia, ib = (i.to(x.device) for i in _pairs(spec))
    c, s = c.to(x.dtype).to(x.device), s.to(x.dtype).to(x.device)
    x = x.expand(torch.broadcast_shapes(x.shape[:-1], c.shape[:-1]) + x.shape[-1:])
    xa, xb = x[..., ia], x[..., ib]
    out = x.clone()
    out[..., ia] = xa * c - xb * s
    out[..., ib] = xa * s + xb * c
    return out


# ----------------------------------------------------------------------------- the offset-free part

@dataclass(frozen=True)
class RotaryHeads:
    """The offset-independent part of rotary heads' decompositions (see the module doc).

    Shapes (``H`` heads, ``r = min(d_in, d_head)``): ``A, B (H, d_in, d_head)`` homogeneous
    weights in the decomposition dtype; ``RA, RB (H, r, d_head)`` float64 with ``A^T A = RA^T RA``
    and ``B = Q_B RB``; ``colsum (H, d_head)`` float64, ``1^T A`` (the sign convention);
    ``key_map (H, d_head, r)``: ``b^ = (B^T y~) @ key_map[h]`` (``RB^-1``) for heads with
    ``full_rank``; ``QB (H, d_in, r)`` (``b^ = y~ @ QB[h]``) for the others (rank-deficient or
    ``d_in < d_head``: the QR route); ``keys``: one digest per head (:class:`FactorCache`).
    """

    A: Float[Tensor, "head d_in d_head"]
    B: Float[Tensor, "head d_in d_head"]
    RA: Float[Tensor, "head r d_head"]
    RB: Float[Tensor, "head r d_head"]
    colsum: Float[Tensor, "head d_head"]
    key_map: Float[Tensor, "head d_head r"]
    QB: Optional[Float[Tensor, "head d_in r"]]
    full_rank: Tensor
    spec: RotarySpec
    has_bias: bool
    keys: tuple[bytes, ...]

    @property
    def r(self) -> int:
        return self.RA.shape[-2]

    @property
    def dtype(self) -> torch.dtype:
        return self.A.dtype

    @classmethod
    def from_weights(cls, W_Q: Tensor, W_K: Tensor, b_Q: Optional[Tensor], b_K: Optional[Tensor],
                     spec: RotarySpec, dtype: torch.dtype) -> "RotaryHeads":
        """From per-head weights ``W (H, d_model, d_head)``, biases ``(H, d_head)`` or None."""
        bias = b_Q is not None or b_K is not None
        A = homogeneous_weights(W_Q.to(dtype), None if b_Q is None else b_Q.to(dtype), bias)
        B = homogeneous_weights(W_K.to(dtype), None if b_K is None else b_K.to(dtype), bias)
        return cls.from_sides(A, B, spec, bias)

    @classmethod
    def from_sides(cls, A: Float[Tensor, "head d_in d_head"], B: Float[Tensor, "head d_in d_head"],
                   spec: RotarySpec, has_bias: bool) -> "RotaryHeads":
        """From the homogeneous sides ``A = [W_Q; b_Q^T]``, ``B = [W_K; b_K^T]`` (their dtype is kept)."""
        if spec.rotary_dim > A.shape[-1]:
            raise SVToolsError(f"rotary_dim {spec.rotary_dim} exceeds d_head {A.shape[-1]}")
        dtype, bias = A.dtype, has_bias
        A64, B64 = A.to("cpu", torch.float64), B.to("cpu", torch.float64)  # factors: on the CPU, any device
        d_in, d = A.shape[-2:]
        LA, infoA = torch.linalg.cholesky_ex(A64.mT @ A64)
        LB, infoB = torch.linalg.cholesky_ex(B64.mT @ B64)
        full = (infoA == 0) & (infoB == 0) & (d_in >= d)
        RA, RB, QB = LA.mT, LB.mT, None
        if not bool(full.all()):  # the QR route: R may be singular or wide, Q_B is kept for b^
            QA_, RA_q = torch.linalg.qr(A64)
            QB_, RB_q = torch.linalg.qr(B64)
            sa, sb = (torch.sign(torch.diagonal(R, dim1=-2, dim2=-1)) for R in (RA_q, RB_q))
            sa, sb = (torch.where(x == 0, torch.ones_like(x), x) for x in (sa, sb))
            RA_q, RB_q, QB_ = RA_q * sa[..., :, None], RB_q * sb[..., :, None], QB_ * sb[..., None, :]
            if d_in < d:
                RA, RB = RA_q, RB_q
            else:
                RA = torch.where(full[:, None, None], RA, RA_q)
                RB = torch.where(full[:, None, None], RB, RB_q)
            QB = QB_.to(A.device, dtype)
        if RB.shape[-2] == RB.shape[-1]:  # RB^-1 of the full-rank heads (zeros elsewhere: QB is used)
            eye = torch.eye(d, dtype=torch.float64, device=RB.device)
            safe = torch.where(full[:, None, None], RB, eye)
            key_map = torch.linalg.solve_triangular(safe, eye.expand_as(RB), upper=True) * full[:, None, None]
        else:
            key_map = torch.zeros(RB.shape[0], d, RB.shape[-2], dtype=torch.float64, device=RB.device)
        colsum = A64.sum(-2)
        keys = tuple(_digest(RA[h], RB[h], colsum[h], spec, dtype) for h in range(A.shape[0]))
        return cls(A=A, B=B, RA=RA, RB=RB, colsum=colsum, key_map=key_map.to(A.device, dtype), QB=QB, full_rank=full,
                   spec=spec, has_bias=bias, keys=keys)

    def whiten_keys(self, kb: Float[Tensor, "... head pos d_head"], y: Optional[Tensor] = None
                    ) -> Float[Tensor, "... head pos r"]:
        """``b^ = Q_B^T y~`` from the pre-rotary keys ``kb = y~ B`` (``(batch, head, pos, d_head)``);
        heads without ``full_rank`` need the homogeneous inputs ``y (batch, pos, d_in)``."""
        out = torch.einsum("bhnd,hdr->bhnr", kb, self.key_map)
        if self.QB is not None:
            bad = (~self.full_rank).nonzero()[:, 0].tolist()
            if bad:
                if y is None:
                    raise SVToolsError("rank-deficient rotary heads need the key inputs to whiten keys")
                out[:, bad] = torch.einsum("bnd,hdr->bhnr", y.to(self.dtype), self.QB[bad])
        return out

    def whiten_queries(self, qa: Float[Tensor, "n d_head"], head: Tensor, offsets: Tensor) -> Float[Tensor, "n r"]:
        """``a^ = R_B M_delta^T a`` for pre-rotary queries ``qa`` of items ``(head[n], offsets[n])``."""
        c, s = cos_sin(self.spec, offsets)
        a = rotate_right(qa, c, s, self.spec)
        out = torch.empty(qa.shape[:-1] + (self.r,), dtype=qa.dtype, device=qa.device)
        RBt = self.RB.to(qa.device, qa.dtype).mT
        for h in torch.unique(head.cpu()).tolist():
            m = head == h
            out[m] = a[m] @ RBt[h]
        return out


def _digest(RA: Tensor, RB: Tensor, colsum: Tensor, spec: RotarySpec, dtype: torch.dtype) -> bytes:
    h = hashlib.blake2b(digest_size=20)
    for t in (RA, RB, colsum, spec.inv_freq.to(torch.float64)):
        h.update(t.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    h.update(repr((tuple(RA.shape), spec.rotary_dim, spec.layout, float(spec.attention_scaling), str(dtype),
                   EIGH_MAX_CONDITION)).encode())
    return h.digest()


# ----------------------------------------------------------------------------- per-offset decompositions

def _eigh_block(heads: RotaryHeads, h: Tensor, o: Tensor) -> tuple[Tensor, Tensor]:
    """``V, S`` (float64) of items ``(h[n], o[n])``; see :func:`offset_eigh`."""
    spec = heads.spec
    c, s = cos_sin(spec, o)
    RBt = heads.RB[h].mT
    C = rotate_right(heads.RA[h], c[:, None, :], s[:, None, :], spec) @ RBt  # R_A M R_B^T
    lam, V = torch.linalg.eigh(C.mT @ C)
    S, V = lam.flip(-1).clamp_min(0).sqrt(), V.flip(-1)
    bad = ~(S[:, -1] * EIGH_MAX_CONDITION >= S[:, 0])  # ill-conditioned (or NaN): the SVD of C
    if bool(bad.any()):
        _, Sb, Vh = torch.linalg.svd(C[bad])
        S[bad], V[bad] = Sb, Vh.mT
    w = rotate_right(heads.colsum[h], c, s, spec)[:, None, :] @ RBt  # 1^T A M R_B^T
    sign = torch.sign(w @ V)
    return V * torch.where(sign == 0, torch.ones_like(sign), sign), S


def offset_eigh(heads: RotaryHeads, head: Tensor, offsets: Tensor, *,
                sink: Optional[Callable[[Tensor, tuple[Tensor, Tensor]], None]] = None
                ) -> Optional[tuple[Float[Tensor, "n r r"], Float[Tensor, "n r"]]]:
    """``V, S`` (float64, CPU) of items ``(head[n], offsets[n])``: ``Gamma = V diag(S^2) V^T``, S descending.

    ``V``'s columns are the right singular vectors of the core ``C_delta`` (in ``Q_B``
    coordinates), signed by the convention of the module doc. Identity (the engine checks it on
    a random vector): ``R_B M^T A^T A M R_B^T V = V diag(S^2)``. With ``sink``, each block of
    items is handed to ``sink(positions, (V, S))`` as it is done (from worker threads; blocks are
    disjoint) and nothing is returned.
    """
    head, offsets = torch.as_tensor(head).long().cpu(), torch.as_tensor(offsets).long().cpu()
    if sink is None:
        r = heads.r
        V = torch.empty(len(head), r, r, dtype=torch.float64)
        S = torch.empty(len(head), r, dtype=torch.float64)

        def store(pos: Tensor, vs: tuple[Tensor, Tensor]) -> None:
            V[pos], S[pos] = vs

        offset_eigh(heads, head, offsets, sink=store)
        return V, S
    pos = torch.arange(len(head))
    _in_blocks(lambda sl: sink(pos[sl], _eigh_block(heads, head[sl], offsets[sl])), len(head), _BLOCK)
    return None


def rotation_seed(seed: int, layer: int, head: int, offset: Optional[int] = None) -> int:
    """Generator seed of the rotated control's rotation for ``(seed, layer, head[, offset])``."""
    h = (int(seed) * 1_000_003 + int(layer) * 10_007 + int(head)) % 2**63
    return h if offset is None else (h * 1_000_033 + 7 * int(offset) + 1) % 2**63


def _haar_block(seeds: Sequence[int], r: int) -> Tensor:
    """Haar rotations ``(len(seeds), r, r)`` float64 from Householder reflections of fresh normals
    (:func:`offset_rotations` says how); ``D = diag(sign beta_k)`` makes ``R``'s diagonal positive."""
    flat = _haar_layout(r)
    n = len(seeds)
    X = torch.zeros(n, r * r, dtype=torch.float64)
    X[:, flat] = torch.stack([torch.randn(len(flat), generator=torch.Generator().manual_seed(sd))
                              for sd in seeds]).to(torch.float64)
    X = X.view(n, r, r)  # column k holds x_k from the diagonal down
    alpha = torch.diagonal(X, dim1=-2, dim2=-1)
    norm = torch.linalg.vector_norm(X, dim=-2)  # |x_k|
    beta = torch.where(alpha < 0, norm, -norm)  # larfg: beta = -sign(alpha) |x_k|
    beta[:, -1] = alpha[:, -1]  # a 1-vector: no reflection (tau = 0), beta = alpha
    tau = (beta - alpha) / beta
    X /= torch.where(tau != 0, alpha - beta, torch.ones_like(alpha))[:, None, :]  # v_k (its diagonal unused)
    Q = torch.linalg.householder_product(X, tau)
    d = torch.sign(beta)
    return Q * torch.where(d == 0, torch.ones_like(d), d)[:, None, :]


@functools.lru_cache(maxsize=8)
def _haar_layout(r: int) -> Tensor:
    """Positions ``row * r + col`` of the lower triangle of an ``r x r`` matrix, column by column."""
    rows, cols = torch.tril_indices(r, r)
    order = torch.argsort(cols * r + rows)
    return rows[order] * r + cols[order]


def offset_rotations(seed: int, layer: int, heads: Sequence[int], offsets: Sequence[int], r: int, *,
                     dtype: torch.dtype = torch.float32, device=None,
                     sink: Optional[Callable[[Tensor, tuple[Tensor]], None]] = None
                     ) -> Optional[Float[Tensor, "n r r"]]:
    """The control's Haar rotation of each item ``(heads[n], offsets[n])`` of ``(seed, layer)``.

    Item ``n`` depends only on ``rotation_seed(seed, layer, heads[n], offsets[n])`` and ``r``:
    ``r (r + 1) / 2`` float32 standard normals from a generator seeded with it, read column by
    column as the vectors ``x_k`` (length ``r - k``) of Householder reflections ``H_k`` (LAPACK's
    ``larfg``: ``H_k x_k = beta_k e_1``), and ``Q = H_0 ... H_(r-2) diag(sign beta_k)`` in float64
    on the CPU. That is distributed exactly as the ``Q`` of the QR factorisation of a Gaussian
    matrix with ``R``'s diagonal made positive (after ``k`` reflections the rest of a Gaussian
    column is again a fresh Gaussian vector), i.e. Haar, for one ``orgqr`` and half the normals
    of a QR of a drawn matrix. The same numbers on every device and whichever items are drawn
    together; then cast and moved. With ``sink``: blocks go to ``sink(positions, (Q,))`` in float64 as in
    :func:`offset_eigh`, and nothing is returned.
    """
    seeds = [rotation_seed(seed, layer, h, o) for h, o in zip(heads, offsets)]
    if sink is None:
        out = torch.empty(len(seeds), r, r, dtype=torch.float64)

        def store(pos: Tensor, q: tuple[Tensor]) -> None:
            out[pos] = q[0]

        offset_rotations(seed, layer, heads, offsets, r, sink=store)
        return out.to(dtype=dtype, device=device)
    pos = torch.arange(len(seeds))
    _in_blocks(lambda sl: sink(pos[sl], (_haar_block(seeds[sl], r),)), len(seeds), _BLOCK)
    return None


# ----------------------------------------------------------------------------- factored form of qk_svd

@dataclass(frozen=True)
class RotaryFactors:
    r"""Rotary heads' per-offset SVDs in factored form, sharing the offset-independent side.

    For offset :math:`\delta` = ``offsets[o]``: ``U[..., o] = A @ XA[..., o]``,
    ``V[..., o] = B @ XB[..., o]`` and :math:`\tilde\Omega_\delta = A M_\delta B^\top =
    U_o \operatorname{diag}(S_o) V_o^\top` (the same decomposition :func:`svtools.qk.qk_svd`
    returns, signs included, without the :math:`d_\text{in}\times r` matrices per offset). A
    score's terms are then :math:`((\tilde x A)\, X_{A,o} S_o)_k\, ((\tilde y B)\, X_{B,o})_k`: the
    projections :math:`\tilde x A`, :math:`\tilde y B` (the pre-rotary query and key) are shared by
    every offset.

    Shapes: ``A, B (..., d_in, d_head)`` (homogeneous ``[W; b^T]`` when ``has_bias``),
    ``XA, XB (..., offset, d_head, r)``, ``S (..., offset, r)``; ``rotary.offsets`` lists the
    offsets decomposed. Rank-deficient sides cannot be written this way; then ``A, B`` are the
    identity (``d_in x d_in``) and ``XA, XB`` the full ``U, V``.
    """

    A: Float[Tensor, "... d_in d_head"]
    B: Float[Tensor, "... d_in d_head"]
    XA: Float[Tensor, "... offset d_head r"]
    S: Float[Tensor, "... offset r"]
    XB: Float[Tensor, "... offset d_head r"]
    has_bias: bool
    rotary: RotarySpec

    @property
    def r(self) -> int:
        return self.S.shape[-1]

    def qksvd(self) -> QKSVD:
        """The dense :class:`QKSVD` (``U = A XA`` for every offset; memory ``offset * d_in * r``)."""
        return QKSVD(U=self.A[..., None, :, :] @ self.XA, S=self.S, V=self.B[..., None, :, :] @ self.XB,
                     has_bias=self.has_bias, rotary=self.rotary)


def qk_svd_factored(
    W_Q: Float[Tensor, "... d_model d_head"],
    W_K: Float[Tensor, "... d_model d_head"],
    b_Q: Optional[Float[Tensor, "... d_head"]] = None,
    b_K: Optional[Float[Tensor, "... d_head"]] = None,
    *,
    rotary: RotarySpec,
    dtype: Optional[torch.dtype] = None,
) -> RotaryFactors:
    """:func:`svtools.qk.qk_svd` of rotary heads at ``rotary.offsets``, kept in factored form.

    Identity: ``qk_svd_factored(...).qksvd()`` equals ``qk_svd(..., rotary=rotary)`` (same
    singular values and vectors, same sign convention, float rounding aside), but only the
    ``d_head x d_head`` factors ``XA, XB`` are stored per offset: ``d_in / d_head`` times less
    memory, and no ``d_in x d_head x r`` products per offset. Computed by :func:`offset_eigh`:
    ``XB = R_B^-1 V`` and ``XA = M_delta R_B^T V / S`` (for cores past
    :data:`EIGH_MAX_CONDITION`, ``XA = R_A^-1 U`` from the SVD of the core, signs matched).
    Rank-deficient sides take :func:`svtools.qk.qk_svd` (then ``A, B`` are identities and
    ``XA, XB`` the full ``U, V``).
    """
    if not isinstance(rotary, RotarySpec):
        raise SVToolsError("qk_svd_factored needs rotary=RotarySpec(...)")
    W_Q = as_tensor(W_Q, "W_Q")
    W_K = as_tensor(W_K, "W_K")
    requested = as_dtype(dtype)  # the dtype rule of qk_svd: half-precision weights give float32
    dtype = requested or torch.promote_types(W_Q.dtype, W_K.dtype)
    if requested is None and dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    check_last_dims(W_Q, (None, None), "W_Q", "(..., d_model, d_head)")
    d_model, d_head = W_Q.shape[-2:]
    check_last_dims(W_K, (d_model, d_head), "W_K", f"(..., {d_model}, {d_head}) to match W_Q")
    if rotary.rotary_dim > d_head:
        raise SVToolsError(f"rotary_dim {rotary.rotary_dim} exceeds d_head {d_head}")
    bias = b_Q is not None or b_K is not None
    A = homogeneous_weights(W_Q.to(dtype), None if b_Q is None else as_tensor(b_Q, "b_Q").to(dtype), bias)
    B = homogeneous_weights(W_K.to(dtype), None if b_K is None else as_tensor(b_K, "b_K").to(dtype), bias)
    lead = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
    A, B = A.expand(lead + A.shape[-2:]), B.expand(lead + B.shape[-2:])
    d_in = A.shape[-2]
    heads = RotaryHeads.from_sides(A.reshape((-1,) + A.shape[-2:]), B.reshape((-1,) + B.shape[-2:]), rotary, bias)
    if not bool(heads.full_rank.all()):
        qk = qk_svd(W_Q, W_K, b_Q, b_K, rotary=rotary, dtype=dtype)
        eye = torch.eye(d_in, dtype=dtype, device=A.device).expand(lead + (d_in, d_in))
        return RotaryFactors(A=eye, B=eye, XA=qk.U, S=qk.S, XB=qk.V, has_bias=bias, rotary=rotary)
    n_off = len(rotary.offsets)
    head = torch.arange(len(heads.RA)).repeat_interleave(n_off)
    off = rotary.offsets.repeat(len(heads.RA))
    V, S = offset_eigh(heads, head, off)
    RA, RB = heads.RA[head], heads.RB[head]
    c, s = cos_sin(rotary, off)
    XB = torch.linalg.solve_triangular(RB, V, upper=True)  # R_B^-1 V
    XA = rotate_right((RB.mT @ V).mT, c[:, None, :], -s[:, None, :], rotary).mT / S[:, None, :]  # M R_B^T V / S
    bad = ~(S[:, -1] * EIGH_MAX_CONDITION >= S[:, 0])
    if bool(bad.any()):  # ill-conditioned cores: U from the SVD of C, signed as V
        C = rotate_right(RA[bad], c[bad][:, None, :], s[bad][:, None, :], rotary) @ RB[bad].mT
        U, _, Vh = torch.linalg.svd(C)
        sign = torch.sign((Vh.mT * V[bad]).sum(-2, keepdim=True))
        XA[bad] = torch.linalg.solve_triangular(RA[bad], U, upper=True) * torch.where(sign == 0, 1.0, sign)
    shape = lead + (n_off, d_head, XA.shape[-1])
    return RotaryFactors(A=A, B=B, XA=XA.to(dtype).reshape(shape), S=S.to(dtype).reshape(lead + (n_off, -1)),
                         XB=XB.to(dtype).reshape(shape), has_bias=bias, rotary=rotary)
