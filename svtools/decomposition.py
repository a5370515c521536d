"""Decompose a real model's attention scores over each head's singular vectors.

:func:`decompose` runs the model once (up to the layer asked for), reads the inputs of the query
and key projections and the model's own attention pattern from TransformerLens hooks, and splits
every score of every chosen head into its per-singular-vector terms. It is exact: the terms sum
to the unscaled scores, and ``softmax(scale * scores + mask)`` reproduces the model's own
attention weights (checked on every call).

Supported: GPT-2 (LayerNorm, biases, absolute positions), GPT-NeoX / Pythia (parallel
attention, partial rotary, biases), BERT (post-LN, bidirectional, padding), Llama (RMSNorm, full
rotary, grouped-query attention, no biases).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

import einops
import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from svtools._checks import SVToolsError, UnsupportedModelError, as_dtype, as_indices, is_index_sequence
from svtools.bridge import check_bridge, check_heads, check_layer, hf_model_of, is_causal, model_type, prepare_tokens
# tokenize and prepends_bos moved to svtools.bridge (documented there); they stay importable from here
from svtools.bridge import prepends_bos, tokenize  # noqa: F401
from svtools.models import resolve_check_tol
from svtools.qk import QKSVD, RotarySpec, qk_svd, random_rotation, rotated_factors
from svtools.rotary import offset_rotations, one_thread, rotation_seed
from svtools.terms import homogeneous, relative_terms

__all__ = ["decompose", "decompose_layers", "HeadDecomposition", "head_weights", "layer_qk", "head_rotations",
           "attention_scale", "rotary_spec", "stream_attention", "cache_attention_inputs", "visibility_mask",
           "decomposition_dtype"]


# ----------------------------------------------------------------------------- model facts

def _attn_module(model: Any, layer: int) -> Any:
    return model.blocks[layer].attn.original_component


def attention_scale(model: Any, layer: int) -> float:
    r"""The factor the model multiplies :math:`q \cdot k` by before the softmax (usually
    :math:`1/\sqrt{d_\text{head}}`)."""
    layer = check_layer(model, layer)
    attn = _attn_module(model, layer)
    d_head = model.cfg.d_head
    if model_type(model) == "gpt2":
        s = 1.0 / math.sqrt(d_head) if getattr(attn, "scale_attn_weights", True) else 1.0
        if getattr(attn, "scale_attn_by_inverse_layer_idx", False):
            s /= float(layer + 1)
        return s
    s = getattr(attn, "scaling", None)
    return float(s) if s is not None else 1.0 / math.sqrt(d_head)


def rotary_spec(model: Any, offsets: Sequence[int] | Tensor) -> Optional[RotarySpec]:
    """The model's rotary embedding as a :class:`RotarySpec` (None for absolute positions)."""
    if model_type(model) not in ("gpt_neox", "llama"):
        return None
    rot = [m for name, m in hf_model_of(model).named_modules() if hasattr(m, "inv_freq") and name.endswith("rotary_emb")]
    if len(rot) != 1:
        raise UnsupportedModelError(f"expected one rotary embedding module, found {len(rot)}")
    inv_freq = rot[0].inv_freq.detach().to("cpu", torch.float64)
    return RotarySpec(rotary_dim=2 * inv_freq.numel(), inv_freq=inv_freq,
                      offsets=torch.as_tensor(offsets), layout="neox",
                      attention_scaling=float(getattr(rot[0], "attention_scaling", 1.0)))


