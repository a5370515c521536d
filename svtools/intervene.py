"""Causal interventions on attention heads: remove (or keep only) singular directions, zero a head.

What a head *reads* shows in its attention; what it *does* shows when it is changed and the
model's behaviour is measured. :func:`intervene` returns a copy of a model in which chosen
heads are changed exactly, and :func:`sigma_matched_sets` draws the random interventions of the
same size that any effect must be compared with.

**Removing singular directions.** A head's score between query input ``x`` and key input ``y``
is ``x~^T Omega~ y~ = sum_k sigma_k (u_k^T x~)(v_k^T y~)`` in homogeneous coordinates
``x~ = [x; 1]`` (``Omega~ = [W_Q; b_Q^T][W_K; b_K^T]^T``, :func:`svtools.qk_svd`), the same
split :func:`svtools.sad_terms` and :func:`svtools.decompose` compute. Removing the set ``K``
of directions gives the head the scores ``score - sum_{k in K} term_k`` for every pair;
keeping only ``K`` gives ``sum_{k in K} term_k``. The bias coordinate is part of every
``u_k, v_k``, so the bias contributions are removed with the directions that carry them.
Everything else of the model (other heads, the head's values and output, every other layer's
weights) is unchanged; the softmax, the mask and the scale are the model's own.

*Heads with absolute positions* (GPT-2, BERT): ``Omega~`` is one matrix, and the edit is one
as well: with ``u_k = A a_k``, ``v_k = B b_k`` (``A = [W_Q; b_Q^T]``, ``B = [W_K; b_K^T]``),
the head's query ``q = x~ A`` is replaced by ``q N`` with ``N = I - sum_{k in K} sigma_k a_k b_k^T``
(keep: ``N = sum_{k in K} sigma_k a_k b_k^T``), so that ``q N k^T = x~^T (Omega~ - sum_K
sigma_k u_k v_k^T) y~``. It is applied at the head's ``hook_q`` (the same as editing its
``W_Q`` and ``b_Q``).

*Rotary heads* (GPT-NeoX/Pythia, Llama): the score of query position ``i`` and key position
``j`` is ``x~_i^T Omega~_delta y~_j`` with one matrix per offset ``delta = i - j``
(:class:`svtools.RotarySpec`), each with its own SVD. "Remove direction ``k``" then means:
at every pair, remove the ``k``-th term of *that pair's offset's* decomposition (the ``k``-th
largest singular value of ``Omega~_delta``), exactly the term :func:`svtools.decompose` and
``sad_terms(..., offset=delta)`` report for the pair. No fixed weight edit does this (the
directions turn with the offset), so the correction is subtracted from the head's scores at its
``hook_attn_scores``, computed from the layer's own query and key inputs in the same forward
pass. Direction ``k`` at two offsets is in general not the same vector: nearby offsets have
similar decompositions, far ones need not, and where singular values cross the index ``k``
follows the ordering, not a feature.

**Zeroing a head.** ``zero_omega``: the head's whole bilinear form is removed
(``Omega~ = 0``, every direction at every offset): its scores are 0, so it attends uniformly
over the keys it may see, and still writes its values. Implemented as ``q = 0`` (exact zeros,
all families). ``zero_pattern``: the head's attention weights are 0, so it writes nothing
(``z = pattern @ v = 0``; implemented at ``hook_z``; the pattern the model reports at
``hook_pattern`` is left as computed).

The caller's model is never changed: :func:`intervene` deep-copies the bridge (cost: one more
copy of the weights) and attaches permanent hooks to the copy. :func:`intervention_hooks`
gives the same hooks for ``model.hooks(fwd_hooks=...)`` on a large model where a copy is too
costly. :func:`svtools.decompose` reads a head's weights, so on an intervened model it still
describes the original head and its exactness check fails for the changed heads (by design:
it does not silently describe a head that is not the one running).
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from svtools._checks import SVToolsError, as_indices, as_int
from svtools.bridge import check_bridge, is_causal
from svtools.decomposition import attention_scale, head_weights, layer_qk, rotary_spec
from svtools.terms import sad_terms

__all__ = ["HeadEdit", "intervene", "intervention_hooks", "edit_plan", "detached_copy", "sigma_matched_sets",
           "rank_bands"]

@dataclass(frozen=True)
class HeadEdit:
    """One head's intervention: ``kind`` is ``"remove"``, ``"keep"``, ``"zero_omega"`` or
    ``"zero_pattern"``; ``directions`` the singular indices (``remove``/``keep`` only, sorted)."""

    layer: int
    head: int
    kind: str
    directions: tuple[int, ...] = ()


def _head_key(key: Any, model: Any) -> tuple[int, int]:
    if not (isinstance(key, (tuple, list)) and len(key) == 2):
        raise SVToolsError(f"heads are named by (layer, head) pairs, got {key!r}")
    n_l, n_h = int(model.cfg.n_layers), int(model.cfg.n_heads)
    layer = as_int(key[0], "layer", min_value=-n_l, max_value=n_l - 1) % n_l
    head = as_int(key[1], "head", min_value=0, max_value=n_h - 1)
    return layer, head


def _rank(model: Any) -> int:
    """``r = min(d_head, d_in)``: the number of singular directions of every head."""
    _, _, b_Q, b_K = head_weights(model, 0)
    return min(int(model.cfg.d_head), int(model.cfg.d_model) + int(b_Q is not None or b_K is not None))


def edit_plan(model: Any, *, remove: Optional[Mapping[Any, Iterable[int]]] = None,
              keep: Optional[Mapping[Any, Iterable[int]]] = None, zero_omega: Optional[Iterable[Any]] = None,
              zero_pattern: Optional[Iterable[Any]] = None) -> list[HeadEdit]:
    """The arguments of :func:`intervene`, checked, as one :class:`HeadEdit` per head.

    Raises :class:`SVToolsError` for an unknown layer or head, a direction outside ``0..r-1``
    (``r = min(d_head, d_in)``), a direction named twice, or a head named in more than one
    argument (the result would depend on the order of the edits).
    """
    check_bridge(model)
    r = _rank(model)
    edits: dict[tuple[int, int], HeadEdit] = {}

    def add(key: Any, kind: str, dirs: tuple[int, ...] = ()) -> None:
        lh = _head_key(key, model)
        if lh in edits:
            raise SVToolsError(f"head {lh[0]}.{lh[1]} is named twice ({edits[lh].kind} and {kind}); "
                               "give each head one intervention")
        edits[lh] = HeadEdit(lh[0], lh[1], kind, dirs)

    for kind, arg in (("remove", remove), ("keep", keep)):
        if arg is None:
            continue
        if not isinstance(arg, Mapping):
            raise SVToolsError(f"{kind}= maps (layer, head) to singular indices, e.g. {{(1, 2): [0, 3]}}; "
                               f"got {type(arg).__name__}")
        for key, dirs in arg.items():
            if isinstance(dirs, (set, frozenset)) or (isinstance(dirs, Iterable) and not isinstance(
                    dirs, (Tensor, np.ndarray, list, tuple, range, str))):
                dirs = sorted(dirs)  # a set, dict keys, a generator
            d = as_indices(dirs, f"{kind}[{key!r}]", n=r, allow_empty=True)
            if len(set(d)) != len(d):
                raise SVToolsError(f"{kind}[{key!r}] names a direction twice: {d}")
            add(key, kind, tuple(sorted(d)))
    for kind, arg in (("zero_omega", zero_omega), ("zero_pattern", zero_pattern)):
        for key in (arg or ()):
            add(key, kind)
    return sorted(edits.values(), key=lambda e: (e.layer, e.head))


def _query_maps(model: Any, layer: int, edits: list[HeadEdit]) -> dict[int, Tensor]:
    """``N`` (``d_head x d_head``, float64) per head: the head's query becomes ``q N``."""
    d_head = int(model.cfg.d_head)
    out: dict[int, Tensor] = {}
    need = [e for e in edits if e.kind in ("remove", "keep")]
    for e in edits:
        if e.kind == "zero_omega":
            out[e.head] = torch.zeros(d_head, d_head, dtype=torch.float64)
    if not need:
        return out
    heads = [e.head for e in need]
    qk = layer_qk(model, layer, heads, dtype=torch.float64)
    W_Q, W_K, b_Q, b_K = (None if t is None else t.to("cpu", torch.float64) for t in head_weights(model, layer))
    for i, e in enumerate(need):
        A, B = W_Q[e.head], W_K[e.head]
        if qk.has_bias:
            zero = torch.zeros(d_head, dtype=torch.float64)
            A = torch.cat([A, (zero if b_Q is None else b_Q[e.head])[None]], 0)
            B = torch.cat([B, (zero if b_K is None else b_K[e.head])[None]], 0)
        U, S, V = qk.U[i].cpu(), qk.S[i].cpu(), qk.V[i].cpu()
        # u_k = A a_k and v_k = B b_k: the singular vectors lie in the column spaces of A and B
        XA, XB = torch.linalg.pinv(A) @ U, torch.linalg.pinv(B) @ V
        for X, Y, side in ((XA, U, "query"), (XB, V, "key")):
            err = float(((A if side == "query" else B) @ X - Y).abs().max())
            if err > 1e-8 * max(1.0, float(Y.abs().max())):
                raise SVToolsError(f"head {layer}.{e.head}: the {side}-side singular vectors are not in the "
                                   f"span of its weights (residual {err:.1e}); cannot edit it exactly")
        K = list(e.directions)
        part = (XA[:, K] * S[K]) @ XB[:, K].T if K else torch.zeros(d_head, d_head, dtype=torch.float64)
        out[e.head] = part if e.kind == "keep" else torch.eye(d_head, dtype=torch.float64) - part
    return out


