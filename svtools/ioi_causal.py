"""Causal tests of IOI heads: what a head's singular directions do to the model's answer.

For a head that attends from END to the indirect object (IO), three questions, each answered by
measuring, never by reading attention alone:

* :func:`ioi_behaviour`: the model's behaviour on IOI prompts, per prompt: the logit
  difference ``logit(IO) - logit(S)`` at END, whether IO beats S, and for chosen heads their
  END -> IO and END -> S1 attention and *selectivity* ``log(p_IO / p_S1)``.
* :func:`role_terms` and :func:`direction_sets`: which singular directions carry the head's
  END -> IO attention (*SAD's set*: the largest mean relative terms of the END -> IO pairs) and
  which carry its *decision* between IO and S1 (the largest mean of ``t_k(END, IO) -
  t_k(END, S1)``, whose sum over ``k`` is the score difference behind the selectivity).
* :func:`intervention_effects`: the behaviour after removing such sets
  (:func:`svtools.intervene.intervene`), beside the same for singular-value-matched random sets
  (:func:`svtools.intervene.sigma_matched_sets`) and for zeroing the head;
  :func:`effect_summary` and :func:`effect_table` summarise it with intervals.

:func:`known_feature_summary` gathers, per head, what the known features of
:mod:`svtools.features` say (alignment with their null, the decision's profile and how much of
it the name codes explain, the OV copying), and :func:`over_training` does it over an IOI-LM
run's checkpoints.

Works on any model :func:`svtools.load_model` gives with a tokenizer whose IOI names are single
tokens (the IOI language model of :mod:`svtools.ioi_lm`, GPT-2, Pythia).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from svtools._checks import SVToolsError, as_int
from svtools.decomposition import decompose, layer_qk
from svtools.features import CODE_PAIRS, alignment_table, code_mass_table, ioi_batch, ioi_features
from svtools.intervene import intervene, sigma_matched_sets
from svtools.ov import copying_mass, ov_svd
from svtools.runtime import tqdm
from svtools.sparsity import n_recon, rolls_tovee
from svtools.terms import relative_terms

__all__ = ["ioi_behaviour", "behaviour_summary", "role_terms", "direction_sets", "direction_profile",
           "known_feature_summary", "over_training", "intervention_effects", "effect_summary", "effect_table",
           "ROLE_NAMES"]

#: The roles a position of an IOI prompt can have, as :class:`~svtools.data.IOIPositions` names them.
ROLE_NAMES = ("IO", "S1", "S2", "END", "first", "second")


def _heads(heads: Optional[Iterable[Any]]) -> list[tuple[int, int]]:
    out = []
    for h in heads or ():
        if not (isinstance(h, (tuple, list)) and len(h) == 2):
            raise SVToolsError(f"heads are (layer, head) pairs, got {h!r}")
        out.append((as_int(h[0], "layer"), as_int(h[1], "head")))
    return out


def ioi_behaviour(model: Any, dataset: Any, *, heads: Optional[Iterable[Any]] = None,
                  batch_size: int = 128) -> pd.DataFrame:
    """The model's IOI behaviour, one row per prompt (and per head in ``heads``).

    Columns: ``prompt``; ``logit_diff`` = ``logit[END, IO] - logit[END, S]`` (nats of the
    next-token logits); ``io_over_s`` (1.0 when ``logit_diff > 0``); ``top1`` (1.0 when IO is the
    most likely next token). With ``heads`` (``(layer, head)`` pairs), one row per prompt and
    head with also ``layer``, ``head``, ``end_io`` and ``end_s1`` (the head's attention weights
    from END to IO and to S1, as the model computed them) and ``selectivity`` =
    ``log(end_io / end_s1)``. Without heads, ``layer`` and ``head`` are absent.

    ``model`` may be an intervened copy (:func:`svtools.intervene.intervene`): the weights are
    read from its hooks, so they are the intervened ones.
    """
    heads = _heads(heads)
    ids, am, pos = ioi_batch(model, dataset)
    layers = sorted({l for l, _ in heads})
    names = {f"blocks.{l}.attn.hook_pattern" for l in layers}
    rows = []
    for s in range(0, len(ids), batch_size):
        sl = slice(s, s + batch_size)
        with torch.no_grad():
            logits, cache = model.run_with_cache(ids[sl], attention_mask=am[sl], names_filter=lambda n: n in names)
        r = torch.arange(logits.shape[0], device=logits.device)
        end = pos.end[sl]
        at_end = logits[r, end].float()
        ld = (at_end[r, pos.io_id[sl]] - at_end[r, pos.s_id[sl]]).cpu().numpy()
        top1 = (at_end.argmax(-1) == pos.io_id[sl]).float().cpu().numpy()
        base = pd.DataFrame({"prompt": np.arange(s, s + len(ld)), "logit_diff": ld,
                             "io_over_s": (ld > 0).astype(float), "top1": top1})
        if not heads:
            rows.append(base)
            continue
        for l, h in heads:
            pat = cache[f"blocks.{l}.attn.hook_pattern"][:, h].float()
            p_io = pat[r, end, pos.io[sl]].cpu().numpy()
            p_s1 = pat[r, end, pos.s1[sl]].cpu().numpy()
            with np.errstate(divide="ignore"):
                sel = np.log(p_io) - np.log(p_s1)
            rows.append(base.assign(layer=l, head=h, end_io=p_io, end_s1=p_s1, selectivity=sel))
    return pd.concat(rows, ignore_index=True)


def behaviour_summary(frame: pd.DataFrame, *, by: Sequence[str] = (), ci: float = 0.95) -> pd.DataFrame:
    """Means of the :func:`ioi_behaviour` columns per group of ``by``, with t intervals over prompts.

    Returns one row per group and column: ``by...``, ``column``, ``mean``, ``lo``, ``hi``,
    ``prompts``. Heads' rows are averaged over the heads of the group first (per prompt).
    """
    from scipy import stats

    cols = [c for c in ("logit_diff", "io_over_s", "top1", "end_io", "end_s1", "selectivity") if c in frame]
    per_prompt = frame.groupby([*by, "prompt"], sort=True)[cols].mean().reset_index()
    rows = []
    for key, g in (per_prompt.groupby(list(by), sort=True) if by else [((), per_prompt)]):
        key = key if isinstance(key, tuple) else (key,)
        for c in cols:
            v = g[c].to_numpy(dtype=float)
            v = v[np.isfinite(v)]
            m = float(v.mean()) if len(v) else float("nan")
            half = float(stats.t.ppf((1 + ci) / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))) \
                if len(v) > 1 else 0.0
            rows.append(dict(zip(by, key)) | {"column": c, "mean": m, "lo": m - half, "hi": m + half,
                                               "prompts": len(v)})
    return pd.DataFrame(rows)


def role_terms(model: Any, dataset: Any, layer: int, heads: Sequence[int], *,
               pairs: Sequence[tuple[str, str]] = (("END", "IO"), ("END", "S1")), relative: bool = True,
               batch_size: int = 64) -> dict[tuple[str, str], Float[Tensor, "prompt head r"]]:
    """SAD terms of chosen IOI role pairs of one layer's heads, one row per prompt.

    For each ``(query role, key role)`` in ``pairs`` (roles: :data:`ROLE_NAMES`), the terms
    ``t_k`` of the pair's score (:func:`svtools.decompose`, float64) and, with ``relative``, their
    relative form (each minus its mean over the query's other visible keys,
    :func:`svtools.relative_terms`). Identity: ``terms.sum(-1)`` is the pair's (relative) score.
    Returns ``{pair: (prompt, head, r)}`` on the CPU.
    """
    ids, am, pos = ioi_batch(model, dataset)
    roles = {"IO": pos.io, "S1": pos.s1, "S2": pos.s2, "END": pos.end, "first": pos.first, "second": pos.second}
    for q, k in pairs:
        if q not in roles or k not in roles:
            raise SVToolsError(f"unknown role in pair {(q, k)}; roles: {ROLE_NAMES}")
    out: dict[tuple[str, str], list[Tensor]] = {p: [] for p in pairs}
    for s in range(0, len(ids), batch_size):
        sl = slice(s, s + batch_size)
        dec = decompose(model, ids[sl], layer, list(heads), attention_mask=am[sl], dtype=torch.float64)
        t = relative_terms(dec.terms, dec.mask) if relative else dec.terms  # (b, head, q, k, r)
        r = torch.arange(t.shape[0], device=t.device)
        for q, k in pairs:
            out[(q, k)].append(t[r, :, roles[q][sl], roles[k][sl]].cpu())
    return {p: torch.cat(v) for p, v in out.items()}


def direction_sets(terms: Mapping[tuple[str, str], Tensor], k: int, *, attended: tuple[str, str] = ("END", "IO"),
                   rival: tuple[str, str] = ("END", "S1")) -> dict[str, Any]:
    """SAD's top-``k`` directions and the decision's top-``k``, from :func:`role_terms` of one head.

    ``terms[pair]``: ``(prompt, r)`` (one head). *SAD's set*: the ``k`` directions with the
    largest mean relative term of the ``attended`` pairs (the terms SAD shows carrying the
    attention). *The decision's set*: the ``k`` directions with the largest mean of
    ``t(attended) - t(rival)``, the per-direction part of the score difference that makes the
    head prefer IO over S1 (its sum over directions is ``selectivity / scale``).

    Returns ``{"sad": tuple, "decision": tuple, "sad_mean": (r,), "decision_mean": (r,)}``
    (sets sorted by index; means as numpy arrays).
    """
    a, b = terms[attended], terms[rival]
    if a.ndim != 2 or a.shape != b.shape:
        raise SVToolsError(f"terms of one head are (prompt, r); got {tuple(a.shape)} and {tuple(b.shape)}")
    k = as_int(k, "k", min_value=1, max_value=a.shape[-1])
    sad_mean = torch.nanmean(a, 0).numpy()
    dec_mean = torch.nanmean(a - b, 0).numpy()
    return {"sad": tuple(sorted(int(i) for i in np.argsort(-sad_mean, kind="stable")[:k])),
            "decision": tuple(sorted(int(i) for i in np.argsort(-dec_mean, kind="stable")[:k])),
            "sad_mean": sad_mean, "decision_mean": dec_mean}


def direction_profile(model: Any, dataset: Any, layer: int, heads: Sequence[int], *, k: int = 2,
                      feats: Any = None) -> dict[str, Any]:
    """Where a layer's heads' END -> IO attention and IO/S decision live among their singular directions.

    On ``dataset`` (the prompts the sets are chosen on), for each head: :func:`role_terms` of
    END -> IO and END -> S1 (relative terms), :func:`direction_sets` (SAD's top-``k`` and the
    decision's top-``k``), and per prompt the sparseness of the decision terms
    ``d_k = t_k(END, IO) - t_k(END, S1)`` (Rolls-Tovee, 1/r = one direction, 1 = flat; and
    N_recon, the fewest directions, largest first, that reach the total). With ``feats``
    (:func:`svtools.features.ioi_features` of ``layer``), the known code features' masses
    (:func:`svtools.features.code_mass_table`) join the profile.

    Returns ``{"profile": frame (head, k, sigma, sad_mean, decision_mean[, <pair> masses]),
    "spread": frame (head, sad_set, decision_set, decision_rt, decision_rt_lo, decision_rt_hi,
    decision_nrecon, decision_nrecon_lo, decision_nrecon_hi, prompts)}`` (intervals: 95% t over
    prompts).
    """
    from scipy import stats

    heads = [as_int(h, "head") for h in heads]
    terms = role_terms(model, dataset, layer, heads)
    qk = layer_qk(model, layer, heads, dtype=torch.float64)
    prof, spread = [], []
    for i, h in enumerate(heads):
        one = {p: v[:, i] for p, v in terms.items()}
        sets = direction_sets(one, k)
        prof.append(pd.DataFrame({"head": h, "k": np.arange(qk.r), "sigma": qk.S[i].cpu().numpy(),
                                  "sad_mean": sets["sad_mean"], "decision_mean": sets["decision_mean"]}))
        d = one[("END", "IO")] - one[("END", "S1")]
        d = d[torch.isfinite(d).all(-1)]
        row = {"head": h, "sad_set": sets["sad"], "decision_set": sets["decision"], "prompts": len(d)}
        for name, v in (("decision_rt", rolls_tovee(d)), ("decision_nrecon", n_recon(d).double())):
            v = v.double().numpy()
            half = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
            row |= {name: float(v.mean()), f"{name}_lo": float(v.mean()) - half, f"{name}_hi": float(v.mean()) + half}
        spread.append(row)
    profile = pd.concat(prof, ignore_index=True)
    if feats is not None:
        masses = code_mass_table(feats, qk, heads).pivot_table(index=["head", "k"], columns="pair", values="mass")
        profile = profile.merge(masses.reset_index(), on=["head", "k"])
    return {"profile": profile, "spread": pd.DataFrame(spread)}


def known_feature_summary(model: Any, dataset: Any, heads: Sequence[Any], *, k: int = 2, n_null: int = 1000,
                          seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Everything the known features say about some heads, one row per head.

    For each layer of ``heads`` (``(layer, head)`` pairs): :func:`svtools.features.ioi_features`,
    :func:`svtools.features.alignment_table` and :func:`direction_profile` on ``dataset``, and
    the heads' behaviour (:func:`ioi_behaviour`). Columns: ``layer, head``; ``end_io``,
    ``selectivity`` (means over prompts); for the key-side features ``name`` and ``first_slot``
    and readings ``raw``/``unwhitened``: ``<feature>_<reading>`` (``max_k |cos|``), ``..._q95``
    (null) and ``..._k`` (best index); ``sad_set``, ``decision_set``; ``decision_rt``,
    ``decision_nrecon`` (per-prompt means, with ``_lo``/``_hi``); ``profile_rt``,
    ``profile_nrecon`` (of the mean decision profile over directions: how many directions the
    decision uses *over prompts*); ``mass_corr`` (correlation over directions between the
    mean decision profile and the known features' code masses, IO code minus S code) and
    ``mass_share`` (their sum over the decision's: how much of the decision the codes explain);
    ``decision_topk_share`` (share of the mean decision profile on its ``k`` largest directions)
    and ``s_code_topk_energy`` (share of the S code's variance at END, through the code map, in
    its ``k`` largest dimensions: how concentrated the code is where the head reads it);
    the OV half (:func:`svtools.ov.copying_mass` of the name code at the key through to the
    name's unembedding): ``copying`` (nats of the read name's logit over another name's, per
    unit attention), ``copying_max_share`` (largest share of one OV direction), ``copying_rt``.
    Returns ``(summary, profile)`` with ``profile`` the per-direction frame of
    :func:`direction_profile` (``layer`` added).
    """
    heads = _heads(heads)
    behav = ioi_behaviour(model, dataset, heads=heads).groupby(["layer", "head"])[["end_io", "selectivity"]].mean()
    io_pair, s_pair = list(CODE_PAIRS)[1], list(CODE_PAIRS)[0]
    rows, profiles = [], []
    for layer in sorted({l for l, _ in heads}):
        hs = [h for l, h in heads if l == layer]
        feats = ioi_features(model, dataset, layer)
        qk = layer_qk(model, layer, hs, dtype=torch.float64)
        copy = copying_mass(ov_svd(model, layer, hs, dtype=torch.float64), feats.maps["name@key"],
                            feats.maps["name@unembed"], C=feats.code_cov)  # (head, r)
        al = alignment_table(feats, qk, hs, n_null=n_null, seed=seed)
        dp = direction_profile(model, dataset, layer, hs, k=k, feats=feats)
        w, Q = torch.linalg.eigh(feats.code_cov)
        sv = torch.linalg.svdvals(feats.maps["S@END"].double() @ (Q * w.clamp_min(0).sqrt()))
        s_code = float((sv[:k] ** 2).sum() / (sv ** 2).sum())
        prof = dp["profile"].assign(layer=layer)
        profiles.append(prof)
        for _, sp in dp["spread"].iterrows():
            h = int(sp["head"])
            row = {"layer": layer, "head": h, **behav.loc[(layer, h)].to_dict()}
            for _, a in al[al["head"] == h].iterrows():
                key = f"{a['feature']}_{a['reading']}"
                row |= {key: a["max_cos"], f"{key}_q95": a["null_q95"], f"{key}_k": a["best_k"]}
            row |= {c: sp[c] for c in dp["spread"].columns if c not in ("head", "prompts")}
            g = prof[prof["head"] == h]
            dm = torch.tensor(g["decision_mean"].to_numpy())
            known = (g[io_pair] - g[s_pair]).to_numpy()
            row |= {"profile_rt": float(rolls_tovee(dm)), "profile_nrecon": int(n_recon(dm)),
                    "mass_corr": float(np.corrcoef(dm.numpy(), known)[0, 1]),
                    "mass_share": float(known.sum() / dm.sum()),
                    "decision_topk_share": float(dm.sort().values[-k:].sum() / dm.sum()), "s_code_topk_energy": s_code}
            c = copy[hs.index(h)]
            row |= {"copying": float(c.sum()), "copying_max_share": float(c.abs().max() / c.abs().sum()),
                    "copying_rt": float(rolls_tovee(c))}
            rows.append(row)
    return pd.DataFrame(rows), pd.concat(profiles, ignore_index=True)


def over_training(run: Any, steps: Sequence[int], dataset: Any, heads: Sequence[Any], *, k: int = 2,
                  n_null: int = 200, seed: int = 0, test: Any = None, progress: bool = True) -> pd.DataFrame:
    """:func:`known_feature_summary` of ``heads`` at several checkpoints of an IOI-LM run.

    Adds ``seed`` (the run's), ``step`` and ``io_over_s`` (share of ``dataset``'s prompts whose IO
    logit beats S's at that step). With ``test`` (other prompts), each head's behaviour there
    without and with its SAD set or its decision set (chosen at that step on ``dataset``)
    removed: ``test_end_io``, ``test_selectivity``, ``<measure>_minus_sad``,
    ``<measure>_minus_decision`` for ``end_io`` and ``selectivity`` (means over prompts).
    One row per (step, head).
    """
    frames = []
    for step in tqdm(list(steps), desc=f"seed {run.seed} checkpoints", disable=not progress):
        model = run.load(int(step))
        summ, _ = known_feature_summary(model, dataset, heads, k=k, n_null=n_null, seed=seed)
        summ = summ.assign(seed=run.seed, step=int(step),
                           io_over_s=float(ioi_behaviour(model, dataset)["io_over_s"].mean()))
        if test is not None:
            for i, row in summ.iterrows():
                hk = (int(row["layer"]), int(row["head"]))
                for label, kw in (("", {}), ("_minus_sad", {"remove": {hk: row["sad_set"]}}),
                                  ("_minus_decision", {"remove": {hk: row["decision_set"]}})):
                    m = intervene(model, **kw) if kw else model
                    b = ioi_behaviour(m, test, heads=[hk])[["end_io", "selectivity"]].mean()
                    pre = "test_" if not label else ""
                    summ.loc[i, [f"{pre}end_io{label}", f"{pre}selectivity{label}"]] = b.to_numpy()
        frames.append(summ)
    return pd.concat(frames, ignore_index=True)


def intervention_effects(model: Any, dataset: Any, sets: Mapping[str, Mapping[tuple[int, int], Sequence[int]]], *,
                         heads: Sequence[Any], r: int, n_null: int = 20, band: int = 4, seed: int = 0,
                         zero: bool = True, progress: bool = False) -> pd.DataFrame:
    """IOI behaviour after removing chosen direction sets, beside matched random sets and zeroing.

    Args:
        model: a bridge (left unchanged).
        dataset: the IOI prompts to measure on.
        sets: ``{label: {(layer, head): directions}}``, e.g. ``{"sad": {(1, 2): (0, 2)},
            "decision": {(1, 2): (2, 3)}}``; each label is one intervention (all its heads at once).
        heads: the heads whose attention is reported (``end_io``, ``end_s1``, ``selectivity``).
        r: number of singular directions per head (for the null).
        n_null: random sets per label: for each, every head's set is replaced by a
            :func:`~svtools.intervene.sigma_matched_sets` draw of the same size and rank bands
            (seeded by ``seed``, the draw index and the head).
        band: rank-band width of the null.
        zero: also measure ``zero_omega`` and ``zero_pattern`` of all heads named in ``sets``.

    Returns the :func:`ioi_behaviour` rows with ``intervention`` (``"none"``, a label,
    ``"<label> null"``, ``"zero omega"``, ``"zero pattern"``) and ``draw`` (the null draw, -1
    otherwise) columns.
    """
    heads = _heads(heads)
    frames = [ioi_behaviour(model, dataset, heads=heads).assign(intervention="none", draw=-1)]
    todo: list[tuple[str, int, dict]] = []
    for label, plan in sets.items():
        plan = {tuple(map(int, k)): tuple(v) for k, v in plan.items()}
        todo.append((label, -1, {"remove": plan}))
        nulls = {hk: sigma_matched_sets(v, r, n_null, band=band, seed=seed * 1_000_003 + 7919 * hk[0] + hk[1])
                 for hk, v in plan.items()}
        n = min(len(v) for v in nulls.values())
        for d in range(n):
            todo.append((f"{label} null", d, {"remove": {hk: nulls[hk][d] for hk in plan}}))
    if zero:
        named = sorted({hk for plan in sets.values() for hk in plan})
        todo += [("zero omega", -1, {"zero_omega": named}), ("zero pattern", -1, {"zero_pattern": named})]
    for label, draw, kw in tqdm(todo, desc="interventions", disable=not progress):
        f = ioi_behaviour(intervene(model, **kw), dataset, heads=heads).assign(intervention=label, draw=draw)
        if "zero_pattern" in kw and heads:  # a zeroed pattern is not used: its weights mean nothing
            gone = f[["layer", "head"]].apply(tuple, axis=1).isin(kw["zero_pattern"])
            f.loc[gone, ["end_io", "end_s1", "selectivity"]] = float("nan")
        frames.append(f)
    return pd.concat(frames, ignore_index=True)


def effect_summary(effects: pd.DataFrame, *, by: Sequence[str] = (), ci: float = 0.95) -> pd.DataFrame:
    """One row per intervention (and group of ``by``) and measure, from :func:`intervention_effects`.

    For ``"none"``, each set and each zeroing: the mean over prompts (heads' attention averaged
    over the reported heads first) with a t interval over prompts (``lo``, ``hi``). For a set's
    null (``"<label> null"``): the mean over its draws of the per-draw means, ``lo``/``hi`` the
    2.5% and 97.5% quantiles over draws, ``draws`` their number, and ``p_null``: the share of
    draws whose mean is at least as far below ``"none"`` as the set's own (how often a random
    matched set does as much; NaN for other rows).
    """
    need = {"intervention", "draw", "prompt"}
    if not need <= set(effects.columns):
        raise SVToolsError(f"effect_summary needs an intervention_effects frame (columns {sorted(need)})")
    point = effects[~effects["intervention"].str.endswith(" null")]
    rows = behaviour_summary(point, by=[*by, "intervention"], ci=ci).assign(draws=1, p_null=float("nan"))
    nulls = effects[effects["intervention"].str.endswith(" null")]
    if nulls.empty:
        return rows
    per_draw = behaviour_summary(nulls, by=[*by, "intervention", "draw"], ci=ci)
    out = []
    for key, g in per_draw.groupby([*by, "intervention", "column"], sort=True):
        *grp, label, col = key
        v = g["mean"].to_numpy(dtype=float)
        sel = dict(zip(by, grp))
        def at(name):
            m = rows[(rows["intervention"] == name) & (rows["column"] == col)]
            for b, val in sel.items():
                m = m[m[b] == val]
            return float(m["mean"].iloc[0]) if len(m) else float("nan")
        base, own = at("none"), at(label.removesuffix(" null"))
        p = float(((base - v) >= (base - own)).mean()) if len(v) else float("nan")
        out.append(sel | {"intervention": label, "column": col, "mean": float(v.mean()),
                          "lo": float(np.quantile(v, 0.025)), "hi": float(np.quantile(v, 0.975)),
                          "prompts": int(g["prompts"].iloc[0]), "draws": len(v), "p_null": p})
    return pd.concat([rows, pd.DataFrame(out)], ignore_index=True)


#: Column titles of :func:`effect_table`.
EFFECT_COLUMNS = {"end_io": "END->IO", "end_s1": "END->S1", "selectivity": "log(IO/S1)",
                  "io_over_s": "IO over S", "logit_diff": "logit IO-S"}


def effect_table(summary: pd.DataFrame, *, by: Sequence[str] = ("seed",),
                 columns: Sequence[str] = ("end_io", "selectivity", "io_over_s", "logit_diff"),
                 digits: int = 2) -> pd.DataFrame:
    """:func:`effect_summary` as a small readable table: one row per group and intervention.

    Cells read ``mean [lo, hi]`` (t interval over prompts; for a null, the 2.5-97.5% range of
    its draws' means, then ``p=`` its ``p_null``: the share of matched random sets that lower the
    measure at least as much as the chosen set), and a ``draws`` column counts a null's sets.
    Also takes frames without ``p_null``/``draws`` (e.g. :func:`svtools.ioi_lm.over_seeds` of the
    summaries: then the cells are the mean over seeds and its interval over seeds).
    """
    order = ["none", "sad", "sad null", "decision", "decision null", "zero omega", "zero pattern"]
    f = f"{{:.{digits}f}}"
    rows = []
    for key, g in summary.groupby([*by, "intervention"], sort=False):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip([*by, "intervention"], key))
        null = str(key[-1]).endswith(" null") and "p_null" in g
        for c in columns:
            m = g[g["column"] == c]
            if m.empty or not np.isfinite(m["mean"].iloc[0]):
                row[EFFECT_COLUMNS.get(c, c)] = "-"
                continue
            m = m.iloc[0]
            cell = f"{f.format(m['mean'])} [{f.format(m['lo'])}, {f.format(m['hi'])}]"
            row[EFFECT_COLUMNS.get(c, c)] = cell + (f" p={f.format(m['p_null'])}" if null else "")
        if "draws" in g:
            row["draws"] = int(g["draws"].iloc[0]) if null else ""
        rows.append(row)
    out = pd.DataFrame(rows)
    out["_o"] = out["intervention"].map({n: i for i, n in enumerate(order)}).fillna(len(order))
    return out.sort_values([*by, "_o"]).drop(columns="_o").set_index([*by, "intervention"])