def head_weights(model: Any, layer: int | None = None) -> tuple[
        Float[Tensor, "layer head d_model d_head"], Float[Tensor, "layer head d_model d_head"],
        Optional[Float[Tensor, "layer head d_head"]], Optional[Float[Tensor, "layer head d_head"]]]:
    """``W_Q, W_K, b_Q, b_K`` per head (raw weights: ``q = x W_Q + b_Q`` on the projection's input).

    Grouped-query attention: key weights are repeated so that head ``h`` gets key head
    ``h // (n_heads / n_kv_heads)``. Biases are None for bias-free projections. With ``layer``
    given, the ``layer`` dim is dropped.
    """
    def stacked(name: str) -> Optional[Tensor]:
        try:
            t = getattr(model, name)
        except AttributeError:
            return None
        return None if t is None else t.detach()

    W_Q, W_K = stacked("W_Q"), stacked("W_K")
    if W_Q is None or W_K is None:
        raise UnsupportedModelError("the model exposes no stacked W_Q/W_K")
    b_Q, b_K = stacked("b_Q"), stacked("b_K")
    n_heads = W_Q.shape[1]
    if W_K.shape[1] != n_heads:
        if n_heads % W_K.shape[1]:
            raise UnsupportedModelError(f"{n_heads} query heads do not divide into {W_K.shape[1]} key heads")
        rep = n_heads // W_K.shape[1]
        W_K = W_K.repeat_interleave(rep, dim=1)
        b_K = None if b_K is None else b_K.repeat_interleave(rep, dim=1)
    if layer is not None:
        layer = check_layer(model, layer)
        W_Q, W_K = W_Q[layer], W_K[layer]
        b_Q = None if b_Q is None else b_Q[layer]
        b_K = None if b_K is None else b_K[layer]
    return W_Q, W_K, b_Q, b_K


def layer_qk(model: Any, layer: int, heads: Sequence[int] | None = None, *, n_pos: int | None = None,
             dtype: Optional[torch.dtype] = None) -> QKSVD:
    """:func:`svtools.qk_svd` of the chosen heads of one layer: ``(head, [offset,] d_in, r)``.

    Rotary models get one decomposition per offset ``0..n_pos-1`` (causal: query minus key
    position is never negative); pass ``n_pos`` for them.
    """
    layer = check_layer(model, layer)
    heads = check_heads(model, heads)
    W_Q, W_K, b_Q, b_K = head_weights(model, layer)
    idx = torch.tensor(heads, device=W_Q.device)
    sel = lambda t: None if t is None else t.index_select(0, idx)  # noqa: E731
    rot = None
    if model_type(model) in ("gpt_neox", "llama"):
        if n_pos is None:
            raise SVToolsError("rotary model: pass n_pos (the sequence length) to decompose its offsets")
        rot = rotary_spec(model, range(n_pos))
    return qk_svd(sel(W_Q), sel(W_K), sel(b_Q), sel(b_K), rotary=rot, dtype=dtype)


# ----------------------------------------------------------------------------- decomposition

