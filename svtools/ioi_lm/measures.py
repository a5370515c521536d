"""Measurements of IOI language models: heads found by role, and results over checkpoints and seeds.

:func:`role_attention` (every head's mean attention between the IOI roles, on any model with a
tokenizer), :func:`top_heads` (the heads with the largest attention for a role pair, e.g. name
movers END -> IO), :func:`over_checkpoints` (role attention and SAD of one run at several
checkpoints) and :func:`over_seeds` (a mean over seeds with a t interval).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import pandas as pd
import torch
from torch import Tensor

from svtools._checks import SVToolsError, as_float, as_int, as_names, check_columns, check_numeric_columns
from svtools.bridge import check_bridge
from svtools.data.ioi import IOIDataset
from svtools.decomposition import cache_attention_inputs
from svtools.ioi import ioi_tokens, label_ioi_roles
from svtools.ioi_lm.training import IOILMRun
from svtools.runtime import tqdm
from svtools.sad.measure import head_sparsity

__all__ = ["ROLE_PAIRS", "role_attention", "top_heads", "over_checkpoints", "over_seeds"]

#: (query role, key role) pairs whose attention :func:`role_attention` measures.
ROLE_PAIRS: tuple[tuple[str, str], ...] = (("END", "IO"), ("END", "S1"), ("END", "S2"), ("S2", "S1"),
                                           ("S2", "IO"))


def role_attention(model: Any, dataset: IOIDataset, *, batch_size: int = 64) -> pd.DataFrame:
    """Mean attention of every head between the IOI roles, over the prompts of ``dataset``.

    For each (layer, head) and each (query role, key role) of :data:`ROLE_PAIRS`: the mean over
    prompts of ``pattern[prompt, head, pos[query role], pos[key role]]``, with a 95% interval
    over prompts (normal approximation). Heads "that move the IO name" are those with a large
    END -> IO weight (name movers, Wang et al. 2022); ``S2 -> S1`` marks duplicate-token heads.
    Works on any model :func:`svtools.load_model` gives (with a tokenizer).

    Returns a long frame: ``layer, head, query_role, key_role, mean, lo, hi, prompts``.
    """
    check_bridge(model)
    batch_size = as_int(batch_size, "batch_size", min_value=1)
    ids, am, pos = ioi_tokens(model, dataset)
    dev = next(model.original_model.parameters()).device if hasattr(model, "original_model") else ids.device
    layers = list(range(model.cfg.n_layers))
    sums: dict[tuple[str, str], list[Tensor]] = {rp: [] for rp in ROLE_PAIRS}
    roles = {"IO": pos.io, "S1": pos.s1, "S2": pos.s2, "END": pos.end}
    for start in range(0, len(ids), batch_size):
        sl = slice(start, start + batch_size)
        cached = cache_attention_inputs(model, ids[sl].to(dev), am[sl].to(dev), layers)
        pat = torch.stack([cached[f"blocks.{l}.attn.hook_pattern"] for l in layers], 1).float().cpu()
        r = torch.arange(pat.shape[0])
        for q, k in ROLE_PAIRS:
            qi, ki = roles[q][sl].cpu(), roles[k][sl].cpu()
            sums[(q, k)].append(pat[r, :, :, qi, ki])  # (batch, layer, head)
    rows = []
    for (q, k), chunks in sums.items():
        a = torch.cat(chunks).double()  # (prompts, layer, head)
        m, sd = a.mean(0), a.std(0) if len(a) > 1 else torch.zeros_like(a[0])
        half = 1.96 * sd / math.sqrt(len(a))
        for layer in layers:
            for h in range(a.shape[2]):
                rows.append({"layer": layer, "head": h, "query_role": q, "key_role": k,
                             "mean": float(m[layer, h]), "lo": float(m[layer, h] - half[layer, h]),
                             "hi": float(m[layer, h] + half[layer, h]), "prompts": len(a)})
    return pd.DataFrame(rows)


def top_heads(roles: pd.DataFrame, *, query_role: str = "END", key_role: str = "IO", k: int = 1,
              by: Sequence[str] = ()) -> pd.DataFrame:
    """The ``k`` heads with the largest mean ``query_role -> key_role`` attention in a
    :func:`role_attention` frame (per group of ``by``, e.g. ``("seed",)``): the heads found *by
    their role*, e.g. the heads that move the IO name to END (name movers)."""
    by = as_names(by, "by")
    k = as_int(k, "k", min_value=1)
    check_columns(roles, ["layer", "head", "query_role", "key_role", "mean", *by], "top_heads (a role_attention frame)")
    sel = roles[(roles["query_role"] == query_role) & (roles["key_role"] == key_role)]
    if sel.empty:
        raise SVToolsError(f"no rows for {query_role} -> {key_role}; roles measured: {ROLE_PAIRS}")
    if by:
        return sel.sort_values("mean", ascending=False).groupby(list(by), sort=True).head(k) \
            .sort_values([*by, "mean"], ascending=[True] * len(by) + [False]).reset_index(drop=True)
    return sel.nlargest(k, "mean").reset_index(drop=True)


def over_checkpoints(run: IOILMRun, steps: Sequence[int], dataset: IOIDataset, *, heads: Any = None,
                     sad_kwargs: Optional[dict] = None, progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Role attention and SAD of one run at several checkpoints, on one set of prompts.

    For each step: :func:`role_attention` of every head, and, unless ``sad_kwargs`` is None,
    :func:`svtools.sad.head_sparsity` of ``heads`` (``(layer, head)`` pairs; None = all) on the
    same prompts with ``sad_kwargs`` (e.g. ``baseline=["non-attended", "random"]``), its rows
    labelled by IOI role (:func:`svtools.ioi.label_ioi_roles`). Both frames get ``seed`` and
    ``step`` columns. Returns ``(roles, pairs)`` (``pairs`` empty when ``sad_kwargs`` is None).
    """

    if not isinstance(run, IOILMRun):
        raise SVToolsError(f"run must be an IOILMRun (from ioi_lm.train), got {type(run).__name__}")
    steps = [run._check_step(s) for s in (steps if isinstance(steps, (list, tuple, range)) else [steps])]
    if not steps:
        raise SVToolsError(f"steps is empty: give checkpoint steps of the run ({run.checkpoints})")
    frames_r, frames_p = [], []
    for step in tqdm(steps, desc=f"ioi_lm seed {run.seed} checkpoints", disable=not progress):
        model = run.load(step)
        ra = role_attention(model, dataset)
        frames_r.append(ra.assign(seed=run.seed, step=int(step)))
        if sad_kwargs is not None:
            ids, am, pos = ioi_tokens(model, dataset)
            df = head_sparsity(model, ids, attention_mask=am, heads=heads, progress=False, **sad_kwargs)
            frames_p.append(label_ioi_roles(df, pos).assign(seed=run.seed, step=int(step)))
        del model
    pairs = pd.concat(frames_p, ignore_index=True) if frames_p else pd.DataFrame()
    return pd.concat(frames_r, ignore_index=True), pairs


