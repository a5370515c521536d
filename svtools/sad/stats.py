"""Statistics over SAD frames: which singular vectors pairs use, and summaries with intervals.

* :func:`singular_vector_usage`, :func:`reuse` — which singular vectors a head's pairs use, and
  how concentrated that use is across prompts.
* :func:`usage_difference` — whether two kinds of pairs (attended, non-attended, random) use
  different singular vectors, against a permutation null.
* :func:`bootstrap` — summaries with confidence intervals from resampling whole prompts;
  :func:`compare_kinds` — two kinds compared group by group on such a summary.
* :func:`null_ratio` — the calibrated ratio real / spectrum null (:mod:`svtools.sad.null`) per
  group, with intervals over prompts.
* :func:`compare_matched` — two kinds of pairs compared raw and at matched scores, with intervals.
"""

from __future__ import annotations

import re
from typing import Literal, Optional, Sequence

import numpy as np
import pandas as pd
from scipy import sparse

from svtools._checks import (SVToolsError, as_choice, as_float, as_int, as_names, as_seed, check_columns,
                             check_memory, check_numeric_columns)

__all__ = ["singular_vector_usage", "usage_difference", "reuse", "bootstrap", "compare_kinds", "null_ratio",
           "compare_matched", "MAX_PERMUTATIONS"]

#: Most permutations :func:`usage_difference` draws (its p-values then resolve 1e-7; more only costs time).
MAX_PERMUTATIONS = 10**7


# ----------------------------------------------------------------------------- usage across prompts

def _used_tuples_of(df: pd.DataFrame, what: str) -> pd.DataFrame:
    """``df`` with its ``used`` column as tuples of ints. A frame read back from a CSV file holds
    their text (``"(3, 0)"``, ``"(5,)"``, ``"()"``): parsed back; anything else is an error."""
    col = df["used"]
    if all(isinstance(u, (tuple, list)) for u in col):
        return df
    out = []
    for u in col:
        if isinstance(u, (tuple, list)):
            out.append(tuple(int(k) for k in u))
            continue
        text = u.strip() if isinstance(u, str) else None
        if text is None or not re.fullmatch(r"[(\[]\s*(\d+\s*(,\s*\d+\s*)*,?\s*)?[)\]]", text):
            raise SVToolsError(f"{what}: column 'used' must hold tuples of singular indices (as head_sparsity "
                               f"writes them, or their text read back from a CSV file), got {u!r}")
        out.append(tuple(int(k) for k in re.findall(r"\d+", text)))
    return df.assign(used=out)


def singular_vector_usage(df: pd.DataFrame, *, by: Sequence[str] = ("layer", "head")) -> pd.DataFrame:
    """How often each singular index ``k`` is among the terms a head's pairs need.

    For each group (default: each head) and each ``k`` used at least once: ``n_pairs`` (pairs
    whose N_recon set, column ``used``, contains ``k``), ``frac_pairs = n_pairs / pairs of the
    group``, ``n_prompts`` (distinct prompts with such a pair), ``frac_prompts``,
    ``frac_dominant`` (fraction of the group's pairs whose dominant term is ``k``), ``mass``
    (the usage distribution of :func:`usage_difference`: each pair spreads 1 evenly over its
    N_recon set; sums to 1 over ``k``). A head that reuses the same singular vectors across
    prompts has a few ``k`` with ``frac_prompts`` near 1. With baselines, group by
    ``("layer", "head", "kind")`` to compare attended and non-attended pairs.
    """
    by = as_names(by, "by")
    check_columns(df, by + ["prompt", "used", "dominant_k"], "singular_vector_usage")
    df = _used_tuples_of(df, "singular_vector_usage")
    if df.empty:
        return pd.DataFrame(columns=by + ["k", "n_pairs", "frac_pairs", "n_prompts", "frac_prompts",
                                          "frac_dominant", "mass"])
    ex = df[by + ["prompt", "used"]].assign(w=1.0 / df["used"].map(len).clip(lower=1).to_numpy()) \
        .explode("used").dropna(subset=["used"]).rename(columns={"used": "k"})
    ex["k"] = ex["k"].astype(np.int64)
    g = ex.groupby(by + ["k"])
    out = pd.DataFrame({"n_pairs": g.size(), "n_prompts": g["prompt"].nunique()})
    sizes = df.groupby(by).agg(pairs=("prompt", "size"), prompts=("prompt", "nunique"))
    out = out.reset_index().merge(sizes.reset_index(), on=by)
    dom = df.groupby(by + ["dominant_k"]).size().rename("n_dom").reset_index().rename(columns={"dominant_k": "k"})
    out = out.merge(dom, on=by + ["k"], how="left").fillna({"n_dom": 0})
    out["frac_pairs"] = out["n_pairs"] / out["pairs"]
    out["frac_prompts"] = out["n_prompts"] / out["prompts"]
    out["frac_dominant"] = out["n_dom"] / out["pairs"]
    # usage mass: each pair spreads 1 evenly over its N_recon set (the distribution compared by
    # usage_difference); sums to 1 over k within a group (less when some scores are exactly zero)
    mass = ex.groupby(by + ["k"])["w"].sum().rename("mass").reset_index()
    out = out.merge(mass, on=by + ["k"], how="left")
    out["mass"] = out["mass"] / out["pairs"]
    return out[by + ["k", "n_pairs", "frac_pairs", "n_prompts", "frac_prompts", "frac_dominant", "mass"]] \
        .sort_values(by + ["k"]).reset_index(drop=True)