@dataclass
class HeadDecomposition:
    """The SAD of one layer's chosen heads on a batch of token sequences.

    Attributes (``head`` runs over :attr:`heads`):
        terms: ``(batch, head, query, key, r)`` per-singular-vector terms; zero where masked.
        scores: ``(batch, head, query, key)`` unscaled, pre-softmax scores ``= terms.sum(-1)``.
        pattern: ``(batch, head, query, key)`` the attention weights the model itself computed.
        mask: ``(batch, 1, query, key)`` True where the query may attend the key.
        scale: the model's score scale (``pattern = softmax(scale * scores + mask)``).
        qk: the heads' :class:`~svtools.qk.QKSVD`, ``(head, [offset,] d_in, r)``.
        x_query, x_key: ``(batch, pos, d_model)`` inputs of the query and key projections.
        tokens, attention_mask: ``(batch, pos)`` what the model was run on.
        check_tol: tolerance of the exactness check it passed (None: unchecked; see ``pattern_tolerance``).
    """

    layer: int
    heads: list[int]
    terms: Float[Tensor, "batch head query key r"]
    scores: Float[Tensor, "batch head query key"]
    pattern: Float[Tensor, "batch head query key"]
    mask: Bool[Tensor, "batch 1 query key"]
    scale: float
    qk: QKSVD
    x_query: Float[Tensor, "batch pos d_model"]
    x_key: Float[Tensor, "batch pos d_model"]
    tokens: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    model_name: str = ""
    #: tolerance the exactness check used (None: not checked); see :func:`svtools.models.pattern_tolerance`
    check_tol: Optional[float] = None
    _rotated: dict = field(default_factory=dict, repr=False)

    def softmax_pattern(self) -> Float[Tensor, "batch head query key"]:
        """``softmax(scale * scores)`` over the keys each query may see."""
        return _softmax_masked(self.scores, self.scale, self.mask)

    def max_pattern_error(self) -> float:
        """Largest ``|softmax(scale * scores + mask) - pattern|`` (the exactness check)."""
        return float((self.softmax_pattern() - self.pattern.to(self.scores.dtype)).abs().max())

    def rotated_terms(self, seed: int = 0) -> Float[Tensor, "batch head query key r"]:
        """The earlier work's control: the same scores over a random rotation of each singular basis.

        Not evidence of alignment: the rotation flattens the spectrum (see
        :func:`svtools.terms.rotated_terms`); the calibrated comparison is :mod:`svtools.sad.null`.
        Identity: ``rotated_terms(seed).sum(-1) == scores`` (float precision). One Haar-random
        ``r x r`` rotation per head (per offset for rotary heads) from :func:`head_rotations`: a
        head's control depends on ``(seed, layer, head)`` only, not on the other heads decomposed
        with it (for rotary heads on ``(seed, layer, head, offset)``).
        """
        if seed not in self._rotated:
            Q = head_rotations(seed, self.layer, self.heads, self.qk.batch_shape[1:], self.qk.r,
                               dtype=self.qk.U.dtype, device=self.qk.U.device,
                               offsets=None if self.qk.rotary is None else self.qk.rotary.offsets)
            left, right = rotated_factors(self.qk, rotation=Q)
            self._rotated[seed] = _grid_terms(left, right, self.qk, self.x_query, self.x_key, self.mask)
        return self._rotated[seed]

    def relative_terms(self) -> Float[Tensor, "batch head query key r"]:
        """:func:`svtools.relative_terms` of :attr:`terms` under :attr:`mask` (NaN where undefined)."""
        return relative_terms(self.terms, self.mask)


def head_rotations(seed: int, layer: int, heads: Sequence[int], inner_shape: tuple[int, ...] | torch.Size,
                   r: int, *, dtype=torch.float32, device=None,
                   offsets: Optional[Sequence[int] | Tensor] = None) -> Float[Tensor, "head ... r r"]:
    """Haar-random rotations for the rotated control, one stream per ``(seed, layer, head)``.

    Returns ``(len(heads), *inner_shape, r, r)``; ``inner_shape`` is ``()`` or ``(offset,)``.
    Rotary heads: pass ``offsets`` (the offset values, ``inner_shape`` is then ignored) and each
    ``(seed, layer, head, offset)`` gets its own stream (:func:`svtools.rotary.offset_rotations`),
    so the rotation of an offset does not depend on which other offsets (or how long a padded
    batch) are decomposed. Absolute positions: :func:`svtools.qk.random_rotation` seeded with
    :func:`svtools.rotary.rotation_seed` of ``(seed, layer, head)``.
    """
    if offsets is not None:
        offs = [int(o) for o in torch.as_tensor(offsets).reshape(-1).tolist()]
        Q = offset_rotations(seed, layer, [h for h in heads for _ in offs], offs * len(heads), r,
                             dtype=dtype, device=device)
        return Q.reshape(len(heads), len(offs), r, r)
    with one_thread():  # many small QRs: threads only add contention
        return torch.stack([
            random_rotation(tuple(inner_shape), r, seed=rotation_seed(seed, layer, h), dtype=dtype, device=device)
            for h in heads])


def _softmax_masked(scores: Tensor, scale: float, mask: Tensor) -> Tensor:
    neg = torch.finfo(scores.dtype).min
    return torch.softmax(torch.where(mask, scores * scale, torch.full((), neg, dtype=scores.dtype,
                                                                        device=scores.device)), dim=-1)


