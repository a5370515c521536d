"""Rotary heads offset by offset: fast per-offset decompositions, kept across calls.

With rotary position embeddings a head has one bilinear form per offset ``delta = i - j``,
``Omega~_delta = A M_delta B^T`` (``A = [W_Q; b_Q^T]``, ``B = [W_K; b_K^T]``, ``d_in x d_head``;
``M_delta`` turns each rotary pair of dimensions, :func:`svtools.qk.rotary_matrices`). Write
``B = Q_B R_B`` (``Q_B`` orthonormal columns, ``R_B`` upper triangular: the Cholesky factor of
``B^T B`` when ``B`` has full column rank) and ``A^T A = R_A^T R_A``. Then the right singular
vectors of ``Omega~_delta`` are ``Q_B v_k`` and its singular values ``sigma_k``, where
``v_k, sigma_k^2`` are the eigenvectors and eigenvalues of the ``r x r`` Gram matrix::

    Gamma_delta = C_delta^T C_delta = R_B M_delta^T (A^T A) M_delta R_B^T,   C_delta = R_A M_delta R_B^T,

and the left ones are ``u_k = A M_delta R_B^T v_k / sigma_k``. A score's terms need no ``u_k``::

    t_k = sigma_k (x~ . u_k)(y~ . Q_B v_k) = (a^ . v_k)(b^ . v_k),
    a^ = R_B M_delta^T (A^T x~),   b^ = Q_B^T y~ = R_B^-T (B^T y~),

where ``A^T x~`` and ``B^T y~`` are the model's own pre-rotary query and key and ``b^`` is the same
at every offset. So each (head, offset) needs only ``V`` (``r x r``) and ``S``:
:func:`offset_eigh` computes them for any list of (head, offset) items.

How, and why this way (64 x 64 cores on one CPU thread): the eigendecomposition of ``Gamma`` in
float64 costs about half the SVD of ``C`` (``torch.linalg.eigh`` vs ``svd``), and gives the same
vectors to ~1e-12 when ``C`` is well conditioned; squaring the condition number costs accuracy
only for ill-conditioned cores, which take the SVD of ``C`` instead
(``sigma_max / sigma_min > EIGH_MAX_CONDITION``). Neighbouring offsets do not share work: the
fastest rotary pair turns by about one radian per offset, so the bases of offsets ``delta`` and
``delta + 1`` differ by O(1) (warm starts gain nothing). Items are decomposed in blocks spread over
``torch.get_num_threads()`` Python threads, each running single-threaded LAPACK (threads inside
one small decomposition only contend). Each item's result depends on that item alone (the same
bits whichever items are decomposed with it).

Sign convention (that of :func:`svtools.qk.qk_svd`): each ``u_k`` has a non-negative entry sum,
i.e. ``1^T A M_delta R_B^T v_k >= 0`` (``v_k`` flipped otherwise); ties of singular values are
resolved as LAPACK's ``eigh`` resolves them (deterministic).

The rotated control of :func:`svtools.sad.head_sparsity` rotates the basis by a Haar rotation per
``(seed, layer, head, offset)``: :func:`offset_rotations` draws them (the same numbers as
:func:`svtools.qk.random_rotation` with :func:`rotation_seed`), in blocks over threads.

:class:`FactorCache` keeps ``V, S`` and the rotations across calls, bounded by
:data:`CACHE_BYTES` (by default an eighth of the machine's memory), least recently used first out.
Factor entries are keyed by a digest of everything they are computed from (``R_A, R_B``, the
sign vector, the rotary frequencies, the dtype): a changed model can never hit a stale entry, and
identical heads share entries. Rotations are keyed by ``(seed, layer, head, offset)``.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from svtools._checks import SVToolsError
from svtools.qk import RotarySpec
from svtools.qk import _homogeneous as homogeneous_weights  # renamed by the restructure

__all__ = ["RotaryHeads", "offset_eigh", "offset_rotations", "rotation_seed", "FactorCache", "FACTOR_CACHE",
           "CACHE_BYTES", "EIGH_MAX_CONDITION", "machine_memory", "one_thread", "rotate_right"]

#: Cores with ``sigma_max / sigma_min`` above this are decomposed by the SVD of ``C`` rather than
#: the eigendecomposition of ``C^T C`` (whose error in ``v_k`` grows with the condition number:
#: below it the two agree to ~1e-12, far under float32 rounding).
EIGH_MAX_CONDITION = 1e3
_BLOCK = 32  # items per decomposed block (64 x 64 float64 cores: ~1 MB of work arrays per block)


def machine_memory() -> int:
    """Bytes of memory this process may use: physical memory, or the cgroup limit when lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return int(total)


