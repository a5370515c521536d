"""The OV half of a head: what it writes. SVD of ``W_V W_O`` and its readout through the unembedding.

A head's output at a query is ``sum_j p_j (y_j W_V + b_V) W_O``: the key inputs it attends,
mapped by ``W_OV = W_V W_O`` (``d_model x d_model``, rank ``<= d_head``), plus the constant
``b_V W_O`` (the pattern sums to 1). With ``W_OV = U diag(S) V^T``, the head reads direction
``u_k`` of what it attends and writes ``sigma_k (u_k . y) v_k``: :func:`ov_svd` gives ``U`` (input
side, "reads") and ``V`` (output side, "writes"), decomposed without forming ``W_OV`` (the same
``d_head x d_head`` core as :func:`svtools.qk_svd`, which it calls with ``W_K = W_O^T``).

:func:`ov_token_readout` lists, for each output direction, the tokens whose unembedding it raises
and lowers most (``v_k^T W_U``), as TransformerLens' ``SVDInterpreter`` users read OV singular
vectors (like it, through ``W_U`` alone: the final norm is left out). :func:`copying_mass` asks
the question a name mover must answer yes to: does the head write the token it reads?
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from svtools._checks import SVToolsError, as_int, as_tensor
from svtools.features import bilinear_mass
from svtools.qk import QKSVD, qk_svd

__all__ = ["ov_weights", "ov_svd", "ov_token_readout", "copying_mass"]


def ov_weights(model: Any, layer: int) -> tuple[Float[Tensor, "head d_model d_head"], Float[Tensor, "head d_head d_model"]]:
    """``W_V, W_O`` of every head of ``layer`` (grouped-query attention: value weights repeated per query head)."""
    n = int(model.cfg.n_layers)
    layer = as_int(layer, "layer", min_value=-n, max_value=n - 1) % n
    W_V, W_O = model.W_V[layer].detach(), model.W_O[layer].detach()
    if W_V.shape[0] != W_O.shape[0]:
        if W_O.shape[0] % W_V.shape[0]:
            raise SVToolsError(f"{W_O.shape[0]} heads do not divide into {W_V.shape[0]} value heads")
        W_V = W_V.repeat_interleave(W_O.shape[0] // W_V.shape[0], dim=0)
    return W_V, W_O


def ov_svd(model: Any, layer: int, heads: Optional[Sequence[int]] = None, *,
           dtype: Optional[torch.dtype] = None) -> QKSVD:
    """SVD of ``W_OV = W_V W_O`` for the chosen heads of ``layer`` (default all).

    Returns a :class:`~svtools.qk.QKSVD` with ``U (head, d_model, r)`` (what the head reads),
    ``S (head, r)``, ``V (head, d_model, r)`` (what it writes), ``r = d_head``, and the
    identity ``U diag(S) V^T == W_V W_O`` (tested). The value bias is not part of it (it adds
    the constant ``b_V W_O`` to the output).
    """
    W_V, W_O = ov_weights(model, layer)
    if heads is not None:
        idx = torch.tensor([as_int(h, "head", min_value=0, max_value=W_V.shape[0] - 1) for h in heads])
        W_V, W_O = W_V[idx], W_O[idx]
    return qk_svd(W_V, W_O.transpose(-1, -2), dtype=dtype)


def ov_token_readout(ov: QKSVD, W_U: Float[Tensor, "d_model vocab"], tokens: Sequence[str], *,
                     directions: Optional[Sequence[int]] = None, top: int = 5,
                     among: Optional[Sequence[int]] = None) -> pd.DataFrame:
    """The tokens each output singular direction of one head raises and lowers most.

    For each ``k`` (default all), ``logit_k = v_k^T W_U`` (the head's write direction read
    through the unembedding); the ``top`` tokens with the largest and the smallest ``logit_k``.
    The sign of a singular pair is a convention (:func:`svtools.qk_svd`): the head writes
    ``+v_k`` or ``-v_k`` depending on the sign of ``u_k . y`` of what it reads, so both ends
    matter. ``among``: restrict to these token ids (e.g. the names).

    Returns one row per direction: ``k``, ``sigma``, ``raises``, ``lowers`` (comma-separated
    tokens), ``spread`` (std of ``logit_k`` over the tokens considered).
    """
    if ov.S.ndim != 1:
        raise SVToolsError("pass the OV decomposition of one head, e.g. ov_svd(model, layer, [head])[0]")
    W_U = as_tensor(W_U, "W_U").to(ov.V.dtype)
    if W_U.shape[0] != ov.V.shape[0]:
        raise SVToolsError(f"W_U must be (d_model={ov.V.shape[0]}, vocab), got {tuple(W_U.shape)}")
    ids = torch.arange(W_U.shape[1]) if among is None else torch.as_tensor(list(among))
    if len(tokens) != W_U.shape[1]:
        raise SVToolsError(f"tokens lists {len(tokens)} strings, W_U has {W_U.shape[1]} columns")
    ks = range(ov.r) if directions is None else [as_int(k, "direction", min_value=0, max_value=ov.r - 1)
                                                 for k in directions]
    top = as_int(top, "top", min_value=1)
    logits = ov.V.T @ W_U[:, ids]  # (r, n)
    rows = []
    for k in ks:
        order = torch.argsort(logits[k], descending=True)
        word = lambda i: tokens[int(ids[i])]  # noqa: E731
        rows.append({"k": k, "sigma": float(ov.S[k]),
                     "raises": ", ".join(word(i) for i in order[:top]),
                     "lowers": ", ".join(word(i) for i in order.flip(0)[:top]),
                     "spread": float(logits[k].std())})
    return pd.DataFrame(rows)


def copying_mass(ov: QKSVD, R: Float[Tensor, "d_model c"], W_out: Float[Tensor, "d_model c"], *,
                 C: Optional[Float[Tensor, "c c"]] = None) -> Float[Tensor, "... r"]:
    """Per OV direction, how much the head writes the token whose code it reads.

    If a key input carries a code ``g`` as ``R g`` and token ``g``'s unembedding is ``W_out g``
    (tied embeddings: ``W_out`` = identity on the code), the head's output raises the logit
    of the code it read over a random other code by ``trace(C R^T W_OV W_out)`` per unit
    attention; the ``k``-th term is ``sigma_k u_k^T R C W_out^T v_k``. Positive: the head copies.
    Same computation as :func:`svtools.features.bilinear_mass` (the OV matrix in place of Omega).
    """
    return bilinear_mass(ov, R, W_out, C=C)