def _grid_terms(left: Tensor, right: Tensor, qk: QKSVD, x_query: Tensor, x_key: Tensor,
                mask: Tensor) -> Float[Tensor, "batch head query key r"]:
    """Terms ``(x_i^T left)_k (y_j^T right)_k`` for every (query i, key j) pair, zero where masked.

    ``left, right``: ``(head, d_in, r)``, or ``(head, offset, d_in, r)`` for rotary heads, where
    pair ``(i, j)`` uses offset ``i - j``.
    """
    xq, xk = homogeneous(x_query, qk, "x_query"), homogeneous(x_key, qk, "x_key")
    if qk.rotary is None:
        a = einops.einsum(xq, left, "b q d, h d r -> b h q r")
        c = einops.einsum(xk, right, "b k d, h d r -> b h k r")
        t = a[:, :, :, None, :] * c[:, :, None, :, :]
    else:
        n_q, n_k = xq.shape[1], xk.shape[1]
        a = einops.einsum(xq, left, "b q d, h o d r -> b h o q r")
        c = einops.einsum(xk, right, "b k d, h o d r -> b h o k r")
        qi = torch.arange(n_q)[:, None].expand(n_q, n_k)
        ki = torch.arange(n_k)[None, :].expand(n_q, n_k)
        oi = qk.rotary.offset_index((qi - ki).clamp_min(0))  # masked (i < j) pairs are zeroed below
        qi, ki, oi = (t.to(xq.device) for t in (qi, ki, oi))
        t = a[:, :, oi, qi, :] * c[:, :, oi, ki, :]
    return t * mask[..., None].to(t.dtype)


def cache_attention_inputs(model: Any, ids: Tensor, am: Tensor, layers: Sequence[int]) -> dict[str, Tensor]:
    """One forward pass (up to the last layer needed) caching the q/k inputs and the pattern."""
    names = {f"blocks.{l}.attn.{h}" for l in layers for h in ("q.hook_in", "k.hook_in", "hook_pattern")}
    with torch.no_grad():
        _, cache = model.run_with_cache(ids, attention_mask=am, names_filter=lambda n: n in names,
                                        stop_at_layer=max(layers) + 1)
    missing = sorted(n for n in names if n not in cache)
    if missing:
        raise UnsupportedModelError(f"the model's bridge does not expose hooks {missing[:3]}")
    return {n: cache[n].detach() for n in names}


class _StopForward(Exception):
    """Raised from the last needed hook: the rest of the forward pass is not needed."""


def stream_attention(
    model: Any,
    ids: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"],
    layers: Sequence[int],
    callback: Any,
) -> None:
    """One forward pass that hands each layer's attention inputs to ``callback``, then stops.

    For each layer in ``layers`` (ascending), ``callback(layer, x_query, x_key, pattern)`` is
    called from inside the forward pass as soon as that layer's attention pattern exists:
    ``x_query, x_key (batch, pos, d_model)`` are the inputs of the query and key projections,
    ``pattern (batch, head, query, key)`` the model's own weights (every head). Only one
    layer's tensors are alive at a time (nothing is cached), and the pass stops right after
    the last layer needed: no later attention, MLP, final norm or unembedding is computed.
    """
    layers = sorted(set(int(l) for l in layers))
    if not layers:
        raise SVToolsError("no layers to stream")
    last = layers[-1]
    held: dict[str, Tensor] = {}

    def keep(t: Tensor, hook: Any) -> None:
        held[hook.name] = t.detach()

    def at_pattern(t: Tensor, hook: Any) -> None:
        layer = int(hook.name.split(".")[1])
        pre = f"blocks.{layer}.attn."
        try:
            xq, xk = held.pop(pre + "q.hook_in"), held.pop(pre + "k.hook_in")
        except KeyError as exc:
            raise UnsupportedModelError(f"the model's bridge did not run hook {exc.args[0]} before "
                                        f"{hook.name}") from exc
        callback(layer, xq, xk, t.detach())
        if layer == last:
            raise _StopForward

    hooks = []
    for l in layers:
        pre = f"blocks.{l}.attn."
        hooks += [(pre + "q.hook_in", keep), (pre + "k.hook_in", keep), (pre + "hook_pattern", at_pattern)]
    try:
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            model(ids, attention_mask=attention_mask, return_type=None)
    except _StopForward:
        return
    raise UnsupportedModelError(f"the forward pass ended without reaching blocks.{last}.attn.hook_pattern")