def _default_cache_bytes() -> int:
    env = os.environ.get("SVTOOLS_FACTOR_CACHE_GB")
    if env:
        try:
            gb = float(env)
        except ValueError:
            raise SVToolsError(f"SVTOOLS_FACTOR_CACHE_GB must be a number of GB, got {env!r}") from None
        if not (gb >= 0.0 and math.isfinite(gb)):
            raise SVToolsError(f"SVTOOLS_FACTOR_CACHE_GB must be >= 0, got {env!r}")
        return int(gb * 2**30)
    return max(2**28, machine_memory() // 8)


#: Bytes the shared :data:`FACTOR_CACHE` may hold: ``SVTOOLS_FACTOR_CACHE_GB`` when set, else an
#: eighth of the machine's memory (at least 256 MB). Read at every request: set it to 0 to keep nothing.
CACHE_BYTES = _default_cache_bytes()


@contextmanager
def one_thread():
    """Run a block with one intra-op thread (restored after).

    Batched decompositions of many small (``d_head x d_head``) matrices gain nothing from
    threads inside each call and lose a lot when the machine is busy: on the project's loaded
    2-core machine a batch of 64x64 SVDs ran 10-25x slower with 2 threads than with 1 (the
    threads spin-wait for each other). Process-wide setting: not for use from several threads.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _in_blocks(fn: Callable[[slice], tuple], n: int, block: int, device: torch.device) -> list[tuple]:
    """``fn`` on consecutive slices of ``range(n)``, over ``torch.get_num_threads()`` threads on CPU."""
    slices = [slice(s, min(n, s + block)) for s in range(0, n, block)]
    if device.type != "cpu":
        return [fn(sl) for sl in slices]
    workers = min(torch.get_num_threads(), len(slices))
    with one_thread():
        if workers <= 1:
            return [fn(sl) for sl in slices]
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(fn, slices))


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
        if spec.rotary_dim > W_Q.shape[-1]:
            raise SVToolsError(f"rotary_dim {spec.rotary_dim} exceeds d_head {W_Q.shape[-1]}")
        bias = b_Q is not None or b_K is not None
        A = homogeneous_weights(W_Q.to(dtype), None if b_Q is None else b_Q.to(dtype), bias)
        B = homogeneous_weights(W_K.to(dtype), None if b_K is None else b_K.to(dtype), bias)
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


def offset_eigh(heads: RotaryHeads, head: Tensor, offsets: Tensor) -> tuple[Float[Tensor, "n r r"], Float[Tensor, "n r"]]:
    """``V, S`` (float64) of items ``(head[n], offsets[n])``: ``Gamma = V diag(S^2) V^T``, S descending.

    ``V``'s columns are the right singular vectors of the core ``C_delta`` (in ``Q_B``
    coordinates), signed by the convention of the module doc. Identity (the engine checks it on
    a random vector): ``R_B M^T A^T A M R_B^T V = V diag(S^2)``.
    """
    head, offsets = torch.as_tensor(head).long().cpu(), torch.as_tensor(offsets).long().cpu()
    r = heads.r
    V = torch.empty(len(head), r, r, dtype=torch.float64)
    S = torch.empty(len(head), r, dtype=torch.float64)

    def block(sl: slice) -> None:
        V[sl], S[sl] = _eigh_block(heads, head[sl], offsets[sl])

    _in_blocks(block, len(head), _BLOCK, torch.device("cpu"))
    return V, S


def rotation_seed(seed: int, layer: int, head: int, offset: Optional[int] = None) -> int:
    """Generator seed of the rotated control's rotation for ``(seed, layer, head[, offset])``."""
    h = (int(seed) * 1_000_003 + int(layer) * 10_007 + int(head)) % 2**63
    return h if offset is None else (h * 1_000_033 + 7 * int(offset) + 1) % 2**63