def _check_heads_dim(t: Tensor, n_heads: int, name: str) -> None:
    if t.ndim != 4 or t.shape[2] != n_heads:
        raise SVToolsError(f"{name} has shape {tuple(t.shape)}; expected (batch, pos, {n_heads}, d_head)")


def _query_hook(maps: dict[int, Tensor], n_heads: int) -> Callable:
    heads = sorted(maps)
    cache: dict[Any, Tensor] = {}

    def hook(q: Tensor, hook: Any) -> Tensor:
        _check_heads_dim(q, n_heads, hook.name)
        key = (q.device, q.dtype)
        if key not in cache:
            cache[key] = torch.stack([maps[h] for h in heads]).to(q.device, torch.float64)
        N = cache[key]
        q = q.clone()
        sel = q[:, :, heads, :].to(torch.float64)
        q[:, :, heads, :] = torch.einsum("bphd,hde->bphe", sel, N).to(q.dtype)
        return q

    return hook


def _zero_z_hook(heads: list[int], n_heads: int) -> Callable:
    def hook(z: Tensor, hook: Any) -> Tensor:
        _check_heads_dim(z, n_heads, hook.name)
        z = z.clone()
        z[:, :, heads, :] = 0
        return z

    return hook


class _RotaryScores:
    """Hooks that capture a layer's query/key inputs and correct its rotary heads' scores.

    For each head the removed (or kept) terms of every causal pair ``(i, j)`` are
    ``sad_terms(qk, x_i, y_j, offset=i - j)`` summed over the chosen directions, with ``qk``
    the decomposition :func:`svtools.decomposition.layer_qk` gives (float64), restricted to
    those directions.
    """

    def __init__(self, model: Any, layer: int, edits: list[HeadEdit]):
        if not is_causal(model):
            raise SVToolsError("rotary interventions are implemented for causal models only")
        self.model, self.layer, self.edits = model, layer, edits
        self.heads = [e.head for e in edits]
        self.scale = attention_scale(model, layer)
        self.n_heads = int(model.cfg.n_heads)
        self.held: dict[str, Tensor] = {}
        self.qk = None
        self.n_pos = 0
        width = max(1, max(len(e.directions) for e in edits))
        self.cols = torch.zeros(len(edits), width, dtype=torch.long)
        self.live = torch.zeros(len(edits), width, dtype=torch.float64)  # 1 for a chosen direction, 0 padding
        for i, e in enumerate(edits):
            self.cols[i, :len(e.directions)] = torch.tensor(e.directions, dtype=torch.long)
            self.live[i, :len(e.directions)] = 1.0
        self.keep = torch.tensor([e.kind == "keep" for e in edits])

    def _decomposition(self, n: int):
        if self.qk is None or n > self.n_pos:
            full = layer_qk(self.model, self.layer, self.heads, n_pos=n, dtype=torch.float64)
            idx = self.cols.to(full.U.device)
            gather = lambda t: torch.take_along_dim(t, idx[:, None, None, :], dim=-1)  # noqa: E731
            S = torch.take_along_dim(full.S, idx[:, None, :], dim=-1) * self.live.to(full.S.device)[:, None, :]
            self.qk = type(full)(U=gather(full.U), S=S, V=gather(full.V), has_bias=full.has_bias,
                                 rotary=full.rotary)
            self.n_pos = n
        return self.qk

    def keep_input(self, x: Tensor, hook: Any) -> None:
        self.held[hook.name.rsplit(".", 2)[-2]] = x.detach()

    def at_scores(self, scores: Tensor, hook: Any) -> Tensor:
        if scores.ndim != 4 or scores.shape[1] != self.n_heads or scores.shape[2] != scores.shape[3]:
            raise SVToolsError(f"{hook.name} has shape {tuple(scores.shape)}; rotary interventions need "
                               "(batch, head, pos, pos) scores without a key-value cache")
        try:
            x, y = self.held.pop("q"), self.held.pop("k")
        except KeyError as exc:
            raise SVToolsError(f"layer {self.layer}: the query/key inputs were not seen before its scores") from exc
        n = scores.shape[-1]
        qk = self._decomposition(n).to(x.device)
        chosen = torch.zeros(scores.shape[0], len(self.heads), n, n, dtype=torch.float64, device=x.device)
        for delta in range(n):
            t = sad_terms(qk, x[:, delta:, None, :], y[:, :n - delta, None, :], offset=delta)  # (b, n-d, head, K)
            chosen.diagonal(offset=-delta, dim1=-2, dim2=-1).copy_(t.sum(-1).permute(0, 2, 1))
        heads = torch.tensor(self.heads, device=scores.device)
        cur = scores[:, heads]
        valid = torch.isfinite(cur) & (cur > torch.finfo(cur.dtype).min / 2)
        keep = self.keep.to(scores.device)[None, :, None, None]
        new = torch.where(keep, self.scale * chosen, cur.to(torch.float64) - self.scale * chosen).to(cur.dtype)
        scores = scores.clone()
        scores[:, heads] = torch.where(valid, new, cur)
        return scores


