"""One row per measured pair: the measures of a pair's terms and the columns of a SAD frame.

:func:`pair_measures` turns each pair's per-singular-vector terms into N_recon, Rolls-Tovee
sparseness, the dominant index and the N_recon set; :func:`pair_rows` and
:func:`assemble_frame` make the typed, ordered frame with the :data:`COLUMNS` that
:func:`svtools.sad.head_sparsity` returns; :func:`svtools._checks.check_columns` is the check
every function that reads such a frame starts with.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from svtools.sad.selection import KINDS
from svtools.sparsity import term_measures

__all__ = ["COLUMNS", "pair_measures"]

#: Columns every :func:`head_sparsity` frame has (acceptance checks read these names).
COLUMNS = ("layer", "head", "prompt", "query", "key", "attention", "score", "n_recon", "rolls_tovee",
           "n_recon_null", "rolls_tovee_null", "n_recon_rotated", "rolls_tovee_rotated", "dominant_k",
           "dominant_k_rotated", "dominant_sigma", "r", "used", "query_token", "key_token", "kind")


#: dtype of each :data:`COLUMNS` entry in a :func:`head_sparsity` frame (also when it is empty)
_COLUMN_DTYPES = {"layer": np.int64, "head": np.int64, "prompt": np.int64, "query": np.int64, "key": np.int64,
                  "attention": np.float32, "score": np.float64, "n_recon": np.int64, "rolls_tovee": np.float64,
                  "n_recon_null": np.float64, "rolls_tovee_null": np.float64,
                  "n_recon_rotated": np.int64, "rolls_tovee_rotated": np.float64, "dominant_k": np.int64,
                  "dominant_k_rotated": np.int64, "dominant_sigma": np.float64, "r": np.int64, "used": object,
                  "query_token": np.int64, "key_token": np.int64, "kind": str}


def _empty_frame(controls: Sequence[str] = ("spectrum",)) -> pd.DataFrame:
    """A frame with no rows and the same columns and dtypes as a non-empty one."""
    dt = dict(_COLUMN_DTYPES)
    if "rotated" not in controls:  # no rotated control: its columns are NaN, hence float
        dt.update(n_recon_rotated=np.float64, dominant_k_rotated=np.float64)
    return pd.DataFrame({c: pd.Series(dtype=dt[c]) for c in COLUMNS})


def pair_measures(terms: Float[Tensor, "pair r"], frac: float = 1.0, *, order: bool = True) -> dict[str, Tensor]:
    """N_recon, Rolls-Tovee sparseness, dominant index and the N_recon set of each pair's terms.

    Returns a dict of ``(pair,)`` tensors ``n_recon``, ``rolls_tovee``, ``dominant_k`` (index of
    the largest term in the direction of the total: ``argmax_k sign(T) t_k``, the first on ties),
    ``score`` (``T = sum_k t_k``) and, with ``order``, ``order`` ``(pair, r)``: indices sorted by
    ``sign(T) t_k`` descending (stable), so ``order[p, :n_recon[p]]`` are the terms that
    reconstruct the score (``order=False`` skips that sort). One sort serves both N_recon and
    the order (:func:`svtools.sparsity.term_measures`); the values equal :func:`svtools.n_recon`
    and :func:`svtools.rolls_tovee` of each row.
    """
    return term_measures(terms, frac, order=order)


def used_tuples(order: np.ndarray, n: np.ndarray) -> list[tuple[int, ...]]:
    """The ``used`` column: each pair's first ``n[p]`` indices of ``order[p]`` (its N_recon set) as a tuple."""
    flat = tuple(order[np.arange(order.shape[1])[None, :] < n[:, None]].tolist())  # the used prefixes only
    ends = np.cumsum(n).tolist()
    return [flat[e - m:e] for e, m in zip(ends, n.tolist())]  # slices of a tuple are tuples


