"""Input validation shared by every public function: clear errors, never silent wrong answers.

The package's two error classes live here, at the bottom of the package: :class:`SVToolsError`
(bad input) and :class:`UnsupportedModelError` (a model whose attention svtools does not
decompose exactly; published as ``svtools.models.UnsupportedModelError``).

One helper per kind of argument, so every module rejects the same mistakes with the same words
(each takes the value and the argument's name, returns the value in its canonical Python type and
raises :class:`SVToolsError` naming the argument; a new module calls them on every public
argument and gets the same behaviour for free):

* :func:`as_tensor` (real floating tensors), :func:`check_finite`, :func:`check_ndim`,
  :func:`check_last_dims`, :func:`broadcast_leading` (shapes);
* :func:`as_int` / :func:`as_indices` (integers and index lists: Python and numpy integers and
  integer tensors are accepted; floats, bools and strings are rejected rather than truncated);
* :func:`as_float` (finite real numbers, numpy scalars included, optionally in a range);
* :func:`as_bool` (``True``/``False`` and numpy bools only: ``"no"`` is not silently true);
* :func:`as_seed` (a non-negative integer seed, never truncated from a float);
* :func:`as_choice` (one of a fixed set of strings, the error listing them);
* :func:`as_names` (a column name or a sequence of them: ``by="layer"`` is one column, not four);
* :func:`check_columns`, :func:`check_numeric_columns` (a pandas frame and the columns it needs);
* :func:`check_memory` (an allocation that would not fit: refused before it is tried);
* :func:`as_dtype` (a floating ``torch.dtype`` or its name).
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor


class SVToolsError(ValueError):
    """Raised for bad input: wrong shapes, non-finite values, unknown layers or heads."""


class UnsupportedModelError(SVToolsError):
    """The model's attention has a mechanism svtools does not decompose exactly."""


def as_tensor(x, name: str) -> Tensor:
    """Return ``x`` as a real floating tensor, or raise naming the argument.

    Integer and boolean inputs are converted to the default float dtype; complex inputs and
    things that are not numbers are rejected.
    """
    if not isinstance(x, Tensor):
        try:
            x = torch.as_tensor(x)
        except Exception as exc:
            raise SVToolsError(f"{name} must be a tensor (or array of numbers), got {type(x).__name__}") from exc
    if x.is_complex():
        raise SVToolsError(f"{name} is complex ({x.dtype}); svtools works with real tensors only")
    if not torch.is_floating_point(x):
        x = x.to(torch.get_default_dtype())
    return x


def _is_int_like(x: Any) -> bool:
    if isinstance(x, (bool, np.bool_)):
        return False
    if isinstance(x, (int, np.integer)):
        return True
    if isinstance(x, Tensor) and x.ndim == 0 and not x.is_floating_point() and not x.is_complex() \
            and x.dtype != torch.bool:
        return True
    if isinstance(x, np.ndarray) and x.ndim == 0 and np.issubdtype(x.dtype, np.integer):
        return True
    return False


def as_int(x: Any, name: str, *, min_value: Optional[int] = None, max_value: Optional[int] = None) -> int:
    """``x`` as a Python int, or raise naming ``name``.

    Accepts ``int``, numpy integers (``np.int64(3)``) and 0-d integer tensors/arrays; rejects
    ``bool``, floats (``2.0``, ``1.7``: never truncated), strings and everything else.
    ``min_value``/``max_value`` are inclusive bounds.
    """
    if not _is_int_like(x):
        what = type(x).__name__
        hint = " (floats are not truncated: pass an int)" if isinstance(x, (float, np.floating)) or (
            isinstance(x, Tensor) and x.is_floating_point()) else ""
        raise SVToolsError(f"{name} must be an integer, got {x!r} of type {what}{hint}")
    v = int(x)
    if min_value is not None and v < min_value:
        raise SVToolsError(f"{name} must be >= {min_value}, got {v}")
    if max_value is not None and v > max_value:
        raise SVToolsError(f"{name} must be <= {max_value}, got {v}")
    return v


def is_index_sequence(x: Any) -> bool:
    """Whether ``x`` is a 1-D collection (list, tuple, range, 1-D array/tensor), not a scalar."""
    if isinstance(x, (str, bytes)) or _is_int_like(x):
        return False
    if isinstance(x, (Tensor, np.ndarray)):
        return x.ndim == 1
    return isinstance(x, (list, tuple, range))