def _haar_block(seeds: Sequence[int], r: int) -> Tensor:
    """Haar rotations ``(len(seeds), r, r)`` float64 from Householder reflections of fresh normals.

    For each seed: ``r (r + 1) / 2`` float32 standard normals from a generator seeded with it,
    read as the columns ``x_k`` (length ``r - k``) of a lower triangle. ``Q = H_0 ... H_(r-2) D``
    where ``H_k`` is the Householder reflection (LAPACK's ``larfg``) that maps ``x_k`` onto
    ``beta_k e_1`` in coordinates ``k..r-1`` and ``D = diag(sign beta_k)``: exactly the ``Q`` of the
    QR factorisation of a Gaussian matrix with ``R``'s diagonal made positive (after the first
    ``k`` reflections the rest of column ``k`` of a Gaussian matrix is again a fresh Gaussian
    vector), hence Haar-distributed, at the cost of one ``orgqr`` instead of a QR and a ``r x r``
    Gaussian draw.
    """
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
                     dtype: torch.dtype = torch.float32, device=None) -> Float[Tensor, "n r r"]:
    """The control's Haar rotation of each item ``(heads[n], offsets[n])`` of ``(seed, layer)``.

    Item ``n`` depends only on ``rotation_seed(seed, layer, heads[n], offsets[n])`` and ``r``
    (drawn by :func:`_haar_block`: the same numbers on every device and whichever items are drawn
    together), computed in float64, then cast.
    """
    seeds = [rotation_seed(seed, layer, h, o) for h, o in zip(heads, offsets)]
    out = torch.empty(len(seeds), r, r, dtype=torch.float64)

    def block(sl: slice) -> None:
        out[sl] = _haar_block(seeds[sl], r)

    _in_blocks(block, len(seeds), _BLOCK, torch.device("cpu"))
    return out.to(dtype=dtype, device=device)


# ----------------------------------------------------------------------------- the cache