def intervention_hooks(model: Any, *, remove: Optional[Mapping[Any, Iterable[int]]] = None,
                       keep: Optional[Mapping[Any, Iterable[int]]] = None, zero_omega: Optional[Iterable[Any]] = None,
                       zero_pattern: Optional[Iterable[Any]] = None) -> list[tuple[str, Callable]]:
    """The forward hooks that carry out an intervention, for ``model.hooks(fwd_hooks=...)``.

    Same arguments and effect as :func:`intervene`, without copying the model: the hooks act
    only inside the ``with model.hooks(...)`` block (or ``run_with_hooks``). They hold what
    they need from the weights as they are now; do not change the weights in between.
    """
    edits = edit_plan(model, remove=remove, keep=keep, zero_omega=zero_omega, zero_pattern=zero_pattern)
    n_heads = int(model.cfg.n_heads)
    rotary = rotary_spec(model, [0]) is not None
    hooks: list[tuple[str, Callable]] = []
    for layer, group in itertools.groupby(edits, key=lambda e: e.layer):
        group = list(group)
        pre = f"blocks.{layer}.attn."
        qk_edits = [e for e in group if e.kind in ("remove", "keep")]
        q_edits = [e for e in group if e.kind == "zero_omega"] + ([] if rotary else qk_edits)
        if q_edits:
            hooks.append((pre + "q.hook_out", _query_hook(_query_maps(model, layer, q_edits), n_heads)))
        if rotary and qk_edits:
            rs = _RotaryScores(model, layer, qk_edits)
            hooks += [(pre + "q.hook_in", rs.keep_input), (pre + "k.hook_in", rs.keep_input),
                      (pre + "hook_attn_scores", rs.at_scores)]
        zp = [e.head for e in group if e.kind == "zero_pattern"]
        if zp:
            hooks.append((pre + "o.hook_in", _zero_z_hook(zp, n_heads)))
    return hooks