def as_indices(x: Any, name: str, *, n: Optional[int] = None, allow_negative: bool = False,
               allow_empty: bool = False) -> list[int]:
    """A scalar or 1-D collection of integers as a list of Python ints, or raise naming ``name``.

    Accepts what :func:`as_int` accepts, and lists/tuples/ranges of them, 1-D integer numpy arrays
    and tensors. With ``n``, each index must lie in ``[0, n)`` (or ``[-n, n)`` with
    ``allow_negative``; negatives are then returned as is).
    """
    if _is_int_like(x):
        items = [x]
    elif isinstance(x, (Tensor, np.ndarray)):
        if x.ndim != 1:
            raise SVToolsError(f"{name} must be an integer or a 1-D list of integers, got shape {tuple(x.shape)}")
        is_float = x.is_floating_point() or x.dtype == torch.bool if isinstance(x, Tensor) else \
            not np.issubdtype(x.dtype, np.integer)
        if is_float:
            raise SVToolsError(f"{name} must hold integers, got dtype {x.dtype} (floats are not truncated)")
        items = [int(v) for v in x.tolist()]
    elif isinstance(x, (list, tuple, range)):
        items = list(x)
    else:
        raise SVToolsError(f"{name} must be an integer or a list of integers, got {type(x).__name__}")
    out = [as_int(v, f"each entry of {name}") for v in items]
    if not out and not allow_empty:
        raise SVToolsError(f"{name} is empty")
    if n is not None:
        lo = -n if allow_negative else 0
        bad = [v for v in out if not lo <= v < n]
        if bad:
            raise SVToolsError(f"{name}: index out of range, each must lie in [{lo}, {n}), got {bad[:8]}")
    return out


def as_float(x: Any, name: str, *, lo: Optional[float] = None, hi: Optional[float] = None,
             lo_open: bool = False, hi_open: bool = False) -> float:
    """``x`` as a finite Python float, or raise naming ``name`` (None, bools, strings, NaN, inf rejected).

    ``lo``/``hi``: bounds, closed unless ``lo_open``/``hi_open``.
    """
    ok = isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))
    if isinstance(x, Tensor) and x.ndim == 0 and not x.is_complex() and x.dtype != torch.bool:
        ok = True
    if not ok:
        raise SVToolsError(f"{name} must be a real number, got {x!r} of type {type(x).__name__}")
    v = float(x)
    if not math.isfinite(v):
        raise SVToolsError(f"{name} must be finite, got {v}")
    if lo is not None and (v < lo or (lo_open and v == lo)) or hi is not None and (v > hi or (hi_open and v == hi)):
        rng = ("(" if lo_open else "[") + f"{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}" + \
            (")" if hi_open else "]")
        raise SVToolsError(f"{name} must be in {rng}, got {v}")
    return v


_DTYPE_NAMES = {"float16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
                "float32": torch.float32, "float": torch.float32, "float64": torch.float64,
                "double": torch.float64}


def as_dtype(x: Any, name: str = "dtype") -> Optional[torch.dtype]:
    """A floating ``torch.dtype`` from a dtype or its name (``"float64"``, ``"torch.float16"``); None passes.

    Integer, boolean and complex dtypes are rejected: they would truncate or mis-handle weights.
    """
    if x is None:
        return None
    dt = x
    if isinstance(x, str):
        dt = _DTYPE_NAMES.get(x.lower().removeprefix("torch."))
        if dt is None:
            raise SVToolsError(f"{name} must be a floating dtype such as torch.float32 or 'float64', got {x!r}")
    elif not isinstance(x, torch.dtype):
        try:
            dt = torch.from_numpy(np.zeros(0, dtype=np.dtype(x))).dtype
        except Exception:
            raise SVToolsError(f"{name} must be a torch dtype such as torch.float32, got {x!r}") from None
    if not dt.is_floating_point:
        raise SVToolsError(f"{name} must be a real floating dtype (float16, bfloat16, float32, float64), got {dt}")
    return dt


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


