"""The factor cache: per-(head, offset) rotary bases and control rotations, kept across calls.

:func:`svtools.sad.head_sparsity` on a rotary model needs, for every (head, offset) that a measured
pair uses, that offset's eigenvectors ``V`` and singular values ``S``
(:func:`svtools.rotary.offset_eigh`) and, with the rotated control, its Haar rotation
(:func:`svtools.rotary.offset_rotations`). :data:`FACTOR_CACHE` keeps them across calls in
fixed-size pages, at most :data:`CACHE_BYTES` in all (by default an eighth of the machine's
memory), least recently used out first; a request larger than the limit is served in full and
only what fits is kept.

Keys are safe by construction. A factor entry is keyed by ``(head key, offset)`` where the head
key is a digest of everything the entry is computed from (``R_A``, ``R_B``, the sign vector
``1^T A``, the rotary frequencies and layout, the dtype, :data:`~svtools.rotary.EIGH_MAX_CONDITION`;
:class:`svtools.rotary.RotaryHeads`): a changed model can never hit a stale entry, and identical
heads share entries. A rotation is keyed by its generator seed
(:func:`svtools.rotary.rotation_seed` of ``(seed, layer, head, offset)``) and size, which is all
it depends on. Values are returned as new tensors (:class:`Entries` gathers them), so a later
eviction never changes what a caller holds; an entry is stored only once its values are written.

For other consumers (e.g. a spectrum-preserving null that needs each offset's singular values):
``FACTOR_CACHE.factors(heads, head, offsets)`` returns :class:`Entries` with ``full(0)`` the
``V (n, r, r)`` and ``full(1)`` the ``S (n, r)`` of the items.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Callable, Optional, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from svtools.rotary import RotaryHeads, offset_eigh, offset_rotations, rotation_seed

__all__ = ["FactorCache", "FACTOR_CACHE", "CACHE_BYTES", "Entries", "machine_memory"]


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
            gb = float("nan")
        if gb >= 0.0 and math.isfinite(gb):
            return int(gb * 2**30)
        warnings.warn(f"SVTOOLS_FACTOR_CACHE_GB={env!r} is not a number of GB >= 0; using the default", stacklevel=2)
    return max(2**28, machine_memory() // 8)


#: Bytes the shared :data:`FACTOR_CACHE` may hold: ``SVTOOLS_FACTOR_CACHE_GB`` when set, else an
#: eighth of the machine's memory (at least 256 MB). Read at every request: set it to 0 to keep nothing.
CACHE_BYTES = _default_cache_bytes()


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

    def __init__(self, shapes: tuple[tuple[int, ...], ...], dtype: torch.dtype, device: torch.device,
                 page_bytes: int) -> None:
        self.shapes, self.dtype, self.device = shapes, dtype, device
        self.item_bytes = sum(math.prod(sh) for sh in shapes) * torch.empty((), dtype=dtype).element_size()
        self.page_items = max(1, page_bytes // self.item_bytes)
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
            owned = torch.tensor([k is not None for k in self.owner], dtype=torch.bool)
            old = (owned & (self.stamp < self.tick)).nonzero()[:, 0]
            old = old[torch.argsort(self.stamp[old], stable=True)]
            self.drop([self.owner[s] for s in old[:len(miss) - len(self.free)].tolist()])
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
    of ``page_bytes`` (64 MB); a request larger than that is served in full and only what fits is
    kept.
    ``hits`` and ``misses`` count items served from the cache and computed.
    """

    def __init__(self, max_bytes: Optional[int] = None, page_bytes: int = 2**26) -> None:
        self._max, self.page_bytes = max_bytes, page_bytes
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
        if pk not in self.pools:
            self.pools[pk] = _Pool(shapes, dtype, device, self.page_bytes)
        pool = self.pools[pk]
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
        """Entries ``(V (r, r), S (r,))`` (:func:`~svtools.rotary.offset_eigh`, in ``heads.dtype``, on
        ``heads.A``'s device) of items ``(head[n], offsets[n])``."""
        head, offsets = head.long().cpu(), offsets.long().cpu()
        r = heads.r
        keys = [(heads.keys[h], o) for h, o in zip(head.tolist(), offsets.tolist())]

        def compute(pos: Tensor, sink: Callable) -> None:
            offset_eigh(heads, head[pos], offsets[pos], sink=lambda p, v: sink(pos[p], v))

        return self._request("factors", ((r, r), (r,)), heads.dtype, heads.A.device, keys, compute)

    def rotations(self, seed: int, layer: int, heads: Sequence[int], offsets: Sequence[int], r: int,
                  dtype: torch.dtype, device) -> Entries:
        """Entries ``(Q (r, r),)`` (:func:`~svtools.rotary.offset_rotations`) of items ``(heads[n], offsets[n])``."""
        device = torch.device(device) if device is not None else torch.device("cpu")
        keys = [(rotation_seed(seed, layer, h, o), r) for h, o in zip(heads, offsets)]

        def compute(pos: Tensor, sink: Callable) -> None:
            pl = pos.tolist()
            offset_rotations(seed, layer, [heads[i] for i in pl], [offsets[i] for i in pl], r,
                             sink=lambda p, v: sink(pos[p], v))

        return self._request("rotations", ((r, r),), dtype, device, keys, compute)


#: The cache :func:`svtools.sad.head_sparsity` uses, shared by every call in this process.
FACTOR_CACHE = FactorCache()