def over_seeds(frame: pd.DataFrame, value: str, *, by: Sequence[str], seed: str = "seed",
               ci: float = 0.95) -> pd.DataFrame:
    """Mean of ``value`` over seeds per group of ``by``, with a t interval over seeds.

    ``frame`` holds one row per (seed, group), e.g. per-seed estimates. Returns ``by...``,
    ``mean``, ``lo``, ``hi`` (``mean -+ t_{(1+ci)/2, n-1} sd / sqrt(n)``; equal to the mean with
    one seed), ``seed_min``, ``seed_max``, ``seeds``.
    """
    from scipy import stats

    by = as_names(by, "by")
    ci = as_float(ci, "ci", lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    for arg, name in (("seed", seed), ("value", value)):
        if not isinstance(name, str):
            raise SVToolsError(f"{arg} must be a column name, got {name!r}")
    check_columns(frame, [*by, seed, value], "over_seeds")
    check_numeric_columns(frame, [value], "over_seeds")
    dup = frame.duplicated(subset=[*by, seed], keep=False)
    if dup.any():
        first = frame.loc[dup, [*by, seed]].iloc[0].to_dict()
        raise SVToolsError(f"over_seeds needs one row per ({', '.join([seed, *by])}); {int(dup.sum())} rows repeat "
                           f"a seed within a group (e.g. {first}): average them per seed first")
    rows = []
    kept = frame.dropna(subset=[value])
    for key, g in (kept.groupby(by, sort=True) if by else [((), kept)]):
        key = key if isinstance(key, tuple) else (key,)
        v = g[value].to_numpy(dtype=float)
        m = float(v.mean())
        half = float(stats.t.ppf((1 + ci) / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0
        rows.append(dict(zip(by, key)) | {"mean": m, "lo": m - half, "hi": m + half, "seed_min": float(v.min()),
                                           "seed_max": float(v.max()), "seeds": int(g[seed].nunique())})
    return pd.DataFrame(rows)