def intervene(model: Any, *, remove: Optional[Mapping[Any, Iterable[int]]] = None,
              keep: Optional[Mapping[Any, Iterable[int]]] = None, zero_omega: Optional[Iterable[Any]] = None,
              zero_pattern: Optional[Iterable[Any]] = None) -> Any:
    """A copy of ``model`` with chosen heads changed; ``model`` itself is left as it was.

    Args:
        model: a bridge from :func:`svtools.load_model` (GPT-2, GPT-NeoX/Pythia, Llama, BERT).
        remove: ``{(layer, head): directions}``: the head's scores lose those singular
            directions' terms (module docstring: per offset for rotary heads).
        keep: ``{(layer, head): directions}``: the head's scores keep only those terms.
        zero_omega: ``[(layer, head), ...]``: the heads' scores are 0 (uniform attention).
        zero_pattern: ``[(layer, head), ...]``: the heads' attention weights are 0 (they write
            nothing).

    Identity (tested on random GPT-2, GPT-NeoX, Llama and BERT models, float32 to 1e-5 of
    the scores' scale): for an edited head, the intervened model's unscaled scores at every
    visible pair equal ``decompose(model, ...).scores - terms[..., K].sum(-1)`` (``remove``) or
    ``terms[..., K].sum(-1)`` (``keep``) on the *original* model's inputs of that layer; every
    other head of that layer is bitwise unchanged, and every layer before it.

    Returns a new bridge (deep copy, eval mode) with permanent hooks; ``reset_hooks()`` on it
    keeps them (``reset_hooks(including_permanent=True)`` removes them).
    """
    check_bridge(model)
    hooks = intervention_hooks(model, remove=remove, keep=keep, zero_omega=zero_omega, zero_pattern=zero_pattern)
    twin = detached_copy(model)
    for name, fn in hooks:
        twin.add_hook(name, fn, is_permanent=True)
    return twin


