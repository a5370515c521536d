"""Sparse attention decomposition on the toy model, where the features are known.

* :func:`toy_tokens` — toy examples ``r = W f``: query and key tokens, the head's attention and
  the planted key;
* :func:`toy_sparsity` — SAD of the toy head's attended pairs (the toy analogue of
  :func:`svtools.sad.head_sparsity`), with the spectrum null (and the rotated control on request);
* :func:`toy_pair_sad` — SAD of each template pair's clean score beside its measured alignment;
* :func:`toy_sparsity_over_training` — :func:`toy_sparsity` at several points of one run;
* :func:`toy_sad_across_runs` — alignment and the null ratio over runs whose alignment varies.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from svtools._checks import SVToolsError
from svtools.qk import rotary_matrices
from svtools.runtime import tqdm
from svtools.sad.frame import pair_measures, used_tuples
from svtools.sad.measure import control_names
from svtools.sad.null import DRAWS, context_mean, null_gaussians, null_rotations, spectrum_null
from svtools.sad.selection import Select, check_baseline, select_pairs
from svtools.sad.stats import null_ratio
from svtools.sparsity import n_recon, rolls_tovee
from svtools.terms import homogeneous, relative_terms, rotated_terms, sad_terms
from svtools.toy.model import sample_batch, template_matrix
from svtools.toy.summaries import summarize
from svtools.toy.training import train

__all__ = ["toy_tokens", "toy_pair_sad", "toy_sparsity", "toy_sparsity_over_training", "toy_sad_across_runs"]


def toy_tokens(run: Any, n: int, *, seed: int = 0) -> tuple[Float[Tensor, "n D"], Float[Tensor, "n m D"], Float[Tensor, "n m"], Int[Tensor, "n"]]:
    """Toy examples ``r = W f``: query tokens, key tokens, the head's attention, planted key.

    Draws ``n`` examples of the run's own data distribution (:func:`svtools.toy.sample_batch`,
    generator seeded with ``seed``) and returns ``(x_query (n, D), x_keys (n, m, D),
    attention (n, m), planted (n,))``; ``planted`` is the key index holding the key feature of a
    template pair whose query feature is active in the query, or -1 when none does.
    """

    cfg = run.cfg
    if run.qk is None:
        raise SVToolsError("this toy run has no attention head (cfg.head=False)")
    g = torch.Generator().manual_seed(int(seed))
    batch = sample_batch(cfg, int(n), g, device="cpu", dtype=run.features.dtype)
    W = run.features
    xq = batch.f_query @ W.T
    xk = batch.f_keys @ W.T
    q = xq @ run.W_Q.T
    k = xk @ run.W_K.T
    if cfg.rotary:
        M = rotary_matrices(run.rotary_spec(), cfg.d_head, dtype=q.dtype)
        k = torch.einsum("mhg,bmg->bmh", M, k)
    attn = torch.einsum("bh,bmh->bm", q, k).softmax(-1)
    T = template_matrix(cfg, dtype=W.dtype)
    hit = torch.einsum("bn,nk,bmk->bm", (batch.f_query > 0).to(W.dtype), (T != 0).to(W.dtype),
                       (batch.f_keys > 0).to(W.dtype)) > 0
    planted = torch.where(hit.any(-1), hit.to(torch.int64).argmax(-1), torch.full((int(n),), -1))
    return xq, xk, attn, planted


def toy_pair_sad(run: Any) -> pd.DataFrame:
    """SAD of each template pair's *clean* score beside its measured alignment, one row per pair.

    For template pair ``p = (i, j)`` of a trained toy run, the terms are
    ``sad_terms(run.qk, w_i, w_j)`` (features as query and key; they sum to ``w_i^T Omega w_j``).
    Columns: ``pair``, ``cos`` (the pair's worst ``|cos|`` at its matched singular index,
    ``run.alignment()``), ``cos_q, cos_k``, ``score``, ``n_recon``, ``rolls_tovee``,
    ``dominant_k`` (index of the largest ``|term|``), ``assigned_k`` (matched index),
    ``cos_at_dominant`` (the pair's smaller ``|cos|`` with ``u_k, v_k`` at the dominant index) and
    ``dominant_shared`` (the dominant index is matched to another pair).
    """
    a, W = run.alignment(), run.features
    assigned = [int(x) for x in a.index.tolist()]
    rows = []
    for p, (i, j, _) in enumerate(run.cfg.template):
        t = sad_terms(run.qk, W[:, i], W[:, j])
        kd = int(t.abs().argmax())
        cq = torch.nn.functional.cosine_similarity(W[:, i], run.qk.U[:, kd], dim=0).abs()
        ck = torch.nn.functional.cosine_similarity(W[:, j], run.qk.V[:, kd], dim=0).abs()
        rows.append({"pair": p, "cos": float(a.worst[p]), "cos_q": float(a.cos_q[p]), "cos_k": float(a.cos_k[p]),
                     "score": float(t.sum()), "n_recon": int(n_recon(t)), "rolls_tovee": float(rolls_tovee(t)),
                     "dominant_k": kd, "assigned_k": assigned[p], "cos_at_dominant": float(min(cq, ck)),
                     "dominant_shared": kd in [x for q, x in enumerate(assigned) if q != p]})
    return pd.DataFrame(rows)


def toy_sparsity(
    run: Any,
    n: int = 512,
    *,
    select: Select = "threshold",
    threshold: float = 0.5,
    attention: Literal["absolute", "relative"] = "absolute",
    seed: int = 0,
    control: Optional[str | Sequence[str]] = "spectrum",
    control_seed: int = 0,
    null_draws: int = DRAWS,
    null_center: bool = True,
    baseline: Optional[str] = None,
    baseline_fraction: float = 0.1,
    frac: float = 1.0,
) -> pd.DataFrame:
    """SAD of the toy head's attended pairs (the toy analogue of :func:`svtools.sad.head_sparsity`).

    Draws ``n`` toy examples (:func:`toy_tokens`), selects the (query, key ``j``) pairs the head
    attends (:func:`~svtools.sad.select_pairs`; ``"acc"`` means ``>= 1/m``; no key is excluded: the toy has no
    attention sink) and splits each pair's score ``r^T Omega s_j`` over the singular vectors
    (:func:`svtools.sad_terms`). ``attention="relative"``: each pair's terms minus their mean over
    the example's other keys. ``baseline="random"`` adds a seeded sample (``baseline_fraction``)
    of all (example, key) pairs, whatever their attention (``kind="random"``).

    Controls (``control``: ``"spectrum"``, ``"rotated"``, both, or None):

    * ``"spectrum"`` (default): the calibrated null of :mod:`svtools.sad.null` with
      ``null_draws`` null heads seeded by ``control_seed``; attended pairs are compared with the
      null head's key of the same rank in the same example, random pairs with themselves. With
      ``null_center`` the mean projection over *all* examples is kept (each example has a single
      query, so the context of the centring is the data set; for rotary heads one mean per offset).
    * ``"rotated"``: the score over a Haar rotation of the singular basis
      (:func:`svtools.rotated_terms`); not evidence of alignment (it flattens the spectrum).

    Returns a DataFrame with one row per pair: ``prompt`` (example), ``key``, ``kind``,
    ``attention``, ``planted`` (the key holds the query's template partner), ``score``,
    ``n_recon, rolls_tovee, n_recon_null, rolls_tovee_null, n_recon_rotated, rolls_tovee_rotated,
    dominant_k, dominant_k_rotated, dominant_sigma, r, used`` (NaN for a control not computed).
    """
    if attention not in ("absolute", "relative"):
        raise SVToolsError(f"unknown attention {attention!r}: use 'absolute' or 'relative'")
    controls = control_names(control)
    if baseline not in (None, "random"):
        raise SVToolsError(f"unknown baseline {baseline!r}: the toy has None or 'random'")
    xq, xk, attn, planted = toy_tokens(run, n, seed=seed)
    m = xk.shape[1]
    sel = select_pairs(attn[:, None, :], torch.ones(1, 1, m, dtype=torch.bool), select=select,
                       threshold=threshold, exclude_first=False)[:, 0]
    picks = {"attended": sel}
    if baseline == "random":
        check_baseline("random", baseline_fraction, None)
        g = torch.Generator().manual_seed(int(seed) * 7919 + 17)
        picks["random"] = torch.rand(sel.shape, generator=g) < float(baseline_fraction)
    idx = {k: p.nonzero() for k, p in picks.items()}
    b = torch.cat([i[:, 0] for i in idx.values()])
    j = torch.cat([i[:, 1] for i in idx.values()])
    kinds = np.concatenate([np.full(len(i), k, dtype=object) for k, i in idx.items()])
    # projections of every example and key: a (n, 1, key, r), c (n, 1, key, r), S (1, key, r);
    # rotary heads have one basis per offset m - j, so a and S vary along the key axis
    if run.cfg.rotary:
        qks = [run.qk_rotary.at_offset(m - jj) for jj in range(m)]  # m is small
        a = torch.stack([homogeneous(xq, q) @ q.U for q in qks], 1)[:, None]
        c = torch.stack([homogeneous(xk[:, jj], q) @ q.V for jj, q in enumerate(qks)], 1)[:, None]
        S = torch.stack([q.S for q in qks], 0)[None]
        U, V = torch.stack([q.U for q in qks])[None], torch.stack([q.V for q in qks])[None]  # (1, key, d_in, r)
        R_all = torch.stack([rotated_terms(q, xq, xk[:, jj], seed=control_seed) for jj, q in enumerate(qks)], 1) \
            if "rotated" in controls else None
    else:
        qk = run.qk
        a = (homogeneous(xq, qk) @ qk.U)[:, None, None, :]
        c = (homogeneous(xk, qk) @ qk.V)[:, None, :, :]
        S = qk.S[None, None, :]
        U, V = qk.U, qk.V
        R_all = rotated_terms(qk, xq[:, None, :], xk, seed=control_seed) if "rotated" in controls else None
    T_all = (a * S * c)[:, 0]  # (n, key, r)
    if attention == "relative":
        T_all = relative_terms(T_all[:, None])[:, 0]
        R_all = None if R_all is None else relative_terms(R_all[:, None])[:, 0]
    t = T_all[b, j]
    sig = S.expand(1, m, S.shape[-1])[0][j]
    cols = {"prompt": b.numpy(), "key": j.numpy(), "kind": kinds, "attention": attn[b, j].double().numpy(),
            "planted": (planted[b] == j).numpy()}
    if len(b) == 0:
        return pd.DataFrame(cols)
    mr = pair_measures(t, frac)
    dom = mr["dominant_k"]
    nan = np.full(len(b), np.nan)
    cols.update(score=mr["score"].double().numpy(), n_recon=mr["n_recon"].numpy(),
                rolls_tovee=mr["rolls_tovee"].double().numpy(), n_recon_null=nan, rolls_tovee_null=nan,
                n_recon_rotated=nan, rolls_tovee_rotated=nan, dominant_k=dom.numpy(), dominant_k_rotated=nan,
                dominant_sigma=(sig.gather(-1, dom[:, None])[:, 0] / sig[:, 0]).double().numpy(),
                r=np.full(len(b), t.shape[-1]),
                used=used_tuples(mr["order"].numpy(), mr["n_recon"].numpy()))
    if R_all is not None:
        mc = pair_measures(R_all[b, j], frac)
        cols.update(n_recon_rotated=mc["n_recon"].numpy(), rolls_tovee_rotated=mc["rolls_tovee"].double().numpy(),
                    dominant_k_rotated=mc["dominant_k"].numpy())
    if "spectrum" in controls:
        mask = torch.ones(len(xq), 1, m, dtype=torch.bool)
        pairs = torch.stack([b, torch.zeros_like(b), j], -1)
        G_q, G_k = null_gaussians(control_seed, null_draws, U.shape[-2], U.shape[-1], dtype=U.dtype)
        rot = (null_rotations(U, G_q[:, 0][:, None, None] if U.ndim == 4 else G_q[:, 0]),
               null_rotations(V, G_k[:, 0][:, None, None] if V.ndim == 4 else G_k[:, 0]))
        res = spectrum_null(a, c, S, pairs, rot, mask=mask,
                            match=torch.as_tensor(kinds != "random"), relative=attention == "relative",
                            mean_a=context_mean(a, dims=(0, 1)) if null_center else None,
                            mean_c=context_mean(c, dims=(0, 1) if run.cfg.rotary else (0, 1, 2)) if null_center else None,
                            frac=frac)
        cols.update(n_recon_null=res["n_recon"].numpy(), rolls_tovee_null=res["rolls_tovee"].numpy())
    return pd.DataFrame(cols)


def toy_sparsity_over_training(
    cfg: Any,
    steps: Sequence[int],
    *,
    n: int = 512,
    progress: bool = True,
    **kwargs: Any,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """:func:`toy_sparsity` at several points of one toy training run.

    :func:`svtools.toy.train` is deterministic and, with a constant learning rate and no warmup,
    training for ``s`` steps gives exactly the first ``s`` steps of a longer run; so the model
    at each step is obtained by training to it (cost: the sum of ``steps``). ``cfg`` must
    therefore have ``lr_schedule="constant"`` and ``warmup=0`` (else :class:`SVToolsError`).

    Returns ``(pairs, runs)``: the :func:`toy_sparsity` rows with a ``step`` column, and one row
    per step with the alignment of the template pairs (``cos_worst``: the smallest of the query
    and key cosines of the worst pair) and the final losses.
    """

    if cfg.lr_schedule != "constant" or cfg.warmup:
        raise SVToolsError("toy_sparsity_over_training needs cfg.lr_schedule='constant' and warmup=0, so "
                           "that shorter runs are exact prefixes of the longest one")
    steps = sorted({int(s) for s in steps})
    if not steps or steps[0] < 1:
        raise SVToolsError(f"steps must be positive integers, got {steps}")
    frames, runs = [], []
    for s in tqdm(steps, desc="toy checkpoints", disable=not progress):
        run = train(cfg.replace(steps=s, log_every=s), progress=False)
        df = toy_sparsity(run, n, **kwargs)
        df.insert(0, "step", s)
        frames.append(df)
        al = run.alignment()
        runs.append({"step": s, "cos_worst": float(torch.minimum(al.cos_q, al.cos_k).min()),
                     "loss_attn": float(run.history.loss_attn[-1]),
                     "loss_recon": float(run.history.loss_recon[-1]), "pairs": len(df)})
    return pd.concat(frames, ignore_index=True), pd.DataFrame(runs)


def toy_sad_across_runs(
    base: Any,
    n_features: Sequence[int],
    seeds: Sequence[int],
    n: int = 2000,
    *,
    runs: Optional[dict] = None,
    sample_seed: int = 3,
    n_boot: int = 300,
    progress: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Alignment and calibrated sparsity of toy runs whose alignment varies (more features in the
    same dimensions interfere more).

    For every ``N`` in ``n_features`` and seed in ``seeds``, trains
    ``base.replace(n_features=N, p_active=2/N, seed=seed)`` (or takes ``runs[(N, seed)]`` when
    given), then measures:

    * per run: :func:`~svtools.toy.summarize` (alignment of the template pairs) and the null ratio
      of its attended *planted* pairs (:func:`toy_sparsity` on ``n`` fresh examples drawn with
      ``sample_seed``; :func:`svtools.sad.null_ratio` with ``n_boot`` resamples of examples);
    * per template pair: :func:`toy_pair_sad` (its alignment and the SAD of its clean score).

    Returns:
        ``(per_run, per_pair)``: ``per_run`` has ``n_features, seed``, the columns of
        :func:`~svtools.toy.summarize`, ``pairs`` (attended planted pairs), ``RT`` and ``RT null``
        (mean Rolls–Tovée, real and null), ``ratio, lo, hi``; ``per_pair`` the columns of
        :func:`toy_pair_sad` plus ``n_features, seed``.

    Raises:
        SVToolsError: ``n_features`` or ``seeds`` is empty.
    """
    if not len(n_features) or not len(seeds):
        raise SVToolsError("toy_sad_across_runs: n_features and seeds must not be empty")
    runs = dict(runs or {})
    run_rows, pair_rows = [], []
    for N in n_features:
        for s in seeds:
            r = runs.get((N, s))
            if r is None:
                r = train(base.replace(n_features=int(N), p_active=2.0 / int(N), seed=int(s)), progress=progress)
            pair_rows.append(toy_pair_sad(r).assign(n_features=N, seed=s))
            df = toy_sparsity(r, n, seed=sample_seed).query("planted").assign(layer=0, head=0)
            q = null_ratio(df, by=[], n_boot=n_boot).iloc[0]
            run_rows.append({"n_features": N, "seed": s, **summarize(r), "pairs": len(df), "RT": q["real"],
                             "RT null": q["null"], "ratio": q["ratio"], "lo": q["lo"], "hi": q["hi"]})
    return pd.DataFrame(run_rows), pd.concat(pair_rows, ignore_index=True)
