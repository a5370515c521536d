r"""Singular value decomposition of an attention head's bilinear form, without forming it.

For a head with query and key weights :math:`W_Q, W_K \in \mathbb{R}^{d_\text{model}\times
d_\text{head}}` (TransformerLens' convention :math:`q = x W_Q + b_Q`) the unscaled score between a
query input :math:`x` and a key input :math:`y` is :math:`q \cdot k = x^\top \Omega y` with
:math:`\Omega = W_Q W_K^\top`. With biases the exact form lives in homogeneous coordinates
:math:`\tilde x = [x; 1]`:

.. math::

    \tilde\Omega = [W_Q; b_Q^\top]\,[W_K; b_K^\top]^\top,

a :math:`(d_\text{model}+1)\times(d_\text{model}+1)` matrix of rank at most :math:`d_\text{head}`.
:func:`qk_svd` returns :math:`\tilde\Omega = U \operatorname{diag}(S) V^\top` for every head at
once. It never builds the :math:`d_\text{in}\times d_\text{in}` matrix: with reduced QR
factorisations :math:`A = Q_A R_A` and :math:`B = Q_B R_B` of the two
:math:`d_\text{in}\times d_\text{head}` sides, :math:`\tilde\Omega = Q_A (R_A R_B^\top) Q_B^\top`
and only the :math:`d_\text{head}\times d_\text{head}` core is decomposed.

Rotary heads. With rotary position embeddings the score between query position :math:`i` and
key position :math:`j` is :math:`(x_i W_Q + b_Q)\, M_{i-j}\, (x_j W_K + b_K)^\top`, where
:math:`M_\delta` rotates the rotary dimensions by :math:`-\delta\theta` (and leaves the others
alone), so there is one bilinear form per offset :math:`\delta = i - j`. Pass
``rotary=RotarySpec(...)`` and the result carries an extra ``offset`` dimension, one
decomposition per offset, sharing the QR factorisation.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable, Literal, Optional

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from svtools._checks import (SVToolsError, as_dtype, as_float, as_int, as_tensor, broadcast_leading, check_finite,
                             check_last_dims)

__all__ = ["QKSVD", "RotarySpec", "qk_svd", "rotary_matrices", "random_rotation", "DEGENERATE_TOL",
           "degenerate_groups"]


@dataclass(frozen=True)
class RotarySpec:
    """Which dimensions of each head rotate, how fast, and at which offsets to decompose.

    Attributes:
        rotary_dim: number of rotating dimensions per head (even; GPT-NeoX/Pythia rotate the
            first ``rotary_pct * d_head``, Llama all ``d_head``).
        inv_freq: ``(rotary_dim // 2,)`` angular frequencies: pair ``p`` turns by
            ``position * inv_freq[p]`` radians.
        layout: ``"neox"`` pairs dimension ``p`` with ``p + rotary_dim/2`` (rotate-half, GPT-NeoX,
            Llama); ``"gptj"`` pairs ``2p`` with ``2p + 1`` (interleaved, GPT-J).
        offsets: ``(n_offsets,)`` integer offsets ``delta = query position - key position``.
        attention_scaling: factor multiplying cos and sin (1 for plain RoPE); the rotary part of
            the score is multiplied by its square.
    """

    rotary_dim: int
    inv_freq: Tensor
    offsets: Tensor
    layout: Literal["neox", "gptj"] = "neox"
    attention_scaling: float = 1.0

    @classmethod
    def from_base(
        cls,
        rotary_dim: int,
        offsets: Iterable[int] | Tensor,
        *,
        base: float = 10000.0,
        layout: Literal["neox", "gptj"] = "neox",
        attention_scaling: float = 1.0,
    ) -> "RotarySpec":
        """Standard RoPE frequencies ``base ** (-2p / rotary_dim)`` (``base`` finite and > 0)."""
        rotary_dim = as_int(rotary_dim, "rotary_dim")
        if rotary_dim <= 0 or rotary_dim % 2:
            raise SVToolsError(f"rotary_dim must be a positive even number, got {rotary_dim}")
        base = as_float(base, "base", lo=0.0, lo_open=True)
        p = torch.arange(0, rotary_dim, 2, dtype=torch.float64)
        inv_freq = 1.0 / (base ** (p / rotary_dim))
        if not isinstance(offsets, Tensor):
            offsets = torch.as_tensor(list(offsets)) if not isinstance(offsets, np.ndarray) else torch.from_numpy(offsets)
        return cls(rotary_dim, inv_freq, offsets, layout, attention_scaling)

    def __post_init__(self) -> None:
        if self.layout not in ("neox", "gptj"):
            raise SVToolsError(f"rotary layout must be 'neox' or 'gptj', got {self.layout!r}")
        rotary_dim = as_int(self.rotary_dim, "rotary_dim")
        if rotary_dim <= 0 or rotary_dim % 2:
            raise SVToolsError(f"rotary_dim must be a positive even number, got {rotary_dim}")
        object.__setattr__(self, "rotary_dim", rotary_dim)
        inv_freq = as_tensor(self.inv_freq, "inv_freq")
        if tuple(inv_freq.shape) != (rotary_dim // 2,):
            raise SVToolsError(
                f"inv_freq must have shape ({rotary_dim // 2},) for rotary_dim={rotary_dim}, "
                f"got {tuple(inv_freq.shape)}")
        check_finite(inv_freq, "inv_freq")
        object.__setattr__(self, "inv_freq", inv_freq)
        object.__setattr__(self, "attention_scaling", as_float(self.attention_scaling, "attention_scaling"))
        offsets = self.offsets
        if isinstance(offsets, np.ndarray):
            offsets = torch.from_numpy(offsets)
        try:
            offsets = torch.as_tensor(offsets)
        except Exception as exc:
            raise SVToolsError(f"offsets must be a non-empty 1-D integer tensor, got {type(self.offsets).__name__}") from exc
        if offsets.ndim != 1 or offsets.numel() == 0 or offsets.is_floating_point() or offsets.is_complex() \
                or offsets.dtype == torch.bool:
            raise SVToolsError(f"offsets must be a non-empty 1-D integer tensor, got {offsets!r}")
        object.__setattr__(self, "offsets", offsets.long().cpu())

    def offset_index(self, delta: Tensor | int) -> Tensor:
        """Position of each ``delta`` in :attr:`offsets` (same shape as ``delta``); raises if one is missing.

        Binary search over the sorted offsets: memory ``O(len(offsets) + delta.numel())``, whatever
        the span of the offsets.
        """
        delta = torch.as_tensor(delta)
        if delta.is_floating_point() or delta.is_complex() or delta.dtype == torch.bool:
            raise SVToolsError(f"offsets to look up must be integers, got dtype {delta.dtype}")
        delta = delta.long().cpu()
        sorted_offs, perm = torch.sort(self.offsets)
        pos = torch.searchsorted(sorted_offs, delta).clamp_max(len(sorted_offs) - 1)
        found = sorted_offs[pos] == delta
        if not bool(found.all()):
            missing = sorted({int(d) for d in delta[~found].flatten()[:1000].tolist()})
            raise SVToolsError(f"offset(s) {missing[:5]} not decomposed; this RotarySpec has "
                               f"offsets {self.offsets.min().item()}..{self.offsets.max().item()}")
        return perm[pos]


def rotary_matrices(spec: RotarySpec, d_head: int, *, dtype=torch.float32,
                    device=None) -> Float[Tensor, "offset d_head d_head"]:
    r""":math:`M_\delta` for every offset: :math:`q_i \cdot k_j = q^\top M_{i-j}\, k` for
    pre-rotary :math:`q, k`.

    With :math:`q_i = R(i\theta)\, q` and :math:`k_j = R(j\theta)\, k` (each rotating pair turned
    by its angle), :math:`R(i\theta)^\top R(j\theta) = R(-(i-j)\theta)`; non-rotary dimensions pass
    unchanged.
    """
    if spec.rotary_dim > d_head:
        raise SVToolsError(f"rotary_dim {spec.rotary_dim} exceeds d_head {d_head}")
    half = spec.rotary_dim // 2
    ang = spec.offsets.to(torch.float64)[:, None] * spec.inv_freq.to(torch.float64).cpu()[None, :]
    c, s = torch.cos(ang), torch.sin(ang)  # (offset, half)
    a2 = float(spec.attention_scaling) ** 2
    M = torch.eye(d_head, dtype=torch.float64).repeat(len(spec.offsets), 1, 1)
    p = torch.arange(half)
    if spec.layout == "neox":
        ia, ib = p, p + half
    else:
        ia, ib = 2 * p, 2 * p + 1
    # R(phi) = [[cos, -sin], [sin, cos]] with phi = -delta*theta  ->  [[c, s], [-s, c]]
    M[:, ia, ia] = a2 * c
    M[:, ib, ib] = a2 * c
    M[:, ia, ib] = a2 * s
    M[:, ib, ia] = -a2 * s
    return M.to(dtype=dtype, device=device)


@dataclass(frozen=True)
class QKSVD:
    r""":math:`\tilde\Omega = U \operatorname{diag}(S) V^\top` for a batch of heads (and, for
    rotary heads, offsets).

    Shapes (``...`` = leading batch dims such as ``layer head``; rotary adds ``offset`` last
    among them):

    - U: ``(..., d_in, r)`` orthonormal columns (left singular vectors, query side)
    - S: ``(..., r)`` singular values, descending, non-negative
    - V: ``(..., d_in, r)`` orthonormal columns (right singular vectors, key side)

    ``d_in = d_model + 1`` when ``has_bias`` (the constant coordinate last), else ``d_model``.
    """

    U: Float[Tensor, "... d_in r"]
    S: Float[Tensor, "... r"]
    V: Float[Tensor, "... d_in r"]
    has_bias: bool = False
    rotary: Optional[RotarySpec] = field(default=None)

    @property
    def d_in(self) -> int:
        return self.U.shape[-2]

    @property
    def d_model(self) -> int:
        return self.d_in - int(self.has_bias)

    @property
    def r(self) -> int:
        return self.S.shape[-1]

    @property
    def batch_shape(self) -> torch.Size:
        return self.S.shape[:-1]

    def omega(self) -> Float[Tensor, "... d_in d_in"]:
        r"""The dense :math:`U \operatorname{diag}(S) V^\top` (for checks on small cases; memory
        :math:`d_\text{in}^2` per head)."""
        return (self.U * self.S[..., None, :]) @ self.V.transpose(-1, -2)

    def factors(self) -> tuple[Float[Tensor, "... d_in r"], Float[Tensor, "... d_in r"]]:
        r"""``(U diag(S), V)``: the score is :math:`\sum_k (\tilde x^\top U S)_k\, (\tilde y^\top V)_k`."""
        return self.U * self.S[..., None, :], self.V

    def to(self, *args, **kwargs) -> "QKSVD":
        """Move/cast like :meth:`torch.Tensor.to`."""
        return replace(self, U=self.U.to(*args, **kwargs), S=self.S.to(*args, **kwargs),
                       V=self.V.to(*args, **kwargs))

    def __getitem__(self, idx) -> "QKSVD":
        """Index the leading batch dims, e.g. ``qk[layer, head]``."""
        idx = idx if isinstance(idx, tuple) else (idx,)
        if len(idx) > len(self.batch_shape):
            raise SVToolsError(f"too many indices ({len(idx)}) for batch shape {tuple(self.batch_shape)}")
        try:
            return replace(self, U=self.U[idx], S=self.S[idx], V=self.V[idx])
        except IndexError as exc:
            raise SVToolsError(f"index {idx if len(idx) > 1 else idx[0]!r} is out of range for this "
                               f"decomposition's batch shape {tuple(self.batch_shape)}") from exc

    def at_offset(self, delta: int) -> "QKSVD":
        """The decomposition for one rotary offset ``delta = i - j`` (drops the offset dim)."""
        if self.rotary is None:
            raise SVToolsError("at_offset() needs a rotary decomposition (qk_svd(..., rotary=...))")
        k = int(self.rotary.offset_index(delta))
        return replace(self, U=self.U[..., k, :, :], S=self.S[..., k, :], V=self.V[..., k, :, :],
                       rotary=None)


def homogeneous_weights(W: Tensor, b: Optional[Tensor], bias: bool) -> Tensor:
    """``W (..., d_model, d_head)`` with the bias ``b (..., d_head)`` appended as a last input row
    when ``bias`` (a zero row when ``b`` is None): ``[x, 1] @ homogeneous_weights(W, b) = x W + b``."""
    if not bias:
        return W
    if b is None:
        b = torch.zeros(W.shape[:-2] + W.shape[-1:], dtype=W.dtype, device=W.device)
    b = b.to(W.dtype).expand(W.shape[:-2] + W.shape[-1:])
    return torch.cat([W, b[..., None, :]], dim=-2)


def _core(RA: Tensor, RB: Tensor, M: Optional[Tensor]) -> Tensor:
    """``R_A R_B^T``, or ``R_A M_delta R_B^T`` for every offset (offset dim before the matrix)."""
    if M is None:
        return RA @ RB.transpose(-1, -2)
    return RA[..., None, :, :] @ M @ RB.transpose(-1, -2)[..., None, :, :]


def qk_svd(
    W_Q: Float[Tensor, "... d_model d_head"],
    W_K: Float[Tensor, "... d_model d_head"],
    b_Q: Optional[Float[Tensor, "... d_head"]] = None,
    b_K: Optional[Float[Tensor, "... d_head"]] = None,
    *,
    rotary: Optional[RotarySpec] = None,
    dtype: Optional[torch.dtype] = None,
) -> QKSVD:
    r"""SVD of every head's (homogeneous) bilinear form, through a :math:`d_\text{head}\times
    d_\text{head}` core.

    Identity: :math:`U \operatorname{diag}(S) V^\top = [W_Q; b_Q^\top]\,[W_K; b_K^\top]^\top`
    (without biases :math:`W_Q W_K^\top`); with ``rotary``, for each offset :math:`\delta` (index
    ``U[..., delta, :, :]``): :math:`U \operatorname{diag}(S) V^\top = [W_Q; b_Q^\top]\, M_\delta\,
    [W_K; b_K^\top]^\top`.

    Args:
        W_Q, W_K: ``(..., d_model, d_head)``; leading dims (e.g. ``layer head``) broadcast, so
            grouped-query attention can pass its shared key weights expanded.
        b_Q, b_K: optional ``(..., d_head)`` biases. If either is given the result is in
            homogeneous coordinates (``d_in = d_model + 1``, constant last; a missing bias is 0).
        rotary: a :class:`RotarySpec`; adds an ``offset`` dim just before ``d_in``/``r``.
        dtype: dtype of the result (a floating ``torch.dtype`` or its name, e.g. ``"float64"``;
            default: the inputs' dtype, except that float16/bfloat16 inputs give float32). The
            work is done in float64 (Gram matrices, core SVD) and at least float32 (the
            projections), so half-precision weights whose singular values exceed the half range
            still decompose; an explicit half ``dtype`` whose values do not fit raises
            :class:`SVToolsError`.

    Returns:
        :class:`QKSVD` with ``U, V: (..., [offset,] d_in, r)``, ``S: (..., [offset,] r)``,
        ``r = min(d_head, d_in)``, on the inputs' device.
    """
    W_Q = as_tensor(W_Q, "W_Q")
    W_K = as_tensor(W_K, "W_K")
    requested = as_dtype(dtype)
    out_dtype = requested or torch.promote_types(W_Q.dtype, W_K.dtype)
    if requested is None and out_dtype in (torch.float16, torch.bfloat16):
        out_dtype = torch.float32
    if rotary is not None and not isinstance(rotary, RotarySpec):
        raise SVToolsError(f"rotary must be a RotarySpec, got {type(rotary).__name__}")
    # projections in at least float32: half-precision products overflow past 65504
    dtype = torch.promote_types(out_dtype, torch.float32)
    check_last_dims(W_Q, (None, None), "W_Q", "(..., d_model, d_head)")
    d_model, d_head = W_Q.shape[-2:]
    check_last_dims(W_K, (d_model, d_head), "W_K", f"(..., {d_model}, {d_head}) to match W_Q")
    shapes, names = [W_Q.shape[:-2], W_K.shape[:-2]], ["W_Q", "W_K"]
    for b, n in ((b_Q, "b_Q"), (b_K, "b_K")):
        if b is not None:
            b = as_tensor(b, n)
            check_last_dims(b, (d_head,), n, f"(..., {d_head})")
            check_finite(b, n)
            shapes.append(b.shape[:-1])
            names.append(n)
    lead = broadcast_leading(shapes, names)
    bias = b_Q is not None or b_K is not None
    # every operand expanded to the common leading shape first, so a bias may carry batch dims
    # that the weights lack (and vice versa)
    A = homogeneous_weights(W_Q.to(dtype).expand(lead + W_Q.shape[-2:]),
                     None if b_Q is None else as_tensor(b_Q, "b_Q").to(dtype).expand(lead + (d_head,)), bias)
    B = homogeneous_weights(W_K.to(dtype).expand(lead + W_K.shape[-2:]),
                     None if b_K is None else as_tensor(b_K, "b_K").to(dtype).expand(lead + (d_head,)), bias)
    d_in = A.shape[-2]

    # Omega~ = A M B^T with A, B (..., d_in, d_head) and M = I (or the rotary M_delta).
    # With the Gram matrix A^T A = R_A^T R_A (Cholesky, in float64), Q_A = A R_A^-1 has
    # orthonormal columns, so Omega~ = Q_A (R_A M R_B^T) Q_B^T and only the d_head x d_head core
    # needs an SVD, U_c S V_c^T; then U = A (R_A^-1 U_c) and V = B (R_B^-1 V_c).
    # Sides that are rank-deficient (Cholesky fails) take the Householder-QR route instead.
    M = None if rotary is None else rotary_matrices(rotary, d_head, dtype=torch.float64, device=A.device)
    A64, B64 = A.to(torch.float64), B.to(torch.float64)
    GA, GB = A64.transpose(-1, -2) @ A64, B64.transpose(-1, -2) @ B64
    # a NaN or inf anywhere in a side shows up in its Gram matrix (biases were checked above)
    for G, name in ((GA, "W_Q"), (GB, "W_K")):
        if not bool(torch.isfinite(G).all()):
            check_finite(W_Q if name == "W_Q" else W_K, name)
            raise SVToolsError(f"{name} is too large: its Gram matrix overflows")
    LA, infoA = torch.linalg.cholesky_ex(GA)
    LB, infoB = torch.linalg.cholesky_ex(GB)
    expand = (lambda t: t) if M is None else (lambda t: t[..., None, :, :])
    if d_in >= d_head and not bool(infoA.any()) and not bool(infoB.any()):
        RA, RB = LA.transpose(-1, -2), LB.transpose(-1, -2)
        Uc, S, Vch = torch.linalg.svd(_core(RA, RB, M), full_matrices=False)
        XA = torch.linalg.solve_triangular(expand(RA), Uc, upper=True)  # R_A^-1 U_c
        XB = torch.linalg.solve_triangular(expand(RB), Vch.transpose(-1, -2), upper=True)
        U, V = expand(A) @ XA.to(dtype), expand(B) @ XB.to(dtype)
    else:
        QA, RA = torch.linalg.qr(A64)
        QB, RB = torch.linalg.qr(B64)
        Uc, S, Vch = torch.linalg.svd(_core(RA, RB, M), full_matrices=False)
        U, V = (expand(QA) @ Uc).to(dtype), (expand(QB) @ Vch.transpose(-1, -2)).to(dtype)
    # sign convention (SVD leaves each pair's sign free): every u_k has a non-negative entry sum
    sign = torch.sign(U.sum(-2, keepdim=True))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    U, V = U * sign, V * sign
    r = min(d_head, d_in)
    s_max = float(S.max()) if S.numel() else 0.0
    U, S, V = U[..., :r].to(out_dtype), S[..., :r].to(out_dtype), V[..., :r].to(out_dtype)
    if out_dtype != dtype and not bool(torch.isfinite(S).all() & torch.isfinite(U).all() & torch.isfinite(V).all()):
        raise SVToolsError(f"the decomposition does not fit in dtype={out_dtype} (singular values up to "
                           f"{s_max:.3g} overflow it); use dtype=torch.float32")
    return QKSVD(U=U, S=S, V=V, has_bias=bias, rotary=rotary)


#: Singular values closer than this fraction of the largest one are treated as one (degenerate) value.
DEGENERATE_TOL = 1e-5


def degenerate_groups(S: Float[Tensor, "... r"], tol: float = DEGENERATE_TOL) -> Int[Tensor, "... r"]:
    """For each singular index ``k``, the first index of its (near-)degenerate group.

    Where singular values are equal, their singular vectors are fixed only up to a rotation inside
    the group (``U_G R``, ``V_G R`` with the same orthogonal ``R`` give the same ``Omega``), so the
    individual terms of those ``k`` are not functions of ``Omega``: another SVD routine, dtype or
    machine may return another basis of the subspace. Only their sum,
    ``sigma (x~^T U_G)(V_G^T y~)``, is. Consecutive values (``S`` descending) join one group when
    ``S[k-1] - S[k] <= tol * S[0]``. Why relative to the largest value: a perturbation ``E`` of
    ``Omega`` turns singular vectors by about ``|E| / gap``, and rounding perturbs ``Omega`` by a
    fraction of ``|Omega| = S[0]`` (float32: about 1e-7); below ``1e-5 * S[0]`` a gap is no longer
    a property of the weights.

    Returns an int64 tensor shaped like ``S``: ``first[..., k]`` is the smallest index of ``k``'s
    group (``first[..., k] == k`` for a value that is not degenerate). Identity:
    ``first[..., 0] == 0`` and ``first`` is non-decreasing.
    """
    S = as_tensor(S, "S")
    if S.ndim == 0 or S.shape[-1] == 0:
        raise SVToolsError(f"S must have shape (..., r) with r >= 1, got {tuple(S.shape)}")
    tol = as_float(tol, "tol", lo=0.0)
    r = S.shape[-1]
    idx = torch.arange(r, device=S.device).expand(S.shape)
    if r == 1:
        return idx.clone()
    joins = (S[..., :-1] - S[..., 1:]) <= tol * S[..., :1]  # k + 1 joins k's group
    starts = torch.where(joins, torch.zeros_like(idx[..., 1:]), idx[..., 1:])
    return torch.cummax(torch.cat([torch.zeros_like(idx[..., :1]), starts], -1), dim=-1).values


def random_rotation(batch_shape: torch.Size | tuple[int, ...], r: int, *, seed: int = 0,
                    dtype=torch.float32, device=None) -> Float[Tensor, "... r r"]:
    r"""Haar-random orthogonal :math:`r\times r` matrices, one per batch element, from ``seed``.

    Drawn in float64 on the CPU (the same numbers on every device), then cast and moved.
    Identity: :math:`Q^\top Q = I`.
    """
    g = torch.Generator().manual_seed(int(seed))
    G = torch.randn(tuple(batch_shape) + (r, r), generator=g, dtype=torch.float64)
    Q, R = torch.linalg.qr(G)
    Q = Q * torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))[..., None, :]
    return Q.to(dtype=dtype, device=device)


def rotated_factors(qk: QKSVD, *, seed: int = 0, rotation: Optional[Tensor] = None
                    ) -> tuple[Float[Tensor, "... d_in r"], Float[Tensor, "... d_in r"]]:
    r"""The rotated-basis control: :math:`(U S^{1/2} Q,\ V S^{1/2} Q)` with :math:`Q` Haar-random
    per head.

    ``Q`` is ``rotation`` (``(..., r, r)`` orthogonal, matching ``qk``'s batch shape) if given,
    else drawn by :func:`random_rotation` from ``seed`` for the whole batch at once.

    :math:`(U S^{1/2} Q)(V S^{1/2} Q)^\top = U S V^\top = \tilde\Omega`, so per-direction terms
    :math:`(\tilde x^\top U S^{1/2} Q)_k\, (\tilde y^\top V S^{1/2} Q)_k` still sum to the same
    score, but the directions are random mixtures of the singular vectors, with the spectrum flattened: not a calibrated null
    (:func:`svtools.terms.rotated_terms`).
    """
    if rotation is None:
        Q = random_rotation(qk.batch_shape, qk.r, seed=seed, dtype=qk.U.dtype, device=qk.U.device)
    else:
        Q = rotation.to(dtype=qk.U.dtype, device=qk.U.device)
        if Q.shape != qk.batch_shape + (qk.r, qk.r):
            raise SVToolsError(f"rotation must have shape {tuple(qk.batch_shape + (qk.r, qk.r))}, got {tuple(Q.shape)}")
    root = qk.S.clamp_min(0).sqrt()[..., None, :]
    return (qk.U * root) @ Q, (qk.V * root) @ Q