def detached_copy(model: Any) -> Any:
    """A deep copy of a bridge that shares no state with ``model`` (eval mode).

    ``copy.deepcopy`` alone is not enough with TransformerLens 4.3: a block wires, on its first
    forward pass, pre-hooks on its norms whose closures point at *that* block's attention and
    hook points; a deep copy keeps the closures (functions are not copied), so the copy's
    forward pass would write its residual stream onto the original's attention module (and a
    later ``deepcopy`` of the original then fails on that non-leaf tensor). The copy's wired
    hooks are removed here (through the copy's own handles); the copy wires its own on its
    first forward pass. Tested: after the copy runs with gradients enabled, the original holds
    no tensor of it and gives bitwise the same outputs.
    """
    check_bridge(model)
    # A forward pass with gradients on leaves non-leaf tensors on the modules (TransformerLens
    # keeps the last captured residual), which deepcopy refuses: copy them detached instead.
    memo: dict[int, Any] = {}
    for module in model.modules():
        for value in vars(module).values():
            for t in (value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple))
                      else (value,)):
                if isinstance(t, Tensor) and t.grad_fn is not None:
                    memo[id(t)] = t.detach().clone()
    try:
        twin = copy.deepcopy(model, memo)
    except RuntimeError as exc:
        raise SVToolsError(f"cannot copy the model ({exc}); run it under torch.no_grad() before intervening") from exc
    for block in getattr(twin, "blocks", []):
        teardown = getattr(block, "_teardown_capture_hooks", None)
        if callable(teardown):
            teardown()
    return twin.eval()


# ----------------------------------------------------------------------------- the null

def rank_bands(r: int, band: int) -> list[range]:
    """Consecutive rank bands ``[0, band), [band, 2 band), ...`` covering ``0..r-1`` (the last may be short)."""
    r = as_int(r, "r", min_value=1)
    band = as_int(band, "band", min_value=1)
    return [range(s, min(s + band, r)) for s in range(0, r, band)]


def sigma_matched_sets(chosen: Sequence[int], r: int, n_sets: int, *, band: int = 4, seed: int = 0,
                       include_chosen: bool = False) -> list[tuple[int, ...]]:
    """Random sets of singular directions matched to ``chosen`` on singular-value rank.

    The ranks ``0..r-1`` (ordered by singular value, largest first) are cut into bands of
    ``band`` consecutive ranks (:func:`rank_bands`). Each returned set has as many members in
    each band as ``chosen`` has, drawn uniformly within the band, so it removes directions of
    about the same singular values: the null that an effect of removing ``chosen`` must beat
    ("removing any directions that large does as much"). Sets are distinct and sorted; the
    chosen set itself is left out unless ``include_chosen``. When fewer than ``n_sets`` such
    sets exist, all of them are returned (in a seeded random order), so the null may be smaller
    than asked: check ``len(result)``.

    Deterministic in ``seed`` (numpy ``default_rng``).
    """
    r = as_int(r, "r", min_value=1)
    n_sets = as_int(n_sets, "n_sets", min_value=1)
    chosen = sorted(as_indices(list(chosen), "chosen", n=r))
    if len(set(chosen)) != len(chosen):
        raise SVToolsError(f"chosen names a direction twice: {chosen}")
    bands = rank_bands(r, band)
    need = [(list(b), sum(k in b for k in chosen)) for b in bands]
    need = [(b, c) for b, c in need if c]
    total = math.prod(math.comb(len(b), c) for b, c in need)
    rng = np.random.default_rng(as_int(seed, "seed"))
    target = tuple(chosen)
    if total <= max(4 * n_sets, 5000):  # few enough: enumerate, then draw without replacement
        pools = [list(itertools.combinations(b, c)) for b, c in need]
        every = [tuple(sorted(itertools.chain.from_iterable(p))) for p in itertools.product(*pools)]
        every = [s for s in every if include_chosen or s != target]
        order = rng.permutation(len(every))
        return [every[i] for i in order[:n_sets]]
    out: list[tuple[int, ...]] = []
    seen = set() if include_chosen else {target}
    while len(out) < n_sets:
        s = tuple(sorted(int(k) for b, c in need for k in rng.choice(b, size=c, replace=False)))
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out
