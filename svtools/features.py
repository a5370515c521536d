"""Known features, read in a head's input space: directions, code maps, alignment, bilinear mass.

In a model trained on text nobody knows the features a head uses; in the IOI language model of
:mod:`svtools.ioi_lm` some are known by construction: every name's embedding is a random code
(:func:`svtools.ioi_lm.name_codes`), so "this token is a name", "this is the first of the two
names" and "this is name n's code" can be measured directly where the head reads them: in the
inputs of its query and key projections (for GPT-2, the output of the block's first LayerNorm;
:func:`head_inputs`). The functions here are generic (any IOI dataset on any model with single-
token names); the chapter *Known features* (Part 3) uses them on the IOI language model.

* :func:`feature_directions`: mean-difference directions (name vs other token; first vs second
  name), unit vectors of the input space.
* :func:`code_map`: the linear map from a name's code (its embedding row) to the input at a
  position (least squares over prompts): how the code reaches, e.g., END or a key.
* :func:`alignment` and :func:`alignment_null`: ``|cos|`` between feature directions and singular
  vectors, raw or un-whitened (``Sigma u``, :func:`svtools.theory.unwhiten`), against random
  orthonormal bases of the same size passed through the same map (a covariance-matched null).
* :func:`bilinear_mass`: how a feature pair (e.g. the S code at END x the name code at the key)
  is spread over the head's singular directions.

Singular vectors of heads with biases live in homogeneous coordinates ``[x; 1]``; features are
directions of ``x``, so the constant coordinate is dropped here (:func:`input_part`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from svtools._checks import SVToolsError, as_int, as_tensor, check_finite
from svtools.ioi import ioi_tokens
from svtools.qk import QKSVD, random_rotation
from svtools.terms import sad_terms
from svtools.theory import unwhiten

__all__ = ["ioi_batch", "head_inputs", "feature_directions", "code_map", "input_part", "second_moment", "alignment",
           "unwhitened_alignment", "alignment_null", "bilinear_mass", "IOIFeatures", "ioi_features",
           "alignment_table", "code_mass_table", "CODE_PAIRS"]


_BATCHES: dict[tuple, tuple] = {}


def ioi_batch(model: Any, dataset: Any) -> tuple[Tensor, Tensor, Any]:
    """IOI prompts as the model sees them: :func:`svtools.ioi.ioi_tokens` on the model's device.

    ``(ids, attention_mask, positions)``. The last few results are remembered per (tokenizer,
    prompts): chapters measure the same prompts on many checkpoints and copies of one model,
    which share their tokenizer.
    """
    tok = getattr(model, "tokenizer", None)
    key = (id(tok), bool(getattr(model.cfg, "default_prepend_bos", False)), tuple(dataset.texts))
    hit = _BATCHES.get(key)
    if hit is None or hit[0] is not tok:
        hit = (tok, ioi_tokens(model, dataset))
        if len(_BATCHES) >= 8:
            _BATCHES.pop(next(iter(_BATCHES)))
        _BATCHES[key] = hit
    ids, am, pos = hit[1]
    dev = next(model.original_model.parameters()).device
    return ids.to(dev), am.to(dev), pos.to(dev)


def head_inputs(model: Any, dataset: Any, layer: int, *, batch_size: int = 128
                ) -> tuple[Float[Tensor, "batch pos d_model"], Float[Tensor, "batch pos d_model"], Any, Tensor]:
    """The inputs of ``layer``'s query and key projections on IOI prompts.

    Returns ``(x_query, x_key, positions, attention_mask)`` on the CPU (float32): the tensors
    :func:`svtools.decompose` splits scores of (``q.hook_in``, ``k.hook_in``), with the prompts'
    :class:`~svtools.data.IOIPositions` and ``(batch, pos)`` mask.
    """
    ids, am, pos = ioi_batch(model, dataset)
    dev = ids.device
    names = {f"blocks.{layer}.attn.q.hook_in", f"blocks.{layer}.attn.k.hook_in"}
    xq, xk = [], []
    for s in range(0, len(ids), batch_size):
        with torch.no_grad():
            _, cache = model.run_with_cache(ids[s:s + batch_size].to(dev), attention_mask=am[s:s + batch_size].to(dev),
                                            names_filter=lambda n: n in names, stop_at_layer=layer + 1)
        xq.append(cache[f"blocks.{layer}.attn.q.hook_in"].float().cpu())
        xk.append(cache[f"blocks.{layer}.attn.k.hook_in"].float().cpu())
    return torch.cat(xq), torch.cat(xk), pos.to("cpu"), am.cpu()


def _rows(x: Tensor, idx: Tensor) -> Tensor:
    return x[torch.arange(x.shape[0]), idx.cpu()]


def feature_directions(x: Float[Tensor, "batch pos d"], positions: Any, attention_mask: Tensor
                       ) -> dict[str, Float[Tensor, "d"]]:
    """Unit mean-difference directions of IOI features at the input ``x`` of a layer.

    * ``"name"``: mean of ``x`` at the name positions (IO, S1, S2) minus its mean at the other
      real positions (position 0, the BOS / attention sink, left out): "this token is a name".
    * ``"first_slot"``: mean at the first name of the opening clause minus mean at the second
      (:attr:`~svtools.data.IOIPositions.first`): "this is the first name".

    Estimate them on one set of prompts and measure with them on another.
    """
    x = as_tensor(x, "x").double()
    am = torch.as_tensor(attention_mask).bool().cpu()
    name_mask = torch.zeros_like(am)
    r = torch.arange(x.shape[0])
    for p in (positions.io, positions.s1, positions.s2):
        name_mask[r, p.cpu()] = True
    other = am.clone()
    other[:, 0] = False
    other &= ~name_mask
    out = {"name": x[name_mask].mean(0) - x[other].mean(0),
           "first_slot": _rows(x, positions.first).mean(0) - _rows(x, positions.second).mean(0)}
    return {k: (v / v.norm()).float() for k, v in out.items()}


def code_map(x: Float[Tensor, "n d"], codes: Float[Tensor, "n c"], *, ridge: float = 1e-3
             ) -> tuple[Float[Tensor, "d c"], Float[Tensor, "d"], float]:
    """Least-squares map from codes to inputs: ``x ~ codes P^T + b``.

    ``x``: one input per prompt (e.g. the key input at the IO position, or END's input);
    ``codes``: the code of the name that should show there (e.g. the IO name's embedding row).
    Ridge ``ridge * trace(C) / c`` on the centred codes' covariance ``C`` keeps it defined when
    the codes span fewer than ``c`` dimensions. Returns ``(P, b, R^2)`` with ``R^2`` the share of
    ``x``'s variance (about its mean) the codes explain.
    """
    x, codes = as_tensor(x, "x").double(), as_tensor(codes, "codes").double()
    if x.ndim != 2 or codes.ndim != 2 or x.shape[0] != codes.shape[0]:
        raise SVToolsError(f"x (n, d) and codes (n, c) must have the same n; got {tuple(x.shape)}, {tuple(codes.shape)}")
    check_finite(x, "x")
    check_finite(codes, "codes")
    mc, mx = codes.mean(0), x.mean(0)
    G, X = codes - mc, x - mx
    C = G.T @ G
    lam = ridge * float(torch.trace(C)) / C.shape[0]
    P = torch.linalg.solve(C + lam * torch.eye(C.shape[0], dtype=C.dtype), G.T @ X).T  # (d, c)
    res = X - G @ P.T
    r2 = 1.0 - float((res ** 2).sum() / (X ** 2).sum().clamp_min(1e-300))
    return P.float(), (mx - P @ mc).float(), r2


def input_part(qk: QKSVD) -> QKSVD:
    """The ``x`` part of homogeneous singular vectors (constant coordinate dropped), as a bias-free
    :class:`~svtools.qk.QKSVD` (columns no longer unit: normalise before taking cosines)."""
    if not qk.has_bias:
        return qk
    return QKSVD(U=qk.U[..., :-1, :], S=qk.S, V=qk.V[..., :-1, :], has_bias=False, rotary=qk.rotary)


def second_moment(x: Float[Tensor, "n d"], *, centre: bool = True) -> Float[Tensor, "d d"]:
    """``E[x x^T]`` over rows (``centre=True``: the covariance, ``E[(x - mu)(x - mu)^T]``), float64."""
    x = as_tensor(x, "x").double()
    if centre:
        x = x - x.mean(0)
    return x.T @ x / x.shape[0]


def _cos(f: Tensor, B: Tensor) -> Tensor:
    f = f / f.norm(dim=-1, keepdim=True)
    B = B / B.norm(dim=-2, keepdim=True)
    return (f.to(B.dtype) @ B).abs()


def alignment(features: Float[Tensor, "f d"], vectors: Float[Tensor, "... d r"]) -> Float[Tensor, "... f r"]:
    """``|cos|`` between each feature direction and each column of ``vectors`` (both normalised)."""
    features = as_tensor(features, "features")
    vectors = as_tensor(vectors, "vectors")
    if features.ndim == 1:
        features = features[None]
    if features.shape[-1] != vectors.shape[-2]:
        raise SVToolsError(f"features have {features.shape[-1]} dims, vectors {vectors.shape[-2]}")
    return _cos(features.double(), vectors.double())


def unwhitened_alignment(features: Float[Tensor, "f d"], qk: QKSVD, Sigma_X: Float[Tensor, "d d"],
                         Sigma_Y: Optional[Float[Tensor, "d d"]] = None) -> tuple[Tensor, Tensor]:
    """``|cos|`` of features with the un-whitened singular vectors ``Sigma_X u_k`` and ``Sigma_Y v_k``.

    :func:`svtools.theory.unwhiten` of the ``x`` part of ``qk`` (:func:`input_part`). Returns
    ``(query side (..., f, r), key side (..., f, r))``.
    """
    U, V = unwhiten(input_part(qk).to(torch.float64), torch.as_tensor(Sigma_X).double(),
                    None if Sigma_Y is None else torch.as_tensor(Sigma_Y).double())
    return alignment(features, U), alignment(features, V)


def alignment_null(features: Float[Tensor, "f d"], r: int, n_draws: int = 1000, *,
                   Sigma: Optional[Float[Tensor, "d d"]] = None, seed: int = 0) -> Float[Tensor, "n_draws f"]:
    """Null distribution of ``max_k |cos(feature, b_k)|`` for random bases of ``r`` directions.

    Each draw takes ``r`` orthonormal columns of a Haar-random ``d x d`` rotation
    (:func:`svtools.random_rotation`, seeded; the same draws for every feature) and, with
    ``Sigma``, passes them through the same map the un-whitened singular vectors get
    (``Sigma b_k``): a covariance-matched null for :func:`unwhitened_alignment` (a feature that
    lies along ``Sigma``'s large directions looks aligned with ``Sigma v`` by chance as often as
    this says). Without ``Sigma``, the null of :func:`alignment`. ``features``: ``(f, d)`` or
    ``(d,)`` (then the result is ``(n_draws,)``).
    """
    F = as_tensor(features, "features").double()
    one = F.ndim == 1
    F = F.reshape(-1, F.shape[-1])
    d = F.shape[-1]
    r = as_int(r, "r", min_value=1, max_value=d)
    n_draws = as_int(n_draws, "n_draws", min_value=1)
    B = random_rotation((n_draws,), d, seed=as_int(seed, "seed"), dtype=torch.float64)[..., :r]
    if Sigma is not None:
        B = torch.as_tensor(Sigma).double() @ B
    out = _cos(F, B).amax(-1).float()  # (n_draws, f)
    return out[:, 0] if one else out


def bilinear_mass(qk: QKSVD, P: Float[Tensor, "d c"], R: Float[Tensor, "d c"], *,
                  C: Optional[Float[Tensor, "c c"]] = None, offset: Optional[int] = None) -> Float[Tensor, "... r"]:
    """How a pair of code features is split over a head's singular directions.

    If the query input carries a code ``g`` as ``P g`` and the key input carries a code ``h`` as
    ``R h``, the part of the score that depends on whether the two codes are the same is, in
    expectation over codes of covariance ``C`` (default: identity),
    ``E[(P g)^T Omega (R g)] - E[(P g)^T Omega (R h)] = trace(C P^T Omega R)``; its ``k``-th term
    is ``m_k = sigma_k u_k^T P C R^T v_k``. Identity: ``m.sum(-1) == trace(C P^T Omega_x R)``
    with ``Omega_x`` the ``x`` block of ``Omega~`` (tested). Computed as the sum over code
    coordinates of :func:`svtools.sad_terms` of the columns of ``P C^(1/2)`` and ``R C^(1/2)``
    (with a 0 constant coordinate: directions, not inputs).

    A negative total means the head attends *away* from the key whose code matches the query's.
    """
    P, R = as_tensor(P, "P").double(), as_tensor(R, "R").double()
    if P.ndim != 2 or P.shape != R.shape or P.shape[0] != qk.d_model:
        raise SVToolsError(f"P and R must both be (d_model={qk.d_model}, c); got {tuple(P.shape)}, {tuple(R.shape)}")
    if C is not None:
        C = as_tensor(C, "C").double()
        w, Q = torch.linalg.eigh((C + C.T) / 2)
        if float(w.min()) < -1e-9 * float(w.abs().max()):
            raise SVToolsError("C must be a covariance (positive semi-definite)")
        root = Q @ torch.diag(w.clamp_min(0).sqrt()) @ Q.T
        P, R = P @ root, R @ root
    qk64 = qk.to(torch.float64)
    pad = lambda M: torch.cat([M.T, torch.zeros(M.shape[1], 1, dtype=M.dtype)], -1) if qk.has_bias else M.T  # noqa: E731
    a, b = pad(P), pad(R)  # (c, d_in): one direction per code coordinate
    lead = qk64.batch_shape if qk64.rotary is None else qk64.batch_shape[:-1]
    shape = (a.shape[0],) + (1,) * len(lead) + (a.shape[1],)
    return sad_terms(qk64, a.reshape(shape), b.reshape(shape), offset=offset).sum(0)


# ----------------------------------------------------------------------------- the IOI model's features

#: The code-feature pairs :func:`code_mass_table` reads: (query-side map, key-side map).
CODE_PAIRS = {"S code at END x name code at key": ("S@END", "name@key"),
              "IO code at END x name code at key": ("IO@END", "name@key")}


@dataclass
class IOIFeatures:
    """Known features of IOI prompts in one layer's attention input space (:func:`ioi_features`).

    Attributes:
        layer: the layer whose query/key inputs they are measured in.
        directions: ``{"name", "first_slot"}`` unit key-side directions (:func:`feature_directions`).
        maps: ``{"S@END", "IO@END", "name@key", "name@unembed"}``: ``(d_model, d_model)`` code maps
            (:func:`code_map`): the S and IO names' codes at END's input, a name's code at its own
            key input, and in its unembedding column (tied embeddings: the identity).
        r2: share of variance each map explains.
        code_cov: ``(d_model, d_model)`` covariance of the names' codes (embedding rows) in the prompts.
        sigma_query, sigma_key: covariances of the query inputs at END and of the key inputs at
            every real position but the first (for un-whitening).
        prompts: how many prompts they were estimated on.
    """

    layer: int
    directions: dict[str, Tensor]
    maps: dict[str, Tensor]
    r2: dict[str, float]
    code_cov: Tensor
    sigma_query: Tensor
    sigma_key: Tensor
    prompts: int


def ioi_features(model: Any, dataset: Any, layer: int) -> IOIFeatures:
    """Measure :class:`IOIFeatures` on ``dataset`` in ``layer``'s attention inputs.

    The codes are the names' rows of the model's embedding ``W_E`` (in the IOI language model:
    the fixed random codes of :func:`svtools.ioi_lm.name_codes`). Use prompts with many
    different names (at least ``d_model`` of them, e.g. the ``"test_templates"`` split, 240
    names) so the code maps are determined.
    """
    xq, xk, pos, am = head_inputs(model, dataset, layer)
    W_E = model.W_E.detach().float().cpu()
    r = torch.arange(len(pos.io))
    c_io, c_s = W_E[pos.io_id.cpu()], W_E[pos.s_id.cpu()]
    maps, r2 = {}, {}
    ids = torch.unique(torch.cat([pos.io_id, pos.s_id]).cpu())
    W_U = model.W_U.detach().float().cpu()
    for name, x, c in (("S@END", xq[r, pos.end], c_s), ("IO@END", xq[r, pos.end], c_io),
                       ("name@key", torch.cat([xk[r, pos.io], xk[r, pos.s1]]), torch.cat([c_io, c_s])),
                       ("name@unembed", W_U[:, ids].T, W_E[ids])):
        maps[name], _, r2[name] = code_map(x, c)
    keys = am.bool().clone()
    keys[:, 0] = False
    codes = torch.cat([c_io, c_s]).double()
    return IOIFeatures(layer=layer, directions=feature_directions(xk, pos, am), maps=maps, r2=r2,
                       code_cov=torch.cov(codes.T), sigma_query=second_moment(xq[r, pos.end]),
                       sigma_key=second_moment(xk[keys]), prompts=len(r))


def alignment_table(feats: IOIFeatures, qk: QKSVD, heads: Sequence[int], *, n_null: int = 1000,
                    seed: int = 0) -> pd.DataFrame:
    """Alignment of each head's right singular vectors (key side) with the key-side features.

    ``qk``: the decomposition of ``feats.layer``'s heads (``(head, d_in, r)``, rows in the order of
    ``heads``). For each head and feature (``name``, ``first_slot``) and each reading (``raw``:
    ``v_k``; ``unwhitened``: ``Sigma_key v_k``): ``max_cos`` = ``max_k |cos|``, ``best_k``
    (its index, by singular value rank), ``null_q95`` (95th percentile of the same statistic for
    random bases of ``r`` directions passed through the same map, :func:`alignment_null`,
    ``n_null`` draws) and ``p_null`` (share of those draws at least as large).
    """
    names = list(feats.directions)
    F = torch.stack([feats.directions[n] for n in names])
    raw = alignment(F, input_part(qk).V)  # (head, f, r)
    _, unw = unwhitened_alignment(F, qk, feats.sigma_query, feats.sigma_key)
    nulls = {"raw": alignment_null(F, qk.r, n_null, seed=seed).double(),
             "unwhitened": alignment_null(F, qk.r, n_null, Sigma=feats.sigma_key, seed=seed).double()}
    rows = []
    for j, name in enumerate(names):
        for reading, cos in (("raw", raw), ("unwhitened", unw)):
            null = nulls[reading][:, j]
            for i, h in enumerate(heads):
                c = cos[i, j]
                best = float(c.max())
                rows.append({"head": int(h), "feature": name, "reading": reading, "max_cos": best,
                             "best_k": int(c.argmax()), "null_q95": float(null.quantile(0.95)),
                             "p_null": float((null >= best).double().mean())})
    return pd.DataFrame(rows)


def code_mass_table(feats: IOIFeatures, qk: QKSVD, heads: Sequence[int]) -> pd.DataFrame:
    """:func:`bilinear_mass` of each pair of :data:`CODE_PAIRS` over each head's singular directions.

    Codes are weighted by their covariance in the prompts (``feats.code_cov``), so a mass is in
    units of the (unscaled) score: the expected score gain of a key whose name code matches the
    query's (S or IO code at END) over one whose code does not. Long frame: ``head``, ``pair``,
    ``k``, ``sigma``, ``mass``, ``share`` (``|mass| / sum |mass|`` over ``k``).
    """
    rows = []
    for label, (q, k) in CODE_PAIRS.items():
        m = bilinear_mass(qk, feats.maps[q], feats.maps[k], C=feats.code_cov)  # (head, r)
        share = m.abs() / m.abs().sum(-1, keepdim=True).clamp_min(1e-300)
        for i, h in enumerate(heads):
            for kk in range(qk.r):
                rows.append({"head": int(h), "pair": label, "k": kk, "sigma": float(qk.S[i, kk]),
                             "mass": float(m[i, kk]), "share": float(share[i, kk])})
    return pd.DataFrame(rows)