def visibility_mask(model: Any, am: Tensor) -> Bool[Tensor, "batch 1 query key"]:
    """True where a query may attend a key: the key is a real token (``am``, ``(batch, pos)``)
    and, in a causal model, not after the query."""
    n_pos = am.shape[1]
    keyvalid = am.bool()[:, None, None, :]
    if is_causal(model):
        causal = torch.ones(n_pos, n_pos, dtype=torch.bool, device=am.device).tril()
        mask = keyvalid & causal
    else:
        mask = keyvalid.expand(-1, -1, n_pos, -1)
    return mask.expand(am.shape[0], 1, n_pos, n_pos).clone()


def _layer_decomposition(model: Any, layer: int, heads: list[int], cached: dict[str, Tensor], ids: Tensor,
                         am: Tensor, mask: Tensor, dtype: torch.dtype, check_tol: Optional[float],
                         qk_cache: Optional[dict] = None) -> HeadDecomposition:
    pre = f"blocks.{layer}.attn."
    x_q, x_k = cached[pre + "q.hook_in"], cached[pre + "k.hook_in"]
    idx = torch.tensor(heads, device=ids.device)
    pattern = cached[pre + "hook_pattern"].index_select(1, idx)
    key = (layer, tuple(heads), ids.shape[1], dtype)
    qk = None if qk_cache is None else qk_cache.get(key)
    if qk is None:
        qk = layer_qk(model, layer, heads, n_pos=ids.shape[1], dtype=dtype)
        if qk_cache is not None:
            qk_cache[key] = qk
    left, right = qk.factors()
    terms = _grid_terms(left, right, qk, x_q, x_k, mask)
    dec = HeadDecomposition(layer=layer, heads=heads, terms=terms, scores=terms.sum(-1), pattern=pattern,
                            mask=mask, scale=attention_scale(model, layer), qk=qk, x_query=x_q, x_key=x_k,
                            tokens=ids, attention_mask=am,
                            model_name=str(getattr(model.cfg, "model_name", "")))
    dec.check_tol = check_tol
    if check_tol is not None:
        err = dec.max_pattern_error()
        if not err <= check_tol:
            mdt = next(hf_model_of(model).parameters()).dtype
            raise UnsupportedModelError(
                f"decomposition does not reproduce the model's attention at layer {layer} "
                f"(max |softmax - pattern| = {err:.2e} > tolerance {check_tol:.2e}, used for a {mdt} model; "
                "see svtools.models.pattern_tolerance); this model's attention has a mechanism svtools "
                "does not model")
    return dec


def decomposition_dtype(dtype: Any) -> torch.dtype:
    """float32 by default; float16/bfloat16 are computed as float32 (the terms of a half-precision
    model's scores are decomposed from its half activations, in float32)."""
    dt = as_dtype(dtype) or torch.float32
    return torch.float32 if dt in (torch.float16, torch.bfloat16) else dt


