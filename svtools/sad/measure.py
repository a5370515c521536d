"""``head_sparsity``: per-pair sparseness of the chosen heads, with the spectrum null, the baselines and the rotated control.

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

from svtools._checks import SVToolsError, as_bool, as_dtype, as_float, as_indices, as_int, is_index_sequence
from svtools.bridge import check_bridge, check_heads, check_layer, prepare_tokens
from svtools.decomposition import decomposition_dtype, layer_qk
from svtools.models import resolve_check_tol
from svtools.runtime import tqdm
from svtools.qk import DEGENERATE_TOL, degenerate_groups
from svtools.sad.engine import PairEngine
from svtools.sad.frame import assemble_frame
from svtools.sad.null import DRAWS
from svtools.sad.selection import Select, check_baseline

__all__ = ["head_sparsity", "CHUNK_BYTES", "CONTROLS", "control_names", "degeneracy"]

#: The controls :func:`head_sparsity` can compute beside the singular basis.
CONTROLS = ("spectrum", "rotated")

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
    control: Optional[str | Sequence[str]] = "spectrum",
    seed: int = 0,
    null_draws: int = DRAWS,
    null_center: bool = True,
    degenerate_tol: Optional[float] = DEGENERATE_TOL,
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
    projections ``x~ U S`` and ``y~ V`` (the spectrum null: the same projections times random
    ``r x r`` rotations; the rotated control: times ``S^-1/2 Q``); relative terms use each query's sum of key
    projections (:func:`svtools.terms.relative_pair_terms`). Rotary heads are decomposed only
    at the (head, offset) items the measured pairs use (:mod:`svtools.rotary`: one
    ``d_head x d_head`` eigendecomposition per item, from a factorisation shared by all offsets),
    and the items are kept across calls (:mod:`svtools.factor_cache`); each item's basis is
    checked to diagonalise its offset's Gram matrix. No
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
        basis, ``n_recon_null, rolls_tovee_null`` the same measures of the spectrum null (means
        over ``null_draws`` null heads; NaN without ``"spectrum"`` in ``control``),
        ``n_recon_rotated, rolls_tovee_rotated`` of the same score over a random rotation of the
        basis (NaN without ``"rotated"``), ``dominant_k`` (singular index of the largest term in
        the direction of the score; singular values are descending, so 0 = largest sigma),
        ``dominant_k_rotated``, ``dominant_sigma`` (``sigma_dominant / sigma_0``), ``r``
        (number of terms), ``used`` (tuple: the ``n_recon`` indices that reconstruct the score,
        largest first), ``query_token, key_token`` (ids), ``kind`` (``"attended"`` for the
        selected pairs, else the baseline the row belongs to).

    Rows are ordered by ``kind`` (attended first), then layer, head, prompt, query, key; the
    attended rows are the same whether or not baselines are asked for.

    Controls and nulls, and what each can and cannot rule out:
        * the **spectrum null** (``control="spectrum"``, the default; columns ``*_null``, every
          row): the same head with its singular values kept and its singular vectors replaced by
          Haar-random orthonormal bases of the spans of its own left and right singular vectors,
          ``null_draws`` times (seeded by ``seed`` per layer and head); attended and non-attended
          pairs are compared with the null head's pair of the same rank for the same query,
          random pairs with themselves; with ``null_center`` each prompt's mean projection is
          kept and only the token-specific part rotated. Definition, reasons and calibration:
          :mod:`svtools.sad.null`. Summarise with :func:`svtools.sad.null_ratio` (real / null,
          1 = no alignment beyond the spectrum). It is calibrated: on featureless inputs the
          ratio is 1 for flat, random and rank-one spectra. It cannot say *which* features align,
          nor that the head uses them (that needs interventions).
        * the **rotated control** (``control="rotated"``; columns ``*_rotated``): the same score
          split over ``U S^1/2 Q``, ``V S^1/2 Q`` with ``Q`` Haar-random, as in the earlier SAD
          work; kept for comparison only. It is **not evidence of alignment**: the rotation mixes
          large and small singular values, so it flattens the spectrum, and a head whose
          ``sigma_k`` fall off looks sparser in its own basis for *every* pair, with no features
          at all (featureless Gaussian inputs, Rolls-Tovee real / rotated: 0.89-0.93 for a
          random-initialisation spectrum, 0.13-0.18 for rank one; the spectrum null gives
          0.98-1.00 on the same inputs, :func:`svtools.sad.null.featureless_calibration`).
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

        ``baseline`` may list both. Baseline rows carry the controls too. Kinds of pairs differ
        in score; :func:`svtools.sad.compare_matched` compares them at matched scores.

    Degenerate singular values: where singular values are equal to within
    ``degenerate_tol * sigma_0`` their singular vectors, hence their individual terms, are
    fixed only up to a rotation inside the group; the group's terms are summed into its first
    index (:func:`svtools.terms.merge_degenerate`), so N_recon and Rolls-Tovee do not depend on
    the SVD routine (``degenerate_tol=None``: no merging; the rotated control is never merged).
    :func:`svtools.sad.degeneracy` reports the groups per head.

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
        control: ``"spectrum"`` (default), ``"rotated"``, a list of both, or None.
        seed: seed of the controls: the null's rotations come from one stream per
            ``(seed, layer, head)``; the rotated control's one Haar rotation per ``(seed, layer,
            head)``, and per offset for rotary heads (:func:`svtools.rotary.rotation_seed`), the
            same whatever other heads, offsets or prompts are measured.
        null_draws: null heads per head (Monte Carlo draws of the spectrum null).
        null_center: keep each prompt's mean projection in the null (True) or rotate it too.
        degenerate_tol: merge the terms of singular values closer than this fraction of the
            largest (None: do not merge).
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
    add each used (head, offset) item's ``V`` and rotation (``2 * r * r`` numbers), kept across
    calls up to :data:`svtools.factor_cache.CACHE_BYTES` (an eighth of the machine's memory). The
    spectrum null forms, for all ``null_draws`` draws at once, null scores only for the query
    rows that carry a rank-matched pair, each reduced to its first largest key as it is formed,
    and terms only for the measured pairs (:func:`svtools.sad.null_fast.rows_null`, blocks of
    :data:`svtools.sad.null_fast.ROWS_BLOCK_BYTES`); rotary heads with absolute scores bound the
    offset-dependent part of the null scores and score exactly only the keys that can rank first
    (:func:`svtools.sad.null_fast.rotary_rows_null`, one head and
    :data:`svtools.sad.engine.NULL_GRID_BYTES` at a time), and need every offset's decomposition
    up to the last measured query; rotary heads with ``attention="relative"`` still form
    per-offset ``(prompts, query, key, r)`` grids per draw (slow). Its time grows with
    ``null_draws``. Measured 2026-12-06 on two quiet CPU cores (2 torch threads,
    ``OMP_WAIT_POLICY=PASSIVE``, load 0.9-1.5), each time against the HF forward pass
    (``output_attentions=True``) timed beside it, best of 3. MiniLM, 32 prompts x 256 tokens, every
    head (``python benchmarks/head_sparsity_vs_forward.py --lengths 256 --counts --repeats 3``):
    ``control="spectrum"`` (the default, 16 draws) 0.93x the forward (2.76 s against 2.97 s), peak
    memory above the model 0.23 GB; ``control="rotated"`` 0.61x, 0.09 GB. With freed memory kept for
    reuse (``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_``, as the Makefile sets) the forward
    gains more than this code: forward 2.21 s, ``"spectrum"`` 2.59 s (1.17x, 0.11 GB), ``"rotated"``
    1.80 s (0.82x); the same call with ``control=None`` took 1.76 s, so the null costs about 0.9 s
    there. Rotary, Pythia-160M-shaped random model, peaked attention, 4 x 256 tokens, 142,005 pairs
    at 254 offsets (``python benchmarks/head_sparsity_rotary.py --control X [--null-draws N]``;
    2026-12-06, the same two cores, load 1.1-1.8, forward 1.41-1.64 s): ``control=None`` a cold call
    (empty factor cache) 4.2-4.3x, a repeated call 1.4x; ``"rotated"`` cold 4.9-5.5x, repeated
    1.5-1.75x; ``"spectrum"`` (16 draws) cold 14.5-15.4x, repeated 7.4-8.1x; with ``null_draws=4`` 8.7x and
    4.0x. On a repeated call the rotary spectrum null costs about 0.3x the forward per draw: per
    draw, head and prompt, the null scores of every key for every measured query are bounded by
    three ``(query, r) x (r, key)`` products (0.87x the forward in all at 16 draws, measured alone)
    and passes over that grid. A cold call also decomposes every offset of every head (36,864 items,
    against 28,441 for the measured pairs) and draws the null's float64 Gaussians. For a quicker look
    at a rotary model, ``control="rotated"`` or fewer ``null_draws`` (a noisier null: its columns
    are means over the draws). Earlier, on two quiet cores of a 16-core Xeon (``taskset -c 0,1``,
    ``"rotated"``): cold 5.2-7.5x, repeated 1.5-2.1x.
    The code is device-agnostic: it runs where the model lives (the benchmarks measure the CPU).

    Returns:
        ``pandas.DataFrame`` with the columns above (integers as int64).
    """

    check_bridge(model)
    if attention not in ("absolute", "relative"):
        raise SVToolsError(f"unknown attention {attention!r}: use 'absolute' or 'relative'")
    controls = control_names(control)
    null_draws = as_int(null_draws, "null_draws", min_value=1)
    if not isinstance(null_center, bool):
        raise SVToolsError(f"null_center must be True or False, got {null_center!r}")
    if degenerate_tol is not None:
        degenerate_tol = as_float(degenerate_tol, "degenerate_tol", lo=0.0)
    batch_size = as_int(batch_size, "batch_size", min_value=1)
    if select not in ("threshold", "acc"):
        raise SVToolsError(f"unknown pair selection {select!r}: use 'threshold' or 'acc'")
    if select == "threshold":
        threshold = as_float(threshold, "threshold", lo=0.0, hi=1.0, lo_open=True)
    frac = as_float(frac, "frac", lo=0.0, hi=1.0, lo_open=True)
    seed = as_int(seed, "seed")
    exclude_first = as_bool(exclude_first, "exclude_first")
    baseline_seed = as_int(baseline_seed, "baseline_seed")
    as_dtype(dtype)
    kinds, baseline_fraction, baseline_bound = check_baseline(baseline, baseline_fraction, baseline_bound)
    kinds = ("attended",) + kinds
    plan = _heads_by_layer(model, layers, heads)
    # the same input checks as decompose (supported model, eval mode, 0/1 mask, max positions),
    # the same dtype rule (half precision decomposed in float32) and the same exactness tolerance
    ids, am = prepare_tokens(model, tokens, attention_mask)
    dtype = decomposition_dtype(dtype)
    pattern_tol = resolve_check_tol(model, "auto")
    engine = PairEngine(model, plan, select=select, threshold=threshold, exclude_first=exclude_first,
                         attention=attention, controls=controls, seed=seed, frac=frac, dtype=dtype, kinds=kinds,
                         baseline_fraction=baseline_fraction, baseline_bound=baseline_bound,
                         baseline_seed=baseline_seed, pattern_tol=pattern_tol, null_draws=null_draws,
                         null_center=null_center, degenerate_tol=degenerate_tol)
    # prompts per forward pass: at most batch_size, and few enough that one layer's
    # (batch, head, query, key) tensor stays under CHUNK_BYTES
    per_prompt = model.cfg.n_heads * ids.shape[1] ** 2 * max(torch.finfo(dtype).bits // 8, 4)
    chunk = max(1, min(batch_size, CHUNK_BYTES // per_prompt))
    starts = range(0, ids.shape[0], chunk)
    bar = tqdm(total=len(plan) * len(starts), desc="head_sparsity (chunks x layers)", disable=not progress)
    for start in starts:
        engine.run_chunk(ids[start:start + chunk], am[start:start + chunk], start, bar)
    bar.close()
    return assemble_frame(engine.frames, controls)


def control_names(control: Any) -> tuple[str, ...]:
    """``control`` of :func:`head_sparsity` as a tuple of known names."""
    if control is None:
        return ()
    items = (control,) if isinstance(control, str) else tuple(control) if isinstance(control, (list, tuple)) else None
    if items is None or any(c not in CONTROLS for c in items):
        raise SVToolsError(f"unknown control {control!r}: use 'spectrum', 'rotated', a list of them, or None")
    return tuple(dict.fromkeys(items))


def degeneracy(model: Any, *, layers: int | Sequence[int] | None = None,
               heads: int | Sequence[int] | Sequence[tuple[int, int]] | None = None,
               tol: float = DEGENERATE_TOL, n_pos: int = 32) -> pd.DataFrame:
    """(Near-)degenerate singular values of each head: the groups :func:`head_sparsity` merges.

    For each chosen head (``layers``/``heads`` as in :func:`head_sparsity`; rotary heads at every
    offset ``0..n_pos-1``): ``min_gap``, the smallest gap between consecutive non-zero singular
    values as a fraction of the largest (``(S[k-1] - S[k]) / S[0]``); ``groups``, the number of
    groups of two or more values closer than ``tol * S[0]``
    (:func:`svtools.qk.degenerate_groups`; groups of exact zeros are left out: their terms are 0
    in any basis); ``largest_group``; ``offsets`` (rotary: at how many offsets a group occurs).

    Returns one row per head: ``layer, head, r, min_gap, groups, largest_group, offsets``.
    """
    check_bridge(model)
    tol = as_float(tol, "tol", lo=0.0)
    rows = []
    for layer, hs in _heads_by_layer(model, layers, heads).items():
        qk = layer_qk(model, layer, hs, n_pos=as_int(n_pos, "n_pos", min_value=1), dtype=torch.float64)
        S = qk.S if qk.rotary is not None else qk.S[:, None, :]  # (head, offset, r)
        first = degenerate_groups(S, tol)
        k = torch.arange(S.shape[-1])
        nonzero = S > tol * S[..., :1]
        size = torch.zeros(S.shape, dtype=torch.int64).scatter_add_(-1, first, nonzero.to(torch.int64))
        multi = (size >= 2) & (first == k)  # first index of each group of >= 2 non-zero values
        gaps = (S[..., :-1] - S[..., 1:]) / S[..., :1].clamp_min(torch.finfo(S.dtype).tiny)
        gaps = torch.where(nonzero[..., 1:], gaps, torch.full_like(gaps, float("inf")))
        for i, h in enumerate(hs):
            rows.append({"layer": layer, "head": h, "r": S.shape[-1], "min_gap": float(gaps[i].min()),
                         "groups": int(multi[i].sum()), "largest_group": int(size[i].max()),
                         "offsets": int(multi[i].any(-1).sum())})
    return pd.DataFrame(rows, columns=["layer", "head", "r", "min_gap", "groups", "largest_group", "offsets"])