def _usage_weights(g: pd.DataFrame, r: int, on: str) -> np.ndarray:
    """``(pairs, r)`` usage of each pair: its N_recon set with mass 1/N_recon each (``on="used"``),
    or a one-hot at its dominant index (``on="dominant"``); rows sum to 1 (0 for a zero score)."""
    W = np.zeros((len(g), r), dtype=np.float64)
    if on == "dominant":
        W[np.arange(len(g)), g["dominant_k"].to_numpy(dtype=np.int64)] = 1.0
        return W
    used = g["used"].tolist()
    lens = np.fromiter((len(u) for u in used), dtype=np.int64, count=len(used))
    if lens.sum():
        rows = np.repeat(np.arange(len(used)), lens)
        cols = np.fromiter((k for u in used for k in u), dtype=np.int64, count=int(lens.sum()))
        W[rows, cols] = 1.0 / lens[rows]
    return W


def _distance(P: np.ndarray, Q: np.ndarray, measure: str) -> np.ndarray:
    """Total-variation or Jensen-Shannon distance (base 2, in [0, 1]) between rows of P and Q."""
    if measure == "tv":
        return 0.5 * np.abs(P - Q).sum(-1)
    M = 0.5 * (P + Q)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = lambda A: np.where(A > 0, A * np.log2(np.where(A > 0, A, 1.0) / np.where(M > 0, M, 1.0)), 0.0)  # noqa: E731
        js = 0.5 * kl(P).sum(-1) + 0.5 * kl(Q).sum(-1)
    return np.sqrt(np.clip(js, 0.0, 1.0))


