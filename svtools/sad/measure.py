"""``head_sparsity``: per-pair sparseness of the chosen heads, with the rotated control and the nulls.

The entry point of SAD at scale: it checks the arguments, resolves which heads of which layers
to measure, cuts the prompts into chunks whose attention fits :data:`CHUNK_BYTES`, runs the
:class:`~svtools.sad.engine.PairEngine` on each chunk and returns one typed frame
(:mod:`svtools.sad.frame`).
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from svtools._checks import SVToolsError, as_dtype, as_float, as_indices, as_int, is_index_sequence
from svtools.bridge import check_bridge, check_heads, check_layer, prepare_tokens
from svtools.decomposition import decomposition_dtype
from svtools.models import resolve_check_tol
from svtools.runtime import tqdm
from svtools.sad.engine import PairEngine
from svtools.sad.frame import assemble_frame
from svtools.sad.selection import Select, check_baseline

__all__ = ["head_sparsity", "CHUNK_BYTES"]

#: Prompts per forward pass are cut so that one layer's ``(batch, head, query, key)`` tensor of the
#: decomposition dtype stays under this many bytes (the model's own attention, the scores of the
#: exactness check and the selection masks are tensors of this size).
CHUNK_BYTES = 32 * 2**20


def _heads_by_layer(model: Any, layers, heads) -> dict[int, list[int]]:
    """``layers``/``heads`` of :func:`head_sparsity` -> ``{layer: heads}``.

    ``heads`` is either head indices (an int, a list or 1-D array of ints: the same heads in every
    layer of ``layers``) or a list of ``(layer, head)`` pairs. A bare *tuple* of two ints with no
    ``layers`` (``heads=(9, 6)``) could mean either, so it is an error that names both spellings.
    """

    check_bridge(model)
    n_layers = model.cfg.n_layers
    if heads is not None and is_index_sequence(heads) and not isinstance(heads, (Tensor, np.ndarray)) \
            and len(heads) and all(isinstance(h, (tuple, list)) or (isinstance(h, (Tensor, np.ndarray)) and h.ndim == 1)
                                   for h in heads):
        if layers is not None:
            raise SVToolsError("give either (layer, head) pairs in heads= or layers= with head indices, not both")
        out: dict[int, list[int]] = {}
        for lh in heads:
            if len(lh) != 2:
                raise SVToolsError(f"heads given as pairs must be (layer, head), got {lh!r}")
            layer = check_layer(model, lh[0])
            out.setdefault(layer, [])
            for h in check_heads(model, lh[1]):
                if h not in out[layer]:
                    out[layer].append(h)
        return {k: sorted(v) for k, v in sorted(out.items())}
    if isinstance(heads, tuple) and len(heads) == 2 and layers is None:
        a, b = heads
        raise SVToolsError(f"heads={heads!r} is ambiguous: for the single head (layer {a}, head {b}) write "
                           f"heads=[({a}, {b})]; for heads {a} and {b} of every layer write heads=[{a}, {b}]")
    if layers is None:
        layer_list = list(range(n_layers))
    else:
        layer_list = as_indices(layers, "layers", allow_empty=True)
        if not layer_list:
            raise SVToolsError("layers is empty")
    head_list = check_heads(model, heads)
    return {check_layer(model, layer): head_list for layer in sorted(set(layer_list))}


def head_sparsity(
    model: Any,
    tokens: Any,
    *,
    layers: int | Sequence[int] | None = None,
    heads: int | Sequence[int] | Sequence[tuple[int, int]] | None = None,
    select: Select = "threshold",
    threshold: float = 0.5,
    exclude_first: bool = True,
    attention: Literal["absolute", "relative"] = "absolute",
    control: Optional[Literal["rotated"]] = "rotated",
    seed: int = 0,
    frac: float = 1.0,
    attention_mask: Optional[Tensor] = None,
    batch_size: int = 32,
    dtype: Optional[torch.dtype] = None,
    progress: bool = True,
    baseline: Optional[str | Sequence[str]] = None,
    baseline_fraction: float = 0.1,
    baseline_bound: Optional[float] = None,
    baseline_seed: int = 0,
) -> pd.DataFrame:
    """Per-pair sparseness of the chosen heads' decompositions, with the controls and the nulls.

    Select first, decompose only what is measured. For each chunk of prompts, one forward pass
    (:func:`svtools.decomposition.stream_attention`) hands each needed layer's projection
    inputs and attention pattern over as soon as they exist and stops after the last layer
    needed. In each layer the pattern chooses the pairs (:func:`select_pairs`, padding queries
    excluded, plus the baseline samples); only those pairs' terms are formed, from per-head
    projections ``x~ U S`` and ``y~ V`` (rotated control: the same projections times
    ``S^-1/2 Q``, an ``r x r`` product); relative terms use each query's sum of key
    projections (:func:`svtools.terms.relative_pair_terms`). Rotary heads are decomposed only
    at the offsets the measured pairs use, in factored form (:func:`svtools.qk.qk_svd_factored`:
    shared projections, one ``d_head x d_head`` factor pair per offset). No
    ``(batch, head, query, key, r)`` tensor is ever built (:func:`svtools.decompose` still gives
    that full view, for every pair). Exactness is checked on every chunk and layer: the
    reconstructed scores must reproduce the model's weights (``softmax``, tolerance 1e-3) on
    every measured pair and on the two largest weights of every query of every head, and each
    pair's terms (real and rotated) must sum to its score; a failure raises
    :class:`~svtools.models.UnsupportedModelError`.

    Rows (one per measured pair), columns (:data:`COLUMNS`):
        ``layer, head, prompt`` (row of ``tokens``), ``query, key`` (positions), ``attention``
        (the model's own weight), ``score`` (sum of the terms: unscaled score, or relative score
        with ``attention="relative"``), ``n_recon, rolls_tovee`` of the terms over the singular
        basis, ``n_recon_rotated, rolls_tovee_rotated`` of the same score over a random rotation
        of it (NaN with ``control=None``), ``dominant_k`` (singular index of the largest term in
        the direction of the score; singular values are descending, so 0 = largest sigma),
        ``dominant_k_rotated``, ``dominant_sigma`` (``sigma_dominant / sigma_0``), ``r``
        (number of terms), ``used`` (tuple: the ``n_recon`` indices that reconstruct the score,
        largest first), ``query_token, key_token`` (ids), ``kind`` (``"attended"`` for the
        selected pairs, else the baseline the row belongs to).

    Rows are ordered by ``kind`` (attended first), then layer, head, prompt, query, key; the
    attended rows are the same whether or not baselines are asked for.

    Controls and nulls, and what each can and cannot rule out:
        * the **rotated control** (columns ``*_rotated``, every row): the same score split over
          ``U S^1/2 Q``, ``V S^1/2 Q`` with ``Q`` Haar-random. It rules out that the sparsity is
          an artefact of the score being a sum of few *large-norm* directions in any basis
          (e.g. a nearly rank-one head read in a random basis). It cannot separate alignment
          from an uneven spectrum: the rotation mixes large and small singular values, so a head
          whose ``sigma_k`` fall off steeply looks sparse in its singular basis for *every* pair,
          attended or not (see PAPER.md, part 3, caution).
        * ``baseline="non-attended"`` (``kind="non-attended"``): a seeded sample of the same
          heads' pairs on the same prompts that the head does *not* select (attention below
          ``baseline_bound`` when given, else simply not selected by the rule; visible keys,
          real queries, the same ``exclude_first`` rule). Same basis and spectrum as the
          attended pairs, so a difference between the two is not the spectrum. It cannot rule
          out that the difference comes from the score itself: non-attended pairs mostly have
          large *negative* scores, and N_recon / Rolls-Tovee depend on the total's sign and size;
          compare like with like (relative attention, or pairs matched on score) before reading
          a difference as alignment. Which singular vectors each kind uses:
          :func:`usage_difference`.
        * ``baseline="random"`` (``kind="random"``): a seeded sample of all eligible pairs of
          the head, whatever their attention (a random pair may also be attended). It keeps the
          spectrum and the token statistics and answers "is an attended pair sparser than a
          typical pair of this head?"; it cannot say why (a head sparse for every pair is sparse
          for random pairs too, and attended pairs differ from random ones in score as well).

        ``baseline`` may list both. Baseline rows carry the rotated control too.

    Identities: terms sum to the score in both bases, so the score column is basis-free (and the
    same for a pair whatever its kind); the rows agree with :func:`svtools.sad_terms` /
    :func:`svtools.n_recon` applied pair by pair (tested). Rotary models (Pythia, Llama) have
    one basis per offset ``query - key``, so index ``k`` names a different vector at different
    offsets.

    Args:
        model: a ``TransformerBridge`` from :func:`svtools.load_model` (runs where it lives: GPU
            if the model is there).
        tokens: list of strings (tokenised once by :func:`svtools.bridge.tokenize`), or
            ``(batch, pos)`` ids with ``attention_mask``.
        layers, heads: which heads. ``heads`` may be head indices (used in every layer of
            ``layers``, default all) or a list of ``(layer, head)`` pairs such as the IOI heads
            (``heads=[(9, 6)]``). A bare tuple of two ints without ``layers`` (``heads=(9, 6)``)
            is ambiguous and raises :class:`SVToolsError` naming both spellings. Python and numpy
            integers are accepted alike (a frame row's ``row.layer`` round-trips).
        select, threshold, exclude_first: pair selection, see :func:`select_pairs`.
        attention: ``"absolute"`` decomposes scores; ``"relative"`` decomposes relative scores
            (each term minus its mean over the query's other visible keys,
            :func:`svtools.relative_terms`); pairs whose query sees a single key are dropped.
        control: ``"rotated"`` (default) or None.
        seed: seed of the rotated control (one Haar rotation per head (and offset) of a layer;
            the draw depends on which heads are decomposed together).
        frac: N_recon fraction (paper: 1.0).
        batch_size: at most this many prompts per forward pass; fewer when prompts are long, so
            that one layer's ``(batch, head, query, key)`` tensor stays under :data:`CHUNK_BYTES`
            (32 MB). The rows do not depend on it.
        dtype: decomposition dtype (float32 default).
        baseline: None (attended pairs only), ``"non-attended"``, ``"random"`` or a list of them.
        baseline_fraction: probability with which each eligible baseline pair is sampled
            (independently per pair; SAD 2024 used a 10% sample of non-firing pairs).
        baseline_bound: non-attended pairs must have attention ``< baseline_bound`` (e.g. 0.02);
            None = every pair the selection rule leaves out.
        baseline_seed: seed of the baseline samples (:func:`baseline_pairs`): the same pairs
            whatever ``batch_size`` or the other heads measured.

    Memory and time: the model's own attention for one chunk (bounded by ``CHUNK_BYTES``), the
    per-head projections ``(batch, head, pos, r)``, and the measured pairs' terms; rotary layers
    add their per-offset factors (``2 * heads * offsets * d_head * r`` numbers, cached across
    chunks up to :data:`ROTARY_CACHE_BYTES`). Measured on a CPU with ``benchmarks/``
    (``OMP_WAIT_POLICY=PASSIVE``): MiniLM, 32 prompts x 256 tokens, peak
    memory above the model 0.23 GB in a fresh process (the HF forward with
    ``output_attentions=True`` alone: 1.6 GB), time 0.67x that forward pass (128 x 20: 0.90x);
    time grows with the number of prompts as prompts^0.90. See benchmarks/ for the figures. The
    code is device-agnostic: it runs where the model lives (the benchmarks measure the CPU).

    Returns:
        ``pandas.DataFrame`` with the columns above (integers as int64).
    """

    check_bridge(model)
    if attention not in ("absolute", "relative"):
        raise SVToolsError(f"unknown attention {attention!r}: use 'absolute' or 'relative'")
    if control not in ("rotated", None):
        raise SVToolsError(f"unknown control {control!r}: use 'rotated' or None")
    batch_size = as_int(batch_size, "batch_size", min_value=1)
    if select not in ("threshold", "acc"):
        raise SVToolsError(f"unknown pair selection {select!r}: use 'threshold' or 'acc'")
    if select == "threshold":
        threshold = as_float(threshold, "threshold", lo=0.0, hi=1.0, lo_open=True)
    frac = as_float(frac, "frac", lo=0.0, hi=1.0, lo_open=True)
    seed = as_int(seed, "seed")
    as_dtype(dtype)
    kinds = ("attended",) + check_baseline(baseline, baseline_fraction, baseline_bound)
    plan = _heads_by_layer(model, layers, heads)
    # the same input checks as decompose (supported model, eval mode, 0/1 mask, max positions),
    # the same dtype rule (half precision decomposed in float32) and the same exactness tolerance
    ids, am = prepare_tokens(model, tokens, attention_mask)
    dtype = decomposition_dtype(dtype)
    pattern_tol = resolve_check_tol(model, "auto")
    engine = PairEngine(model, plan, select=select, threshold=threshold, exclude_first=exclude_first,
                         attention=attention, control=control, seed=seed, frac=frac, dtype=dtype, kinds=kinds,
                         baseline_fraction=baseline_fraction, baseline_bound=baseline_bound,
                         baseline_seed=baseline_seed, pattern_tol=pattern_tol)
    # prompts per forward pass: at most batch_size, and few enough that one layer's
    # (batch, head, query, key) tensor stays under CHUNK_BYTES
    per_prompt = model.cfg.n_heads * ids.shape[1] ** 2 * max(torch.finfo(dtype).bits // 8, 4)
    chunk = max(1, min(batch_size, CHUNK_BYTES // per_prompt))
    starts = range(0, ids.shape[0], chunk)
    bar = tqdm(total=len(plan) * len(starts), desc="head_sparsity (chunks x layers)", disable=not progress)
    for start in starts:
        engine.run_chunk(ids[start:start + chunk], am[start:start + chunk], start, bar)
    bar.close()
    return assemble_frame(engine.frames, control)
