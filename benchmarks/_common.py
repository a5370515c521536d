"""Helpers shared by the benchmark scripts: devices, timing, peak memory, prompts, the floor.

Every script prints ratios measured side by side in one process; absolute times on a shared
machine drift from run to run, the ratios are what to compare, and each ratio is printed with the
machine's load and torch's thread count beside it (:func:`machine`).
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import time
from typing import Any, Callable

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def parser(doc: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda (untested: no GPU was available)")
    ap.add_argument("--repeats", type=int, default=2, help="best of this many runs per method")
    return ap


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(key + r":\s+(\d+)", f.read()).group(1)) * 1024


class Peak:
    """Peak memory of a block above what was in use when it started, in bytes.

    CPU: the process' peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``) minus
    the resident set at the start. CUDA: ``torch.cuda.max_memory_allocated`` above the start.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.bytes = 0

    def __enter__(self) -> "Peak":
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.start = _status("VmRSS")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self.start
        else:
            self.bytes = _status("VmHWM") - self.start


def timed(fn: Callable[[], Any], repeats: int, device: torch.device) -> tuple[float, float, Any]:
    """``(best seconds, peak bytes of the first run, result)``."""
    best, peak, out = float("inf"), 0, None
    for i in range(repeats):
        out = None
        gc.collect()
        with Peak(device) as p:
            sync(device)
            t = time.perf_counter()
            out = fn()
            sync(device)
            dt = time.perf_counter() - t
        best = min(best, dt)
        peak = max(peak, p.bytes)
    return best, peak, out


def bandwidth(device: torch.device, nbytes: int = 512 * 2**20) -> float:
    """Measured write bandwidth (bytes/s): filling a ``nbytes`` float32 tensor, best of 5."""
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        x.fill_(1.0)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return nbytes / best


def text_ids(model: Any, n_prompts: int, length: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_prompts`` prompts of exactly ``length`` tokens of the book's plain English sentences.

    Each prompt: the sentences in a seeded order, tokenised without special tokens, cut to fit;
    BERT-style models get ``[CLS]`` first and ``[SEP]`` last, BOS-prepending models a BOS.
    """
    import random

    from svtools.data.text import PLAIN_SENTENCES
    from svtools.bridge import prepends_bos

    tok = model.tokenizer
    pieces = [tok(s, add_special_tokens=False)["input_ids"] for s in PLAIN_SENTENCES]
    head, tail = [], []
    if getattr(tok, "cls_token_id", None) is not None and getattr(tok, "sep_token_id", None) is not None:
        head, tail = [tok.cls_token_id], [tok.sep_token_id]
    elif prepends_bos(model):
        head = [tok.bos_token_id]
    rng = random.Random(seed)
    rows = []
    for _ in range(n_prompts):
        body: list[int] = []
        while len(body) < length:
            body += pieces[rng.randrange(len(pieces))]
        rows.append(head + body[:length - len(head) - len(tail)] + tail)
    ids = torch.tensor(rows, dtype=torch.long)
    return ids, torch.ones_like(ids)


def hf_forward(model: Any, ids: torch.Tensor, am: torch.Tensor, batch: int | None = None) -> None:
    """The model's own HuggingFace forward pass with ``output_attentions=True`` (every layer),
    in chunks of ``batch`` prompts (default: all at once)."""
    hf = model.original_model
    batch = batch or len(ids)
    with torch.no_grad():
        for s in range(0, len(ids), batch):
            out = hf(input_ids=ids[s:s + batch], attention_mask=am[s:s + batch], output_attentions=True)
            del out


def gb(n: float) -> str:
    return f"{n / 2**30:.2f} GB"


def machine() -> str:
    """The machine's state beside a ratio: load average (1 and 5 min), cores this process may use,
    torch's thread count. Other load slows the methods unequally (multi-threaded kernels more than
    single-threaded ones): read ratios printed with a load near or above the core count as noisy."""
    one, five, _ = os.getloadavg()
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return f"load {one:.2f}/{five:.2f} (1/5 min) on {cores} cores, torch threads {torch.get_num_threads()}"


def describe(device: torch.device) -> str:
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}"
    malloc = " ".join(f"{k}={os.environ[k]}" for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
                      if k in os.environ) or "glibc malloc defaults (freed large blocks returned to the system)"
    return f"device: {device} ({where}); torch {torch.__version__}; {malloc}"
