"""The IOI LM's training data, step by step: the name codes and each step's batch.

Everything here is a function of the config, the run's seed and the step (its own generators;
torch's global generator, which draws the attention dropout, is never touched), so a step's data
can be computed ahead of the step that uses it (:class:`svtools.runtime.Prefetch`, in
:func:`svtools.ioi_lm.train`) without changing a single weight.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch
from torch import Tensor

from svtools._checks import SVToolsError, as_seed
from svtools.ioi_lm.language import encode, name_ids, training_batch

if TYPE_CHECKING:
    from svtools.ioi_lm.training import IOILMConfig

__all__ = ["SEED_MAX", "name_codes", "step_data"]

#: Seeds of :func:`svtools.ioi_lm.train` lie in ``[0, SEED_MAX]`` (the name codes derive generator seeds from it).
SEED_MAX = 2**32 - 1


def name_codes(cfg: "IOILMConfig", seed: int, step: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """The name embeddings when ``cfg.freeze_names``: ``(ids, codes)``, ``codes`` ``(names, d_model)``.

    ``codes[i] = name_shared * n + g_i / sqrt(d_model)``: one unit vector ``n`` shared by every
    name (so a name is recognisable as a name) plus an independent Gaussian code ``g_i ~ N(0, I)``
    per name. ``n`` is drawn from a generator seeded by ``seed``.

    ``step=None``: the run's fixed codes (``g_i`` from the same generator), the name rows of every
    saved checkpoint. ``step=k``: the codes the training step ``k`` uses when
    ``cfg.resample_names`` (same ``n``, fresh ``g_i`` from a generator seeded by ``seed`` and
    ``k``). Training never learns these rows (the embedding is tied to the unembedding, so neither
    side of a name is learnt): nothing in the model is specific to one name, and any name, held out
    or not, is to the model a draw from the same distribution.
    """
    if step is not None and (isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0):
        raise SVToolsError(f"step must be None or a non-negative int, got {step!r}")
    seed = as_seed(seed, "seed", max_value=SEED_MAX)
    g = torch.Generator().manual_seed(int(seed) + 7919)
    n = torch.randn(cfg.d_model, generator=g, dtype=torch.float64)
    n = n / n.norm()
    ids = name_ids()
    if step is not None:
        g = torch.Generator().manual_seed((int(seed) + 7919) * 1_000_003 + int(step) + 1)
    g_codes = torch.randn(len(ids), cfg.d_model, generator=g, dtype=torch.float64)
    codes = cfg.name_shared * n + g_codes / math.sqrt(cfg.d_model)
    return ids, codes.float()


def step_data(cfg: "IOILMConfig", seed: int, tok: Any, step: int
              ) -> tuple[Optional[Tensor], Tensor, Tensor, Tensor]:
    """Training step ``step``'s data: ``(codes, ids, am, w)``.

    ``codes``: ``(names, d_model)`` the name codes of this step when ``cfg.resample_names``
    (:func:`name_codes` with ``step``), else None; ``ids``, ``am``: ``(batch, seq)`` right-padded
    token ids and attention mask of ``cfg.batch`` fresh sequences
    (:func:`svtools.ioi_lm.language.training_batch`, seeded by the seed and the step); ``w``:
    ``(batch, seq - 1)`` the weight of each target token: 1, ``cfg.answer_weight`` at an IOI
    sentence's answer (the target two before the end: "... to IO ."), 0 at padding.
    """
    codes = name_codes(cfg, seed, step)[1] if cfg.freeze_names and cfg.resample_names else None
    texts, is_ioi = training_batch(cfg.batch, seed * 1_000_003 + step, cfg.ioi_fraction, cfg.filler_test_share)
    ids, am = encode(tok, texts)
    w = am[:, 1:].to(torch.float32)
    if cfg.answer_weight != 1.0:
        last = am.sum(1) - 1  # index of the final "." in ids; the answer target is at last - 2
        rows = torch.nonzero(torch.tensor(is_ioi)).flatten()
        w[rows, last[rows] - 2] = cfg.answer_weight
    return codes, ids, am, w
