"""The IOI language model's accuracy: is the indirect object the model's answer at END?"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from svtools._checks import SVToolsError

__all__ = ["ioi_accuracy"]


def check_metric(metric: str) -> None:
    """Raise a clear error unless ``metric`` is one :func:`ioi_accuracy` knows."""
    if metric not in ("top1", "io_vs_s"):
        raise SVToolsError(f"metric must be 'top1' or 'io_vs_s', got {metric!r}")


def ioi_accuracy(logits: Float[Tensor, "batch vocab"], positions: Any, metric: str = "top1") -> float:
    """Share of prompts answered correctly from their next-token logits at END.

    ``metric="top1"``: ``argmax(logits[i]) == io_id[i]``; ``"io_vs_s"``: ``logits[i, io_id[i]] >
    logits[i, s_id[i]]``. ``positions``: the prompts' :class:`~svtools.data.IOIPositions`.
    """
    check_metric(metric)
    io, s = positions.io_id.to(logits.device), positions.s_id.to(logits.device)
    same = int((io == s).sum())
    if same:
        raise SVToolsError(f"in {same} of {len(io)} prompts IO and S are the same token: 'IO beats S' is never "
                           "true there and top-1 cannot tell them apart (names the tokenizer does not know?)")
    if logits.ndim != 2 or logits.shape[0] != len(io):
        raise SVToolsError(f"logits must have shape (batch={len(io)}, vocab), got {tuple(logits.shape)}")
    if metric == "top1":
        ok = logits.argmax(-1) == io
    else:
        r = torch.arange(len(io), device=logits.device)
        ok = logits[r, io] > logits[r, s]
    return float(ok.float().mean())


class EndLogitsMemo:
    """The END logits that :meth:`IOILMRun.accuracy <svtools.ioi_lm.IOILMRun.accuracy>` reads,
    remembered: the prompts are made and tokenised once per ``(n, seed, split)``, and the logits of
    the last ``keep`` checkpoints are kept, so both metrics at a checkpoint (or asking again) run the
    model once. The values are those of a fresh computation (the same forward pass on the same tokens).
    """

    def __init__(self, keep: int):
        self.keep = int(keep)
        self.inputs: dict[tuple, tuple[Any, Any]] = {}
        self.logits: dict[tuple, Tensor] = {}  # least recently used first

    def get(self, run: Any, step: int, n: int, seed: int, split: str) -> tuple[Float[Tensor, "batch vocab"], Any]:
        """``(logits, positions)``: ``run``'s END logits at ``step`` on ``run.prompts(n, seed, split)``."""
        where = (int(n), int(seed), split)
        if where not in self.inputs:
            ds = run.prompts(n, seed, split)
            self.inputs[where] = (ds.tokens(run.tokenizer), ds.positions(run.tokenizer))
        tokens, positions = self.inputs[where]
        key = (int(step), *where)
        logits = self.logits.pop(key, None)
        if logits is None:
            logits = run._end_logits(step, tokens)
        self.logits[key] = logits
        while len(self.logits) > self.keep:
            self.logits.pop(next(iter(self.logits)))
        return logits, positions
