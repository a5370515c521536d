"""IOI prompts on a model: token ids with the name positions, role labels, the known IOI heads.

The prompts themselves (templates, names, positions in a tokenizer's ids) are
:mod:`svtools.data.ioi`; this module puts them through a loaded model:

* :func:`ioi_tokens` — IOI prompts tokenised exactly as :func:`svtools.bridge.tokenize` does,
  with the IO, S1, S2 and END positions (checked against the ids);
* :func:`label_ioi_roles` — the IOI role of each query and key of a SAD frame;
* :data:`IOI_HEADS`, :func:`ioi_heads` — the IOI heads of GPT-2 small and Pythia-160M studied in
  the earlier papers;
* :func:`sparsity_over_checkpoints` — :func:`svtools.sad.head_sparsity` of chosen heads at each
  training checkpoint of a hub model (Pythia).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor

from svtools._checks import SVToolsError, check_columns
from svtools.bridge import check_bridge, prepends_bos, tokenize
from svtools.data.ioi import IOIDataset
from svtools.models import load_model
from svtools.runtime import tqdm
from svtools.sad.measure import head_sparsity

__all__ = ["ioi_tokens", "label_ioi_roles", "IOI_HEADS", "ioi_heads", "sparsity_over_checkpoints"]


def ioi_tokens(model: Any, dataset: Any) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"], Any]:
    """IOI prompts as :func:`svtools.bridge.tokenize` feeds them, with name positions.

    Tokenises ``dataset.texts`` with ``tokenize`` (the one tokenisation path), asks
    :meth:`~svtools.data.IOIDataset.positions` for the same layout (BOS prepended exactly when
    :func:`~svtools.bridge.prepends_bos` says so) and checks the identity
    ``ids[i, positions.io[i]] == positions.io_id[i]`` (same for S1, S2).

    Returns ``(ids, attention_mask, positions)`` (an :class:`~svtools.data.IOIPositions`).
    """
    check_bridge(model)
    if not isinstance(dataset, IOIDataset):
        raise SVToolsError(f"dataset must be an IOIDataset (svtools.data.ioi_prompts, or run.prompts for the IOI "
                           f"language model), got {type(dataset).__name__}")
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise SVToolsError("this model has no tokenizer; IOI prompts need one")
    ids, am = tokenize(model, dataset.texts)
    pos = dataset.positions(tok, prepend_bos=prepends_bos(model))
    if not torch.equal(am.sum(1).cpu(), pos.length.cpu()):
        raise SVToolsError("tokenize() and the IOI positions disagree on prompt lengths")
    r = torch.arange(len(ids))
    for name, p, want in (("IO", pos.io, pos.io_id), ("S1", pos.s1, pos.s_id), ("S2", pos.s2, pos.s_id)):
        if not torch.equal(ids[r, p.cpu()], want.cpu()):
            raise SVToolsError(f"IOI {name} positions do not point at the name tokens in tokenize()'s ids")
    return ids, am, pos


def label_ioi_roles(df: pd.DataFrame, positions: Any) -> pd.DataFrame:
    """Add ``query_role`` and ``key_role`` columns (IO, S1, S2, END or "other") to a pair frame.

    ``positions``: the :class:`~svtools.data.IOIPositions` of the prompts the frame was made on
    (row ``prompt`` of the frame = row of the positions). Returns a new frame.
    """
    check_columns(df, ["prompt", "query", "key"], "label_ioi_roles")
    p = df["prompt"].to_numpy()
    n = len(positions.io)
    if len(p) and (p.min() < 0 or p.max() >= n):
        raise SVToolsError(f"frame has prompt indices up to {p.max()} but positions cover {n} prompts")
    out = df.copy()
    for col in ("query", "key"):
        pos = out[col].to_numpy()
        role = np.full(len(out), "other", dtype=object)
        for name, t in (("END", positions.end), ("S2", positions.s2), ("S1", positions.s1), ("IO", positions.io)):
            role[t.cpu().numpy()[p] == pos] = name
        out[f"{col}_role"] = role
    return out


#: IOI heads (layer, head) studied in the earlier papers, per hub model name.
IOI_HEADS: dict[str, list[tuple[int, int]]] = {
    "gpt2": [(3, 0), (4, 11), (8, 6), (9, 6), (9, 9), (10, 0)],
    "EleutherAI/pythia-160m": [(2, 6), (4, 11), (7, 9), (8, 2), (8, 10), (10, 7)],
}


def ioi_heads(name: str) -> Optional[list[tuple[int, int]]]:
    """The IOI heads of :data:`IOI_HEADS` for a model name (case-insensitive; ``"gpt2-small"``
    and ``"pythia-160m"`` also match), or None when none are known for it."""
    key = str(name).lower().replace("gpt2-small", "gpt2")
    for k, v in IOI_HEADS.items():
        if key in (k.lower(), k.lower().split("/")[-1]):
            return list(v)
    return None


def sparsity_over_checkpoints(
    name: str,
    steps: Sequence[int],
    texts: Sequence[str],
    *,
    heads: Sequence[tuple[int, int]],
    progress: bool = True,
    **kwargs: Any,
) -> pd.DataFrame:
    """:func:`svtools.sad.head_sparsity` of ``heads`` at each training checkpoint of a hub model (Pythia).

    Loads ``load_model(name, checkpoint=step)`` for each step (needs the hub; raises
    :class:`svtools.HubUnavailableError` otherwise — no fallback: a checkpoint series of another
    model would be meaningless), runs :func:`~svtools.sad.head_sparsity` on ``texts`` and adds a ``step``
    column. ``kwargs`` go to :func:`~svtools.sad.head_sparsity` (e.g. ``attention="relative"``).
    """

    steps = [int(s) for s in steps]
    if not steps:
        raise SVToolsError("steps is empty")
    frames = []
    for step in tqdm(steps, desc=f"{name} checkpoints", disable=not progress):
        model = load_model(name, checkpoint=step)
        df = head_sparsity(model, list(texts), heads=list(heads), progress=False, **kwargs)
        df.insert(0, "step", step)
        frames.append(df)
        del model
    return pd.concat(frames, ignore_index=True)
