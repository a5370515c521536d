"""Input validation shared by every public function: clear errors, never silent wrong answers."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


class SVToolsError(ValueError):
    """Raised for bad input: wrong shapes, non-finite values, unknown layers or heads."""


def as_tensor(x, name: str) -> Tensor:
    """Return ``x`` as a floating tensor, or raise naming the argument."""
    if not isinstance(x, Tensor):
        try:
            x = torch.as_tensor(x)
        except Exception as exc:  # pragma: no cover - message only
            raise SVToolsError(f"{name} must be a tensor, got {type(x).__name__}") from exc
    if not torch.is_floating_point(x):
        x = x.to(torch.get_default_dtype())
    return x


def check_finite(x: Tensor, name: str) -> None:
    """Raise if ``x`` holds NaN or infinity."""
    if not bool(torch.isfinite(x).all()):
        n_bad = int((~torch.isfinite(x)).sum())
        raise SVToolsError(f"{name} contains {n_bad} non-finite value(s) (NaN or inf)")


def check_ndim(x: Tensor, min_ndim: int, name: str, shape_doc: str) -> None:
    """Raise unless ``x`` has at least ``min_ndim`` dimensions."""
    if x.ndim < min_ndim:
        raise SVToolsError(f"{name} must have shape {shape_doc}, got {tuple(x.shape)}")


def check_last_dims(x: Tensor, expected: Sequence[int | None], name: str, shape_doc: str) -> None:
    """Raise unless the trailing dimensions of ``x`` equal ``expected`` (``None`` = any)."""
    check_ndim(x, len(expected), name, shape_doc)
    got = tuple(x.shape[x.ndim - len(expected):])
    for g, e in zip(got, expected):
        if e is not None and g != e:
            raise SVToolsError(f"{name} must have shape {shape_doc}, got {tuple(x.shape)}")


def broadcast_leading(shapes: Sequence[torch.Size], names: Sequence[str]) -> torch.Size:
    """Broadcast leading (batch) shapes or raise naming the arguments that disagree."""
    try:
        return torch.broadcast_shapes(*shapes)
    except RuntimeError as exc:
        desc = ", ".join(f"{n}: {tuple(s)}" for n, s in zip(names, shapes))
        raise SVToolsError(f"leading (batch) dimensions do not broadcast ({desc})") from exc