def pair_rows(layer: int, heads: Sequence[int], idx: Int[Tensor, "pair 4"], t: Float[Tensor, "pair r"],
               rot: Optional[Float[Tensor, "pair r"]], attn: Float[Tensor, "pair"], sigma: Float[Tensor, "pair r"],
               tokens: Int[Tensor, "batch pos"], start: int, kind: str, frac: float,
               null: Optional[dict[str, Tensor]] = None) -> Optional[dict[str, Any]]:
    """The :data:`COLUMNS` of the pairs ``idx`` = (batch row, head slot, query, key) of one chunk.

    ``t``, ``rot``: each pair's terms in the singular basis and in the rotated control; ``sigma``:
    the singular values they use; ``null``: the spectrum null's per-pair ``rolls_tovee`` and
    ``n_recon`` (:func:`svtools.sad.null.spectrum_null`), or None. Pairs with NaN terms (no
    relative score) are dropped.
    """
    keep = ~torch.isnan(t).any(-1)
    if not bool(keep.all()):
        t, idx, attn, sigma = t[keep], idx[keep], attn[keep], sigma[keep]
        rot = None if rot is None else rot[keep]
        null = None if null is None else {k: v[keep] for k, v in null.items()}
    if not len(t):
        return None
    b, hi, qi, ki = idx.unbind(-1)
    head_t = torch.tensor(list(heads))
    m = pair_measures(t, frac)
    dom = m["dominant_k"]
    cols: dict[str, Any] = {
        "layer": np.full(len(t), layer, dtype=np.int64),
        "head": head_t[hi.cpu()].numpy().astype(np.int64),
        "prompt": (b + start).cpu().numpy().astype(np.int64),
        "query": qi.cpu().numpy().astype(np.int64), "key": ki.cpu().numpy().astype(np.int64),
        "attention": attn.float().cpu().numpy(),
        "score": m["score"].double().cpu().numpy(), "n_recon": m["n_recon"].cpu().numpy(),
        "rolls_tovee": m["rolls_tovee"].double().cpu().numpy(),
        "dominant_k": dom.cpu().numpy(),
        "dominant_sigma": (sigma.gather(-1, dom[:, None])[:, 0] / sigma[:, 0]).double().cpu().numpy(),
        "r": np.full(len(t), t.shape[-1], dtype=np.int64),
        "used": used_tuples(m["order"].cpu().numpy(), m["n_recon"].cpu().numpy()),
        "query_token": tokens[b, qi].cpu().numpy(), "key_token": tokens[b, ki].cpu().numpy(),
        "kind": np.full(len(t), kind, dtype=object)}
    if null is not None:
        cols.update(n_recon_null=null["n_recon"].double().cpu().numpy(),
                    rolls_tovee_null=null["rolls_tovee"].double().cpu().numpy())
    else:
        cols.update(n_recon_null=np.full(len(t), np.nan), rolls_tovee_null=np.full(len(t), np.nan))
    if rot is not None:
        mr = pair_measures(rot, frac, order=False)
        cols.update(n_recon_rotated=mr["n_recon"].cpu().numpy().astype(np.float64),
                    rolls_tovee_rotated=mr["rolls_tovee"].double().cpu().numpy(),
                    dominant_k_rotated=mr["dominant_k"].cpu().numpy().astype(np.float64))
    else:
        nan = np.full(len(t), np.nan)
        cols.update(n_recon_rotated=nan, rolls_tovee_rotated=nan, dominant_k_rotated=nan)
    return cols


def assemble_frame(frames: list[dict[str, Any]], controls: Sequence[str]) -> pd.DataFrame:
    """One frame from the per-chunk columns, typed and ordered (kind, layer, head, prompt, query, key)."""
    if not frames:
        return _empty_frame(controls)
    df = pd.concat([pd.DataFrame(c) for c in frames], ignore_index=True)
    if "rotated" in controls:
        df["n_recon_rotated"] = df["n_recon_rotated"].astype(np.int64)
        df["dominant_k_rotated"] = df["dominant_k_rotated"].astype(np.int64)
    df["_kind"] = df["kind"].map({k: i for i, k in enumerate(KINDS)})
    df = df.sort_values(["_kind", "layer", "head", "prompt", "query", "key"], kind="stable")
    return df[list(COLUMNS)].reset_index(drop=True)
