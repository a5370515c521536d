"""Sparse attention decomposition on the toy model, where the features are known.

* :func:`toy_tokens` — toy examples ``r = W f``: query and key tokens, the head's attention and
  the planted key;
* :func:`toy_sparsity` — SAD of the toy head's attended pairs (the toy analogue of
  :func:`svtools.sad.head_sparsity`), with the rotated control;
* :func:`toy_pair_sad` — SAD of each template pair's clean score beside its measured alignment;
* :func:`toy_sparsity_over_training` — :func:`toy_sparsity` at several points of one run.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from svtools._checks import SVToolsError
from svtools.qk import rotary_matrices
from svtools.runtime import tqdm
from svtools.sad.frame import pair_measures, used_tuples
from svtools.sad.selection import Select, select_pairs
from svtools.sparsity import n_recon, rolls_tovee
from svtools.terms import relative_terms, rotated_terms, sad_terms
from svtools.toy.model import sample_batch, template_matrix
from svtools.toy.training import train

__all__ = ["toy_tokens", "toy_pair_sad", "toy_sparsity", "toy_sparsity_over_training"]


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
    control_seed: int = 0,
    frac: float = 1.0,
) -> pd.DataFrame:
    """SAD of the toy head's attended pairs (the toy analogue of :func:`svtools.sad.head_sparsity`).

    Draws ``n`` toy examples (:func:`toy_tokens`), selects the (query, key ``j``) pairs the head
    attends (:func:`~svtools.sad.select_pairs`; ``"acc"`` means ``>= 1/m``; no key is excluded: the toy has no
    attention sink), splits each pair's score ``r^T Omega s_j`` over the singular vectors
    (:func:`svtools.sad_terms`) and over a random rotation of them (:func:`svtools.rotated_terms`).
    ``attention="relative"``: each pair's terms minus their mean over the example's other keys.

    Returns a DataFrame with one row per selected pair: ``prompt`` (example), ``key``,
    ``attention``, ``planted`` (the key holds the query's template partner), ``score``,
    ``n_recon, rolls_tovee, n_recon_rotated, rolls_tovee_rotated, dominant_k, dominant_k_rotated,
    dominant_sigma, r, used``.
    """
    if attention not in ("absolute", "relative"):
        raise SVToolsError(f"unknown attention {attention!r}: use 'absolute' or 'relative'")
    xq, xk, attn, planted = toy_tokens(run, n, seed=seed)
    m = xk.shape[1]
    sel = select_pairs(attn[:, None, :], torch.ones(1, 1, m, dtype=torch.bool), select=select,
                       threshold=threshold, exclude_first=False)[:, 0]
    b, j = sel.nonzero().unbind(-1)
    # terms of every (example, key) pair: (n, m, r); rotary heads have one basis per offset m - j
    if run.cfg.rotary:
        qk_rot = run.qk_rotary
        per_key = [(sad_terms(qk_rot, xq, xk[:, jj], offset=m - jj),
                    rotated_terms(qk_rot, xq, xk[:, jj], offset=m - jj, seed=control_seed),
                    qk_rot.at_offset(m - jj).S) for jj in range(m)]  # m is small
        T_all = torch.stack([p[0] for p in per_key], 1)
        R_all = torch.stack([p[1] for p in per_key], 1)
        sig = torch.stack([p[2] for p in per_key], 0)[j]
    else:
        T_all = sad_terms(run.qk, xq[:, None, :], xk)
        R_all = rotated_terms(run.qk, xq[:, None, :], xk, seed=control_seed)
        sig = run.qk.S.expand(len(b), -1)
    if attention == "relative":
        T_all = relative_terms(T_all[:, None])[:, 0]
        R_all = relative_terms(R_all[:, None])[:, 0]
    t, tr = T_all[b, j], R_all[b, j]
    cols = {"prompt": b.numpy(), "key": j.numpy(), "attention": attn[b, j].double().numpy(),
            "planted": (planted[b] == j).numpy()}
    if len(b) == 0:
        return pd.DataFrame(cols)
    mr, mc = pair_measures(t, frac), pair_measures(tr, frac)
    dom = mr["dominant_k"]
    cols.update(score=mr["score"].double().numpy(), n_recon=mr["n_recon"].numpy(),
                rolls_tovee=mr["rolls_tovee"].double().numpy(), n_recon_rotated=mc["n_recon"].numpy(),
                rolls_tovee_rotated=mc["rolls_tovee"].double().numpy(), dominant_k=dom.numpy(),
                dominant_k_rotated=mc["dominant_k"].numpy(),
                dominant_sigma=(sig.gather(-1, dom[:, None])[:, 0] / sig[:, 0]).double().numpy(),
                r=np.full(len(b), t.shape[-1]),
                used=used_tuples(mr["order"].numpy(), mr["n_recon"].numpy()))
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