def as_bool(x: Any, name: str) -> bool:
    """``x`` as a Python bool, or raise naming ``name``: only ``True``/``False`` (and numpy bools).

    Strings (``"no"`` would be truthy), numbers and None are rejected rather than read as a truth value.
    """
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    raise SVToolsError(f"{name} must be True or False, got {x!r} of type {type(x).__name__}")


#: Largest seed :func:`as_seed` accepts by default (what ``torch.Generator.manual_seed`` takes
#: with room for the small offsets svtools adds to derive its streams).
SEED_MAX = 2**63 - 1


def as_seed(x: Any, name: str = "seed", *, max_value: int = SEED_MAX) -> int:
    """A random seed: an integer in ``[0, max_value]`` (numpy integers accepted), as a Python int.

    Floats (``1.7`` would be truncated), bools, strings and negative numbers (numpy's generators
    reject them) raise :class:`SVToolsError` naming ``name``.
    """
    return as_int(x, name, min_value=0, max_value=max_value)


def as_choice(x: Any, name: str, choices: Iterable[Any]) -> Any:
    """``x`` if it is one of ``choices`` (compared with ``==``, hashable values), else raise listing them."""
    choices = tuple(choices)
    try:
        ok = x in choices
    except Exception:  # an unhashable or incomparable value
        ok = False
    if not ok or isinstance(x, (bool, np.bool_)) and not any(isinstance(c, bool) for c in choices):
        raise SVToolsError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {x!r}")
    return x


def as_names(x: Any, name: str, *, allow_empty: bool = True) -> list[str]:
    """Column (or other) names: one string or a list/tuple of strings, as a list.

    ``by="layer"`` is the one column ``["layer"]`` (never the characters ``l, a, y, e``).
    """
    if isinstance(x, str):
        return [x]
    if isinstance(x, (list, tuple)) and all(isinstance(v, str) for v in x):
        out = list(x)
        if not out and not allow_empty:
            raise SVToolsError(f"{name} is empty")
        if len(set(out)) != len(out):
            raise SVToolsError(f"{name} names a column twice: {out}")
        return out
    raise SVToolsError(f"{name} must be a column name or a list of column names, got {x!r}")


def check_columns(df: Any, columns: Iterable[str], what: str) -> None:
    """Raise unless ``df`` is a pandas DataFrame holding every one of ``columns``.

    ``what`` names the function (or argument) in the message, which lists the missing columns
    and those the frame has.
    """
    import pandas as pd

    if not isinstance(df, pd.DataFrame):
        raise SVToolsError(f"{what} needs a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise SVToolsError(f"{what}: the frame lacks column(s) {missing}; it has {list(df.columns)}")


def check_numeric_columns(df: Any, columns: Iterable[str], what: str) -> None:
    """Raise unless each of ``columns`` of ``df`` holds real numbers (int, float; not bool or objects)."""
    import pandas as pd

    bad = [c for c in columns if not pd.api.types.is_numeric_dtype(df[c]) or pd.api.types.is_bool_dtype(df[c])]
    if bad:
        kinds = {c: str(df[c].dtype) for c in bad}
        raise SVToolsError(f"{what}: column(s) {bad} do not hold numbers ({kinds}); pick numeric columns")


def _memory_of(device: Any) -> Optional[int]:
    """Bytes of memory on ``device`` (total, not free); None when unknown."""
    import torch as _torch

    dev = _torch.device(device) if device is not None else _torch.device("cpu")
    if dev.type == "cuda":
        try:
            return int(_torch.cuda.get_device_properties(dev).total_memory)
        except Exception:  # pragma: no cover - no CUDA runtime
            return None
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):  # pragma: no cover - not a POSIX system
        return None


def check_memory(nbytes: float, name: str, *, device: Any = None, what: str = "this") -> None:
    """Raise naming ``name`` when an allocation of ``nbytes`` could not fit in ``device``'s memory.

    Checked against the device's *total* memory (so it refuses what can never work, e.g. a
    dictionary of 2**40 codes, before torch tries, fails deep inside, or the OS kills the process);
    it is not a promise that smaller requests fit next to everything else.
    """
    total = _memory_of(device)
    if total is not None and nbytes > total:
        raise SVToolsError(f"{name} is too large: {what} needs about {nbytes / 2**30:.3g} GiB, more than the "
                           f"{total / 2**30:.3g} GiB of memory of this device")
