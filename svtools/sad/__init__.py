"""Sparse attention decomposition (SAD) at scale: every head, every selected pair, with controls and nulls.

A head attends from query ``i`` to key ``j`` because of its score ``x_i~^T Omega~ x_j~ =
sum_k sigma_k (u_k . x_i~)(v_k . x_j~)``. If the features the head reads align with its singular
vectors, a pair that the head attends strongly uses only a few terms ``k``: the term vector is
*sparse*. Sparsity alone is not evidence of alignment: a head whose singular values fall off
steeply looks sparse in its singular basis for every pair. What a measured sparsity is compared
with therefore matters:

* the **spectrum null** (:mod:`svtools.sad.null`, ``head_sparsity(control="spectrum")``, the
  default): the same head with its singular values kept and its singular vectors replaced by
  random orthonormal bases of the same subspaces, many times; :func:`null_ratio` gives each
  group's ratio real / null with intervals over prompts. It is calibrated: on inputs without
  features it reads 1 for flat, random and rank-one spectra (tested). Below 1 is the trace of
  alignment;
* the **rotated control** splits the same score over a Haar-random rotation of the singular
  basis (:meth:`svtools.decomposition.HeadDecomposition.rotated_terms`,
  ``control="rotated"``). It is kept for comparison with the earlier SAD work only: the
  rotation mixes large and small singular values, so it flattens the spectrum and calls a head
  with an uneven spectrum sparse whatever it reads, features or none;
* the **baselines** (non-attended and random pairs of the same heads, :data:`KINDS`) keep the
  basis and the spectrum; they differ from attended pairs in score, so compare them raw and at
  matched scores (:func:`compare_matched`; see :func:`head_sparsity` for what each can and
  cannot rule out).

Modules (every public name is importable from ``svtools.sad``):

* :mod:`svtools.sad.selection` — which pairs: :func:`select_pairs` (threshold or ACC rule) and
  the seeded baseline samples (:func:`baseline_pairs`, :func:`pair_uniform`);
* :mod:`svtools.sad.frame` — per-pair measures (:func:`pair_measures`) and the frame's
  :data:`COLUMNS`;
* :mod:`svtools.sad.null` — the calibrated spectrum null (definition, centring, rank matching,
  the featureless calibration);
* :mod:`svtools.sad.null_fast` — the same null computed only where the measured pairs need it
  (what :func:`head_sparsity` runs);
* :mod:`svtools.sad.engine` — the streaming engine: each layer's pairs selected and decomposed
  inside one forward pass, rotary heads at the offsets used, exactness checked on every chunk;
* :mod:`svtools.sad.measure` — :func:`head_sparsity`, the entry point, and :func:`degeneracy`
  (degenerate singular values per head);
* :mod:`svtools.sad.stats` — statistics over frames: :func:`null_ratio`, :func:`compare_matched`,
  :func:`singular_vector_usage`, :func:`usage_difference`, :func:`reuse`, :func:`bootstrap`,
  :func:`compare_kinds`.

SAD on the toy model is :mod:`svtools.toy.sad`; IOI prompts on a model (tokens with name
positions, role labels, the known IOI heads) are :mod:`svtools.ioi`; readable tables of the
summaries are :mod:`svtools.report`. Devices: everything runs where the model lives.
"""

from svtools.sad.frame import COLUMNS, pair_measures
from svtools.sad.measure import CHUNK_BYTES, CONTROLS, degeneracy, head_sparsity
from svtools.sad.selection import KINDS, baseline_pairs, pair_uniform, select_pairs
from svtools.sad.stats import (MAX_PERMUTATIONS, bootstrap, compare_kinds, compare_matched, null_ratio, reuse,
                               singular_vector_usage, usage_difference)

__all__ = ["select_pairs", "pair_measures", "head_sparsity", "singular_vector_usage", "usage_difference", "reuse",
           "bootstrap", "COLUMNS", "KINDS", "baseline_pairs", "pair_uniform", "compare_kinds", "CHUNK_BYTES",
           "CONTROLS", "null_ratio", "compare_matched", "degeneracy", "MAX_PERMUTATIONS"]
