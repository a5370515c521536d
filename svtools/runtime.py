"""Run-time settings shared by the chapters: scale, device, seeds, progress bars, the run's clock.

Progress bars are on for readers running a chapter in Jupyter or Colab. ``TQDM_DISABLE=1`` (tqdm's
own switch, honoured by every tqdm bar, including those of TransformerLens and the model hub)
turns them all off; the book's build sets it (``scripts/svtools_book.py``), because each refresh
of a bar would otherwise be kept in the built pages as stderr output.
"""

from __future__ import annotations

import os
import queue
import random
import threading
import time
import warnings
from typing import Any, Callable, Iterable

import numpy as np
import torch
from tqdm import TqdmWarning

__all__ = ["full_scale", "scale_name", "default_device", "seed_everything", "elapsed", "tqdm", "Prefetch"]

#: When svtools was first imported in this process (``time.perf_counter``; ``import svtools``
#: imports this module first).
STARTED = time.perf_counter()


def full_scale() -> bool:
    """True when ``SVTOOLS_FULL=1``: chapters run at paper scale instead of the fast default."""
    return os.environ.get("SVTOOLS_FULL", "0").strip().lower() in {"1", "true", "yes", "on"}


def scale_name() -> str:
    """``"paper scale (SVTOOLS_FULL=1)"`` or ``"fast default scale"``, for chapter captions."""
    return "paper scale (SVTOOLS_FULL=1)" if full_scale() else "fast default scale"


def default_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else ``cuda`` when available, else ``cpu``."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def elapsed() -> float:
    """Seconds since svtools was first imported in this process: in a notebook that imports svtools
    in its first cell, the chapter's run time so far (``svtools.report.glue_run_time``)."""
    return time.perf_counter() - STARTED


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (all devices); return a CPU generator seeded the same."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


# TransformerLens imports ``tqdm.auto``, which warns "IProgress not found" (with the path of the
# installed tqdm) in every Jupyter kernel that lacks ipywidgets. The text bar below shows the same
# progress, so the warning only adds noise: silence that one message, nothing else.
warnings.filterwarnings("ignore", message="IProgress not found", category=TqdmWarning)


def _bars_off() -> bool:
    return os.environ.get("TQDM_DISABLE", "").strip().lower() in {"1", "true", "yes", "on"}


def _pick_tqdm():
    """``tqdm.auto`` when notebook widgets can be drawn, else the plain text bar; off when
    ``TQDM_DISABLE=1`` even where the caller passes ``disable=False`` (``progress=True``).

    ``tqdm.auto`` without ipywidgets warns ("IProgress not found") in every notebook; the text
    bar shows the same progress without the warning.
    """
    try:
        import ipywidgets  # noqa: F401
        from tqdm.auto import tqdm as base
    except ImportError:
        from tqdm.std import tqdm as base

    class tqdm(base):  # noqa: N801 - the name readers know
        """tqdm's progress bar (``tqdm.auto`` or ``tqdm.std``, same arguments), off under ``TQDM_DISABLE=1``."""

        def __init__(self, *args, **kwargs):
            if _bars_off():  # tqdm's own TQDM_DISABLE only sets the default of ``disable``
                kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    tqdm.__module__ = __name__
    tqdm.__qualname__ = "tqdm"
    return tqdm


#: The progress bar every long loop of svtools uses (off when ``TQDM_DISABLE=1``, as in the build).
tqdm = _pick_tqdm()


class Prefetch:
    """``fn(item)`` for each of ``items``, in order, computed up to ``depth`` items ahead in a daemon
    thread: the caller's own work (torch kernels release the GIL) overlaps the next items'.

    Iterate over it; an exception raised by ``fn`` is raised by ``next`` (at the item where it
    happened); :meth:`close` stops the thread (call it when leaving early). ``fn`` must depend on
    its item only (not on state the caller changes meanwhile), so that the values are those an
    inline loop would compute.
    """

    def __init__(self, fn: Callable[[Any], Any], items: Iterable[Any], depth: int = 16) -> None:
        self._q: queue.Queue = queue.Queue(maxsize=max(1, int(depth)))
        self._stop = threading.Event()
        self._done = False

        def work() -> None:
            try:
                for item in items:
                    out = ("ok", fn(item))
                    while not self._put(out):
                        if self._stop.is_set():
                            return
                    if self._stop.is_set():
                        return
                self._put(("end", None), block=True)
            except BaseException as exc:  # handed to the consumer
                self._put(("error", exc), block=True)

        self._thread = threading.Thread(target=work, name="svtools-prefetch", daemon=True)
        self._thread.start()

    def _put(self, entry: tuple, block: bool = False) -> bool:
        while True:
            try:
                self._q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                if not block or self._stop.is_set():
                    return False

    def __iter__(self) -> "Prefetch":
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        kind, value = self._q.get()
        if kind == "ok":
            return value
        self._done = True
        if kind == "error":
            raise value
        raise StopIteration

    def close(self) -> None:
        """Stop the thread (it finishes the item it is computing)."""
        self._stop.set()
        self._thread.join(timeout=5)