def usage_difference(
    df: pd.DataFrame,
    *,
    by: Sequence[str] = ("layer", "head"),
    kinds: tuple[str, str] = ("attended", "non-attended"),
    on: Literal["used", "dominant"] = "used",
    measure: Literal["js", "tv"] = "js",
    n_perm: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """Do two kinds of pairs of a head use *different* singular vectors? Distance and permutation null.

    For each group (default: each head) and each kind, the *usage distribution* over singular
    indices ``k``: ``P(k) = mean over the kind's pairs of w_pair(k)``, where a pair spreads a mass
    of 1 evenly over its N_recon set (column ``used``; ``on="used"``) or puts it on its dominant
    index (``on="dominant"``). So ``P(k)`` is the chance that a term drawn from the set of a
    random pair of that kind is ``k``; pairs with a zero score (empty set) are left out.

    ``distance``: Jensen-Shannon distance (``measure="js"``: square root of the base-2
    JS divergence, in [0, 1]) or total variation (``"tv"``: ``1/2 sum_k |P_a(k) - P_b(k)|``, in
    [0, 1]) between the two kinds. What "different" means: the same distance after shuffling
    the kind labels among the group's pairs (``n_perm`` permutations, group sizes kept; seeded).
    Finite samples make the distance positive even when both kinds use the same vectors; the
    null says how large it gets by chance. ``p_value = (1 + #{null >= distance}) / (1 + n_perm)``.
    Pairs of one prompt are not independent, so treat the p-value as a screen, not a test of a
    hypothesis about prompts.

    Rotary heads: index ``k`` is the ``k``-th singular vector *at the pair's offset*, a different
    vector at each offset; compare usage within an offset range, or read it as "which rank".

    Args:
        df: a :func:`head_sparsity` frame with baseline rows (column ``kind``).
        by: grouping columns.
        kinds: the two kinds to compare (values of the ``kind`` column).
        on, measure, n_perm, seed: as above (``n_perm`` at most :data:`MAX_PERMUTATIONS`).

    Returns:
        One row per group with both kinds present: ``by...``, ``kind_a, kind_b, pairs_a,
        pairs_b, distance, null_mean, null_q95, p_value, top_k_a, top_k_b`` (the index with
        the largest usage mass in each kind), ``measure``, ``on``.
    """
    by = as_names(by, "by")
    check_columns(df, by + ["kind", "used", "dominant_k"], "usage_difference")
    on = as_choice(on, "on", ("used", "dominant"))
    measure = as_choice(measure, "measure", ("js", "tv"))
    n_perm = as_int(n_perm, "n_perm", min_value=1, max_value=MAX_PERMUTATIONS)
    seed = as_seed(seed, "seed")
    kinds = tuple(as_names(kinds, "kinds"))
    if len(kinds) != 2 or kinds[0] == kinds[1]:
        raise SVToolsError(f"kinds must name two different kinds, got {kinds!r}")
    df = _used_tuples_of(df, "usage_difference")
    present = set(df["kind"].unique())
    missing = [k for k in kinds if k not in present]
    if missing:
        raise SVToolsError(f"the frame has no rows of kind {missing}: run head_sparsity with "
                           f"baseline= (it has {sorted(present)})")
    rng = np.random.default_rng(seed)
    sub = df[df["kind"].isin(kinds)]
    if on == "used":
        sub = sub[sub["used"].map(len) > 0]
    rows = []
    for key, g in (sub.groupby(by, sort=True) if by else [((), sub)]):
        key = key if isinstance(key, tuple) else (key,)
        is_a = (g["kind"] == kinds[0]).to_numpy()
        n_a, n = int(is_a.sum()), len(g)
        if n_a == 0 or n_a == n:
            continue
        r = int(g["r"].max()) if "r" in g.columns else 1 + max(max(u) for u in g["used"] if len(u))
        W = _usage_weights(g, r, on)
        total = W.sum(0)
        Pa, Pb = W[is_a].mean(0), W[~is_a].mean(0)
        dist = float(_distance(Pa[None], Pb[None], measure)[0])
        null = []
        chunk = max(1, min(n_perm, 2_000_000 // max(n, 1)))
        for s in range(0, n_perm, chunk):
            m = min(chunk, n_perm - s)
            u = rng.random((m, n))
            cut = np.partition(u, n_a - 1, axis=1)[:, n_a - 1:n_a]
            L = (u <= cut).astype(np.float64)  # (m, n): n_a ones per row
            Sa = L @ W
            null.append(_distance(Sa / n_a, (total - Sa) / (n - n_a), measure))
        null = np.concatenate(null)
        rows.append(dict(zip(by, key)) | {
            "kind_a": kinds[0], "kind_b": kinds[1], "pairs_a": n_a, "pairs_b": n - n_a, "distance": dist,
            "null_mean": float(null.mean()), "null_q95": float(np.quantile(null, 0.95)),
            "p_value": float((1 + (null >= dist - 1e-12).sum()) / (1 + n_perm)),
            "top_k_a": int(np.argmax(Pa)), "top_k_b": int(np.argmax(Pb)), "measure": measure, "on": on})
    cols = by + ["kind_a", "kind_b", "pairs_a", "pairs_b", "distance", "null_mean", "null_q95", "p_value",
                 "top_k_a", "top_k_b", "measure", "on"]
    return pd.DataFrame(rows, columns=cols)


def reuse(df: pd.DataFrame, *, by: Sequence[str] = ("layer", "head")) -> pd.DataFrame:
    """Concentration of each head's dominant term across its pairs, in both bases.

    ``top_share``: fraction of the group's pairs whose dominant term is the group's most common
    dominant index (1 = every prompt uses the same singular vector); ``top_share_rotated``: the
    same in the rotated basis (a fixed random basis per head; NaN when the frame was made without
    ``control="rotated"``); ``top_k``: that most common singular index; ``pairs``, ``prompts``.
    """
    by = as_names(by, "by")
    check_columns(df, by + ["prompt", "dominant_k", "dominant_k_rotated"], "reuse")

    def share(s: pd.Series) -> float:
        s = s.dropna()
        return float(s.value_counts().iloc[0] / len(s)) if len(s) else float("nan")

    g = df.groupby(by)
    out = pd.DataFrame({
        "pairs": g.size(), "prompts": g["prompt"].nunique(),
        "top_k": g["dominant_k"].agg(lambda s: int(s.value_counts().index[0])),
        "top_share": g["dominant_k"].agg(share), "top_share_rotated": g["dominant_k_rotated"].agg(share)})
    return out.reset_index()


# ----------------------------------------------------------------------------- bootstrap

def _weighted_median(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Lower weighted median of ``values (n,)`` under each row of ``weights (B, n)``."""
    order = np.argsort(values, kind="stable")
    v, w = values[order], weights[:, order]
    c = np.cumsum(w, axis=1)
    half = c[:, -1:] / 2.0
    idx = (c < half).sum(axis=1)
    return v[np.minimum(idx, len(v) - 1)]


def bootstrap(
    df: pd.DataFrame,
    columns: str | Sequence[str] = ("rolls_tovee", "rolls_tovee_rotated", "n_recon", "n_recon_rotated"),
    *,
    by: Sequence[str] = ("layer",),
    stat: Literal["mean", "median"] = "mean",
    unit: str = "prompt",
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """``stat`` of each column per group, with a percentile bootstrap CI over prompts.

    Pairs from one prompt are not independent, so the resampling unit is the prompt (column
    ``unit``): each replicate draws the prompts with replacement and pools all their pairs (a
    prompt drawn twice counts twice). Vectorised: prompt multiplicities become row weights.

    Returns a long DataFrame: ``by...``, ``column``, ``estimate`` (on the data), ``lo``, ``hi``
    (the ``(1 - ci)/2`` and ``(1 + ci)/2`` quantiles of the replicates), ``pairs``, ``prompts``.
    """
    columns = as_names(columns, "columns", allow_empty=False)
    by = as_names(by, "by")
    if not isinstance(unit, str):
        raise SVToolsError(f"unit must be a column name, got {unit!r}")
    check_columns(df, by + columns + [unit], "bootstrap")
    check_numeric_columns(df, columns, "bootstrap")
    stat = as_choice(stat, "stat", ("mean", "median"))
    ci = as_float(ci, "ci", lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    n_boot = as_int(n_boot, "n_boot", min_value=1)
    # the replicates' prompt counts and row weights of a group, (n_boot, prompts) and (n_boot, rows)
    check_memory(8.0 * n_boot * (len(df) + df[unit].nunique()), "n_boot",
                 what=f"{n_boot} bootstrap replicates of {len(df)} rows")
    seed = as_seed(seed, "seed")
    if df.empty:
        raise SVToolsError("bootstrap: the frame has no rows (no pairs were selected?): nothing to summarise")
    rng = np.random.default_rng(seed)
    rows = []
    groups = df.groupby(by, sort=True) if by else [((), df)]
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        units, inv = np.unique(g[unit].to_numpy(), return_inverse=True)
        counts = rng.multinomial(len(units), np.full(len(units), 1.0 / len(units)), size=n_boot)  # (B, U)
        w = counts[:, inv].astype(np.float64)  # (B, rows)
        for col in columns:
            v = g[col].to_numpy(dtype=np.float64)
            ok = ~np.isnan(v)
            if not ok.any():
                est, lo, hi = np.nan, np.nan, np.nan
            else:
                vv, ww = v[ok], w[:, ok]
                if stat == "mean":
                    tot = ww.sum(1)
                    reps = np.where(tot > 0, (ww * vv).sum(1) / np.where(tot > 0, tot, 1), np.nan)
                    est = vv.mean()
                else:
                    reps = _weighted_median(vv, ww)
                    est = _weighted_median(vv, np.ones((1, len(vv))))[0]
                lo, hi = np.nanquantile(reps, [(1 - ci) / 2, (1 + ci) / 2])
            rows.append(dict(zip(by, key)) | {"column": col, "stat": stat, "estimate": float(est),
                                               "lo": float(lo), "hi": float(hi), "pairs": int(ok.sum()),
                                               "prompts": len(units)})
    return pd.DataFrame(rows)


def compare_kinds(summary: pd.DataFrame, a: str = "attended", b: str = "non-attended", *,
                  column: str = "rolls_tovee", column_b: Optional[str] = None) -> pd.DataFrame:
    """Compare two kinds of pairs group by group in a :func:`bootstrap` summary grouped by ``kind``.

    For each group (the summary's other ``by`` columns): the estimates of ``column`` for kind
    ``a`` and of ``column_b`` (default ``column``; e.g. ``"rolls_tovee_rotated"`` to compare with
    the control) for kind ``b``, and ``verdict``: ``"lower"`` when ``a``'s interval lies entirely
    below ``b``'s, ``"higher"`` when entirely above, else ``"overlap"``. For Rolls-Tovee and
    N_recon, "lower" means sparser.
    """
    check_columns(summary, ["kind", "column", "estimate", "lo", "hi"], "compare_kinds")
    column_b = column if column_b is None else column_b
    kinds, cols = sorted(map(str, summary["kind"].unique())), sorted(map(str, summary["column"].unique()))
    for arg, value in (("a", a), ("b", b)):
        if value not in kinds:
            raise SVToolsError(f"compare_kinds: {arg}={value!r} is not a kind of this summary; it has {kinds}")
    for arg, value in (("column", column), ("column_b", column_b)):
        if value not in cols:
            raise SVToolsError(f"compare_kinds: {arg}={value!r} is not a column of this summary; it has {cols}")
    if (a, column) == (b, column_b):
        raise SVToolsError(f"compare_kinds: a and b are the same ({a!r}, {column!r}); compare two kinds or two columns")
    # groups: the summary's other columns, and the statistic (a mean is compared with a mean only)
    by = [c for c in summary.columns if c not in ("kind", "column", "estimate", "lo", "hi", "pairs", "prompts")]
    A = summary[(summary["kind"] == a) & (summary["column"] == column)]
    B = summary[(summary["kind"] == b) & (summary["column"] == column_b)]
    keep = by + ["estimate", "lo", "hi"]
    m = A[keep].merge(B[keep], on=by, suffixes=("_a", "_b")) if by else \
        pd.concat([A[keep].add_suffix("_a").reset_index(drop=True), B[keep].add_suffix("_b").reset_index(drop=True)], axis=1)
    m["verdict"] = np.where(m["hi_a"] < m["lo_b"], "lower", np.where(m["lo_a"] > m["hi_b"], "higher", "overlap"))
    return m.rename(columns={"estimate_a": a, "estimate_b": f"{b} ({column_b})" if column_b != column else b})


# ----------------------------------------------------------------------------- calibrated comparisons

def compare_matched(
    df: pd.DataFrame,
    a: str = "attended",
    b: str = "random",
    *,
    column: str = "rolls_tovee",
    by=("layer",),
    within=("layer", "head"),
    score: str = "score",
    bins: int = 10,
    unit: str = "prompt",
    n_boot: int = 500,
    ci: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Kind ``a`` minus kind ``b`` of ``column``, raw and at matched scores, with bootstrap intervals.

    A pair's Rolls-Tovee sparseness and N_recon depend on its score's size and sign, and kinds of
    pairs differ in score (attended pairs have large positive scores, non-attended pairs mostly
    large negative ones). The *matched* comparison stratifies: within each group of ``within``
    (default: each head), the pooled scores of both kinds are cut into ``bins`` quantile bins;
    in each stratum (group, bin) holding both kinds the difference of the kinds' means is taken,
    and the strata are averaged with the weights of kind ``a`` (kind ``b`` reweighted to ``a``'s
    score distribution). Strata without ``b`` pairs drop out; ``coverage`` is the share of
    ``a``'s pairs in strata that remain. The *raw* comparison is the plain difference of means.

    Intervals: percentile bootstrap over ``unit`` (prompts; the pairs of a prompt are not
    independent), ``n_boot`` replicates, the same replicates for raw and matched.

    What each can show: the raw difference mixes what the pairs are with how large their scores
    are; the matched difference compares pairs of equal score, so a difference left there is
    not the score's size. Neither says why the kinds differ: matched kinds are a control, not a
    test of alignment (even the aligned toy shows no gap at matched scores).

    Returns one row per ``by`` group: ``by...``, ``pairs_a, pairs_b``, ``raw_a, raw_b, raw_diff,
    raw_lo, raw_hi``, ``matched_a, matched_b`` (``b`` reweighted), ``matched_diff, matched_lo,
    matched_hi``, ``coverage``.
    """
    by, within = list(by), list(within)
    if not set(by) <= set(within):
        raise SVToolsError(f"by={by} must be a subset of within={within} (strata nest inside the groups)")
    check_columns(df, within + ["kind", column, score, unit], "compare_matched")
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise SVToolsError(f"bins must be a positive int, got {bins!r}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise SVToolsError(f"n_boot must be a positive int, got {n_boot!r}")
    if not (0.0 < ci < 1.0):
        raise SVToolsError(f"ci must be in (0, 1), got {ci}")
    sub = df[df["kind"].isin([a, b]) & df[column].notna()].copy()
    # strata: quantile bins of the pooled score within each `within` group
    def cut(s: pd.Series) -> pd.Series:
        if len(s) == 0:
            return s.astype(np.int64)
        edges = np.unique(np.quantile(s.to_numpy(dtype=float), np.linspace(0, 1, bins + 1)))
        return pd.Series(np.clip(np.searchsorted(edges, s.to_numpy(dtype=float), side="right") - 1, 0,
                                 max(len(edges) - 2, 0)), index=s.index)
    sub["_bin"] = sub.groupby(within, sort=False)[score].transform(cut) if within else cut(sub[score])
    rng = np.random.default_rng(seed)
    q = [(1 - ci) / 2, (1 + ci) / 2]
    rows = []
    for key, g in (sub.groupby(by, sort=True) if by else [((), sub)]):
        key = key if isinstance(key, tuple) else (key,)
        is_a = (g["kind"] == a).to_numpy()
        if is_a.all() or not is_a.any():
            continue
        strat = g.groupby(within + ["_bin"], sort=False).ngroup().to_numpy()
        n_s = int(strat.max()) + 1
        v = g[column].to_numpy(dtype=float)
        units, inv = np.unique(g[unit].to_numpy(), return_inverse=True)
        counts = np.vstack([np.ones((1, len(units))),
                            rng.multinomial(len(units), np.full(len(units), 1.0 / len(units)), size=n_boot)])
        W = counts[:, inv]  # (1 + B, rows): first row = the data
        col = strat + n_s * (~is_a)  # a strata first, then b strata
        M = sparse.csr_matrix((np.ones(len(g)), (np.arange(len(g)), col)), shape=(len(g), 2 * n_s))
        Mv = sparse.csr_matrix((v, (np.arange(len(g)), col)), shape=(len(g), 2 * n_s))
        wsum = np.asarray((M.T @ W.T).T)  # (1 + B, 2 S)
        vsum = np.asarray((Mv.T @ W.T).T)
        na, nb = wsum[:, :n_s], wsum[:, n_s:]
        with np.errstate(invalid="ignore", divide="ignore"):
            ma, mb = vsum[:, :n_s] / na, vsum[:, n_s:] / nb
            both = (na > 0) & (nb > 0)
            wts = np.where(both, na, 0.0)
            matched_a = np.nansum(np.where(both, ma, 0.0) * wts, 1) / wts.sum(1)
            matched_b = np.nansum(np.where(both, mb, 0.0) * wts, 1) / wts.sum(1)
            raw_a = vsum[:, :n_s].sum(1) / na.sum(1)
            raw_b = vsum[:, n_s:].sum(1) / nb.sum(1)
        md, rd = matched_a - matched_b, raw_a - raw_b
        rows.append(dict(zip(by, key)) | {
            "pairs_a": int(is_a.sum()), "pairs_b": int((~is_a).sum()),
            "raw_a": raw_a[0], "raw_b": raw_b[0], "raw_diff": rd[0],
            "raw_lo": np.nanquantile(rd[1:], q[0]), "raw_hi": np.nanquantile(rd[1:], q[1]),
            "matched_a": matched_a[0], "matched_b": matched_b[0], "matched_diff": md[0],
            "matched_lo": np.nanquantile(md[1:], q[0]), "matched_hi": np.nanquantile(md[1:], q[1]),
            "coverage": float(wts[0].sum() / na[0].sum())})
    return pd.DataFrame(rows)


def null_ratio(
    df: pd.DataFrame,
    *,
    by=("layer", "head", "kind"),
    measure: str = "rolls_tovee",
    unit: str = "prompt",
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """The calibrated ratio real / null of ``measure`` per group, with a bootstrap interval over prompts.

    ``ratio = mean(measure) / mean(measure + "_null")`` over the group's pairs that have a null
    value (a ratio of means: pairs with large and small values weigh by their values, not by
    their ratios). 1 = no sparser than a head with the same singular values and random singular
    vectors; below 1 = sparser, the trace of alignment. The interval resamples whole prompts
    (column ``unit``) with replacement, ``n_boot`` times (percentile interval at level ``ci``).

    Returns ``by...``, ``real``, ``null`` (the two means), ``ratio``, ``lo``, ``hi``, ``pairs``,
    ``prompts``.
    """
    by = list(by)
    null_col = f"{measure}_null"
    check_columns(df, by + [measure, null_col, unit], "null_ratio")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise SVToolsError(f"n_boot must be a positive int, got {n_boot!r}")
    if not (0.0 < ci < 1.0):
        raise SVToolsError(f"ci must be in (0, 1), got {ci}")
    rng = np.random.default_rng(seed)
    sub = df[df[measure].notna() & df[null_col].notna()]
    rows = []
    for key, g in (sub.groupby(by, sort=True) if by else [((), sub)]):
        key = key if isinstance(key, tuple) else (key,)
        units, inv = np.unique(g[unit].to_numpy(), return_inverse=True)
        counts = rng.multinomial(len(units), np.full(len(units), 1.0 / len(units)), size=n_boot)
        W = counts[:, inv].astype(np.float64)
        v, n0 = g[measure].to_numpy(dtype=float), g[null_col].to_numpy(dtype=float)
        real, null = v.mean(), n0.mean()
        with np.errstate(invalid="ignore", divide="ignore"):
            reps = (W @ v) / (W @ n0)
        lo, hi = np.nanquantile(reps, [(1 - ci) / 2, (1 + ci) / 2])
        rows.append(dict(zip(by, key)) | {"real": real, "null": null, "ratio": real / null, "lo": lo, "hi": hi,
                                           "pairs": len(g), "prompts": len(units)})
    return pd.DataFrame(rows, columns=by + ["real", "null", "ratio", "lo", "hi", "pairs", "prompts"])