class Entries:
    """Values of a request's items (:meth:`FactorCache.factors`): rows in the cache's pages, or in
    an overflow tensor for items the cache had no room to keep. ``gather(i, idx)`` copies value
    ``i`` of items ``idx``; ``full(i)`` of all items."""

    def __init__(self, pool: "_Pool", slots: Tensor, over: Tensor, overflow: list[Tensor]) -> None:
        self.pool, self.slots, self.over, self.overflow = pool, slots, over, overflow

    def __len__(self) -> int:
        return len(self.slots)

    def gather(self, i: int, idx: Tensor) -> Tensor:
        idx = idx.cpu()
        pool = self.pool
        s = self.slots[idx]
        inside = s >= 0
        pg = torch.where(inside, s // pool.page_items, -1)
        pages = torch.unique(pg).tolist()
        if len(pages) == 1 and pages[0] >= 0:  # all in one page: one copy
            return pool.pages[pages[0]][i].index_select(0, (s % pool.page_items).to(pool.device))
        out = torch.empty((len(idx),) + pool.shapes[i], dtype=pool.dtype, device=pool.device)
        for p in pages:
            m = (pg == p).nonzero()[:, 0]
            src = pool.pages[p][i].index_select(0, (s[m] % pool.page_items).to(pool.device)) if p >= 0 else \
                self.overflow[i].index_select(0, self.over[idx[m]].to(pool.device))
            out.index_copy_(0, m.to(pool.device), src)
        return out

    def full(self, i: int) -> Tensor:
        return self.gather(i, torch.arange(len(self.slots)))


class _Pool:
    """Fixed-shape entries of one kind in pages of ``page_items`` slots; least recently used out."""

    def __init__(self, shapes: tuple[tuple[int, ...], ...], dtype: torch.dtype, device: torch.device) -> None:
        self.shapes, self.dtype, self.device = shapes, dtype, device
        self.item_bytes = sum(math.prod(sh) for sh in shapes) * torch.empty((), dtype=dtype).element_size()
        self.page_items = max(1, 2**26 // self.item_bytes)
        self.pages: list[list[Tensor]] = []
        self.slot: dict = {}  # key -> slot
        self.owner: list = []  # slot -> key (None: free)
        self.free: list[int] = []
        self.stamp = torch.zeros(0, dtype=torch.long)
        self.tick = 0

    @property
    def nbytes(self) -> int:
        return len(self.pages) * self.page_items * self.item_bytes

    def drop(self, keys: list) -> None:
        for k in keys:
            s = self.slot.pop(k, None)
            if s is not None:
                self.owner[s] = None
                self.free.append(s)

    def reserve(self, keys: list, room: int) -> tuple[list[int], list[int]]:
        """Slots of ``keys`` (cached, newly assigned, or -1: no room) and the positions to compute."""
        self.tick += 1
        slots = [self.slot.get(k, -1) for k in keys]
        hit = [s for s in slots if s >= 0]
        if hit:
            self.stamp[torch.tensor(hit)] = self.tick
        miss = [i for i, s in enumerate(slots) if s < 0]
        while len(self.free) < len(miss) and room >= self.page_items * self.item_bytes:
            base = len(self.owner)
            self.pages.append([torch.empty((self.page_items,) + sh, dtype=self.dtype, device=self.device)
                               for sh in self.shapes])
            self.owner += [None] * self.page_items
            self.stamp = torch.cat([self.stamp, torch.zeros(self.page_items, dtype=torch.long)])
            self.free += range(base + self.page_items - 1, base - 1, -1)
            room -= self.page_items * self.item_bytes
        if len(self.free) < len(miss):  # evict the least recently used entries this request does not use
            old = (self.stamp < self.tick).nonzero()[:, 0]
            old = old[torch.argsort(self.stamp[old], stable=True)]
            self.drop([self.owner[s] for s in old[:len(miss) - len(self.free)].tolist() if self.owner[s] is not None])
        for i in miss:
            if not self.free:
                break
            s = self.free.pop()
            slots[i], self.owner[s], self.slot[keys[i]] = s, keys[i], s
            self.stamp[s] = self.tick
        return slots, miss

    def write(self, slots: Tensor, values: Sequence[Tensor]) -> None:
        pg = slots // self.page_items
        for p in torch.unique(pg).tolist():
            m = (pg == p).nonzero()[:, 0]
            dst = (slots[m] % self.page_items).to(self.device)
            for page, v in zip(self.pages[p], values):
                page[dst] = v[m.to(v.device)].to(device=self.device, dtype=self.dtype)


class FactorCache:
    """Per-(head, offset) factors ``V, S`` and control rotations, kept across calls (LRU, bounded).

    At most ``max_bytes`` (default: :data:`CACHE_BYTES`, read at each request) in all, in pages
    of 64 MB; a request larger than that is served in full and only what fits is kept.
    ``hits`` and ``misses`` count items served from the cache and computed.
    """

    def __init__(self, max_bytes: Optional[int] = None) -> None:
        self._max = max_bytes
        self.pools: dict = {}
        self.hits = self.misses = 0

    @property
    def max_bytes(self) -> int:
        return CACHE_BYTES if self._max is None else self._max

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.pools.values())

    def clear(self) -> None:
        self.pools.clear()
        self.hits = self.misses = 0

    def _request(self, kind: str, shapes: tuple, dtype: torch.dtype, device: torch.device, keys: list,
                 compute: Callable[[Tensor, Callable[[Tensor, Sequence[Tensor]], None]], None]) -> Entries:
        """Entries of ``keys``; ``compute(positions, sink)`` computes the missing ones and hands
        each block to ``sink(block_positions, values)`` (thread-safe: blocks write disjoint rows)."""
        if self.nbytes > self.max_bytes:  # the limit was lowered: start afresh
            self.pools.clear()
        pk = (kind, shapes, dtype, str(device))
        pool = self.pools.setdefault(pk, _Pool(shapes, dtype, device))
        slots, miss = pool.reserve(keys, max(0, self.max_bytes - self.nbytes))
        self.hits += len(keys) - len(miss)
        self.misses += len(miss)
        slots_t = torch.tensor(slots, dtype=torch.long)
        miss_t = torch.tensor(miss, dtype=torch.long)
        n_over = sum(1 for i in miss if slots[i] < 0)
        over = torch.full((len(keys),), -1, dtype=torch.long)
        over[[i for i in miss if slots[i] < 0]] = torch.arange(n_over)
        overflow = [torch.empty((n_over,) + sh, dtype=dtype, device=device) for sh in shapes]

        def sink(pos: Tensor, values: Sequence[Tensor]) -> None:
            s = slots_t[pos]
            inside = s >= 0
            if bool(inside.all()):
                pool.write(s, values)
                return
            m = inside.nonzero()[:, 0]
            pool.write(s[m], [v[m.to(v.device)] for v in values])
            m = (~inside).nonzero()[:, 0]
            for o, v in zip(overflow, values):
                o[over[pos[m]].to(o.device)] = v[m.to(v.device)].to(device=o.device, dtype=o.dtype)

        if miss:
            try:
                compute(miss_t, sink)
            except BaseException:
                pool.drop([keys[i] for i in miss])  # never keep slots whose values were not written
                raise
        return Entries(pool, slots_t, over, overflow)

    def factors(self, heads: RotaryHeads, head: Tensor, offsets: Tensor) -> Entries:
        """Entries ``(V (r, r), S (r,))`` (:func:`offset_eigh`, in ``heads.dtype``) of items
        ``(head[n], offsets[n])``."""
        head, offsets = head.long().cpu(), offsets.long().cpu()
        r = heads.r
        keys = [(heads.keys[h], o) for h, o in zip(head.tolist(), offsets.tolist())]

        def compute(pos: Tensor, sink: Callable) -> None:
            _in_blocks(lambda sl: sink(pos[sl], _eigh_block(heads, head[pos[sl]], offsets[pos[sl]])),
                       len(pos), _BLOCK, torch.device("cpu"))

        return self._request("factors", ((r, r), (r,)), heads.dtype, heads.A.device, keys, compute)

    def rotations(self, seed: int, layer: int, heads: Sequence[int], offsets: Sequence[int], r: int,
                  dtype: torch.dtype, device) -> Entries:
        """Entries ``(Q (r, r),)`` (:func:`offset_rotations`) of items ``(heads[n], offsets[n])``."""
        device = torch.device(device) if device is not None else torch.device("cpu")
        seeds = [rotation_seed(seed, layer, h, o) for h, o in zip(heads, offsets)]
        keys = [(s, r) for s in seeds]

        def compute(pos: Tensor, sink: Callable) -> None:
            pl = pos.tolist()
            _in_blocks(lambda sl: sink(pos[sl], (_haar_block([seeds[i] for i in pl[sl]], r),)),
                       len(pl), _BLOCK, torch.device("cpu"))

        return self._request("rotations", ((r, r),), dtype, device, keys, compute)


#: The cache :func:`svtools.sad.head_sparsity` uses, shared by every call in this process.
FACTOR_CACHE = FactorCache()