def decompose(
    model: Any,
    tokens: Any,
    layer: int,
    head: int | Sequence[int] | None = None,
    *,
    attention_mask: Optional[Tensor] = None,
    dtype: Optional[torch.dtype] = None,
    check_tol: float | str | None = "auto",
) -> HeadDecomposition:
    """Split every attention score of ``layer``'s heads into per-singular-vector terms.

    Identities (checked): ``terms.sum(-1) == scores`` and
    ``softmax(scale * scores + mask) == pattern`` (the model's own weights) — the call raises
    :class:`~svtools.models.UnsupportedModelError` if the second fails by more than
    ``check_tol``: ``"auto"`` (default) = :func:`svtools.models.pattern_tolerance` of the model's
    dtype (1e-3 for float32, 0.031 for float16, 0.25 for bfloat16), a number, or None (no check).
    The tolerance used is stored as :attr:`HeadDecomposition.check_tol`.

    Args:
        model: a ``TransformerBridge`` from :func:`svtools.load_model`.
        tokens: ``(batch, pos)`` or ``(pos,)`` token ids, or a list of strings (tokenised with
            the model's tokenizer by :func:`~svtools.bridge.tokenize`, right-padded and masked).
        layer: which layer.
        head: one head, a list of heads, or None for all heads of the layer (one batched pass).
        attention_mask: ``(batch, pos)`` 1 for real tokens, 0 for padding (no other values),
            right-padded; only with token ids.
        dtype: dtype of the decomposition (default float32; float64 for checks). A model in
            float16/bfloat16 is decomposed in float32 from its half-precision activations;
            asking for ``dtype=torch.float16``/``bfloat16`` also gives float32.

    For several layers use :func:`decompose_layers`, which runs the model once.

    Memory: this is the full view, every pair of every chosen head:
    ``terms`` holds ``batch * heads * pos^2 * r`` numbers (float32: 4 bytes each; e.g. 32 prompts
    x 256 tokens x 12 heads x r 32 = 3.2 GB), and :meth:`HeadDecomposition.rotated_terms` and
    :meth:`~HeadDecomposition.relative_terms` as much again each; rotary heads also hold
    ``heads * pos * d_in * r`` numbers per side for the per-offset ``U, V``. To measure selected
    pairs only, use :func:`svtools.sad.head_sparsity`, which never builds this tensor.
    """
    layer = check_layer(model, layer)
    heads = check_heads(model, head)
    dtype = decomposition_dtype(dtype)
    check_tol = resolve_check_tol(model, check_tol)
    ids, am = prepare_tokens(model, tokens, attention_mask)
    cached = cache_attention_inputs(model, ids, am, [layer])
    return _layer_decomposition(model, layer, heads, cached, ids, am, visibility_mask(model, am),
                                dtype, check_tol)


def decompose_layers(
    model: Any,
    tokens: Any,
    layers: Sequence[int] | Mapping[int, Sequence[int]] | None = None,
    *,
    attention_mask: Optional[Tensor] = None,
    dtype: Optional[torch.dtype] = None,
    check_tol: float | str | None = "auto",
    qk_cache: Optional[dict] = None,
) -> Iterator[HeadDecomposition]:
    """:func:`decompose` for several layers from ONE forward pass, yielded layer by layer.

    ``layers``: a layer, a list of layers (all heads), a mapping ``layer -> heads`` (a layer
    named twice, e.g. ``{0: [1], -6: [2]}`` on a 6-layer model, gets the union of its heads), or
    None (every head of every layer). Only the layers' projection inputs and patterns are kept from the forward pass
    (``2 * batch * pos * d_model + heads * batch * pos^2`` numbers per layer); each layer's terms
    are built when the iterator reaches it, so memory holds one layer's terms at a time.

    ``qk_cache``: a dict the caller keeps across calls on chunks of the same prompts (same padded
    length), so each layer's :func:`layer_qk` is computed once; the weights must not change between
    the calls.
    """
    plan = _layer_plan(model, layers)
    dtype = decomposition_dtype(dtype)
    check_tol = resolve_check_tol(model, check_tol)
    ids, am = prepare_tokens(model, tokens, attention_mask)
    cached = cache_attention_inputs(model, ids, am, list(plan))
    mask = visibility_mask(model, am)
    for layer in sorted(plan):
        yield _layer_decomposition(model, layer, plan[layer], cached, ids, am, mask,
                                   dtype, check_tol, qk_cache)


def _layer_plan(model: Any, layers: Any) -> dict[int, list[int]]:
    """``layers`` as accepted by :func:`decompose_layers` -> ``{layer: heads}`` (layers normalised)."""
    check_bridge(model)
    if layers is None:
        return {l: check_heads(model, None) for l in range(model.cfg.n_layers)}
    plan: dict[int, list[int]] = {}
    if isinstance(layers, Mapping):
        for l, h in layers.items():
            merged = plan.setdefault(check_layer(model, l), [])
            for head in check_heads(model, h):
                if head not in merged:
                    merged.append(head)
    else:
        generic = isinstance(layers, Iterable) and not isinstance(layers, (str, Tensor, np.ndarray)) \
            and not is_index_sequence(layers)  # a set, dict keys, a generator
        items = list(layers) if generic else as_indices(layers, "layers", allow_empty=True)
        for l in items:
            plan.setdefault(check_layer(model, l), check_heads(model, None))
    if not plan:
        raise SVToolsError("no layers to decompose (layers is empty)")
    return plan
