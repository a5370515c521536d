"""The IOI language model itself: config, model, training, the on-disk cache, a run and its accuracy.

:func:`train` trains a GPT-2-architecture model on :mod:`svtools.ioi_lm.language` (or loads the
cached run with the same config, seed and :data:`CODE_VERSION` from :func:`cache_dir`) and
returns an :class:`IOILMRun`: log-spaced checkpoints as safetensors, loadable as a
TransformerLens bridge, with prompts in the model's vocabulary and :func:`ioi_accuracy`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from svtools import _cache
from svtools._checks import SVToolsError, as_bool, as_float, as_int, as_seed
from svtools.data.ioi import IOIDataset, ioi_prompts
from svtools.ioi_lm.language import (FILLER_TEMPLATES, TEST_NAMES, TEST_TEMPLATES, TRAIN_NAMES, TRAIN_TEMPLATES,
                                     build_tokenizer, vocabulary)
from svtools.models import load_model
from svtools.ioi_lm.accuracy import EndLogitsMemo, check_metric, ioi_accuracy
from svtools.ioi_lm.batches import SEED_MAX, name_codes, step_data
from svtools.ioi_lm.gelu import NewGELU
from svtools.runtime import Prefetch, default_device, tqdm

#: AdamW's implementation: ``foreach`` (one kernel per operation over all parameters) instead of
#: torch's per-parameter loop on the CPU; bit-identical weights (checked over 300 default-config
#: steps). ``fused`` changed the numbers and is not used.
_ADAMW_KW: dict = {"foreach": True}

#: Train with :class:`svtools.ioi_lm.gelu.NewGELU` in the MLPs instead of transformers' ``NewGELUActivation``
#: (the same numbers, bit for bit; 3-4% of the training step's time, ``benchmarks/ioi_lm_step.py``).
_FUSED_GELU = True

#: Steps of data prepared ahead of the training loop, in a background thread (:class:`svtools.runtime.Prefetch`).
PREFETCH = 16

__all__ = ["IOILMConfig", "IOILMRun", "train", "train_seeds", "CODE_VERSION", "cache_dir", "name_codes"]

#: Bumped whenever a change to this module changes what ``train`` produces (it is part of the
#: cache key, so old cached runs are not reused after such a change).
CODE_VERSION = 4


def cache_dir() -> Path:
    """Where trained runs live: ``$SVTOOLS_CACHE/ioi_lm`` (default ``~/.cache/svtools/ioi_lm``)."""
    return _cache.root() / "ioi_lm"


# ----------------------------------------------------------------------------- config

@dataclass(frozen=True)
class IOILMConfig:
    """What to train.

    The default: 3 layers x 4 heads, ``d_model`` 64, 3,000 AdamW steps of 64 sequences, the
    loss at the IOI answer weighted 4x, attention dropout 0.1, name embeddings random codes that
    are never learnt and are drawn afresh at every training step (:func:`name_codes`), filler
    names drawn from the held-out names 70% of the time. Its accuracy, heads and training time
    for seeds 0-2 are printed by the emergence chapter (Part 3.3); why these choices, in the
    module docstring.

    Fields: ``n_layers``, ``n_heads``, ``d_model`` (GPT-2 architecture, MLP width ``4 d_model``);
    ``steps`` (optimiser steps), ``n_checkpoints`` (log-spaced checkpoint steps, step 0 and
    ``steps`` included; at least 2), ``batch`` (sequences per step), ``lr`` (AdamW peak learning
    rate: linear warm-up over ``warmup`` steps, then cosine decay to 10%), ``attn_dropout``
    (dropout on the attention probabilities while training; loaded checkpoints have none),
    ``weight_decay`` (on matrices, not on biases and LayerNorm gains), ``ioi_fraction`` (share of training
    sequences that are IOI sentences; the rest are one or two filler sentences),
    ``answer_weight`` (weight of the loss at an IOI sentence's answer token relative to every
    other token; 1 = plain language modelling), ``freeze_names`` (name embeddings fixed to
    :func:`name_codes`; False = learnt like every other word), ``resample_names`` (with
    ``freeze_names``: every training step uses fresh codes, ``name_codes(cfg, seed, step)``, and
    the checkpoints hold the fixed ones), ``name_shared`` (length of the shared name direction in
    those codes), ``buckets`` (each batch is run as this many groups of sequences of similar
    length, to cut padding; the loss and gradient are the batch's), ``filler_test_share``
    (probability that a name slot of a filler sentence gets a held-out name; None = uniform over
    all names), ``seed`` (default training seed; ``train(seed=...)`` overrides it).
    """

    n_layers: int = 3
    n_heads: int = 4
    d_model: int = 64
    steps: int = 3000
    n_checkpoints: int = 30
    batch: int = 64
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.2
    ioi_fraction: float = 0.6
    answer_weight: float = 4.0
    attn_dropout: float = 0.1
    freeze_names: bool = True
    filler_test_share: Optional[float] = 0.7
    name_shared: float = 0.5
    resample_names: bool = True
    buckets: int = 3
    seed: int = 0

    def __post_init__(self):
        # every field through the shared checks, stored as the plain Python type (numpy scalars
        # accepted; the cache key of equal values is equal)
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        for name in ("n_layers", "n_heads", "d_model", "steps", "n_checkpoints", "batch"):
            put(name, as_int(getattr(self, name), f"IOILMConfig.{name}", min_value=1))
        put("warmup", as_int(self.warmup, "IOILMConfig.warmup", min_value=0))
        put("buckets", as_int(self.buckets, "IOILMConfig.buckets", min_value=1, max_value=self.batch))
        put("seed", as_seed(self.seed, "IOILMConfig.seed", max_value=SEED_MAX))
        put("lr", as_float(self.lr, "IOILMConfig.lr", lo=0.0, lo_open=True))
        put("weight_decay", as_float(self.weight_decay, "IOILMConfig.weight_decay", lo=0.0))
        put("ioi_fraction", as_float(self.ioi_fraction, "IOILMConfig.ioi_fraction", lo=0.0, hi=1.0, lo_open=True))
        put("answer_weight", as_float(self.answer_weight, "IOILMConfig.answer_weight", lo=0.0, lo_open=True))
        put("attn_dropout", as_float(self.attn_dropout, "IOILMConfig.attn_dropout", lo=0.0, hi=1.0, hi_open=True))
        if self.filler_test_share is not None:
            put("filler_test_share", as_float(self.filler_test_share, "IOILMConfig.filler_test_share (or None)",
                                              lo=0.0, hi=1.0))
        put("name_shared", as_float(self.name_shared, "IOILMConfig.name_shared", lo=0.0))
        put("freeze_names", as_bool(self.freeze_names, "IOILMConfig.freeze_names"))
        put("resample_names", as_bool(self.resample_names, "IOILMConfig.resample_names"))
        if self.d_model % self.n_heads:
            raise SVToolsError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.n_checkpoints < 2:
            raise SVToolsError("IOILMConfig.n_checkpoints must be >= 2 (step 0 and the last step)")
        if self.resample_names and not self.freeze_names:
            raise SVToolsError("resample_names=True needs freeze_names=True (re-drawn codes replace learnt name "
                               "embeddings); set resample_names=False to learn the names")

    def replace(self, **kw: Any) -> "IOILMConfig":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **kw)

    def checkpoint_steps(self) -> list[int]:
        """Step 0, then log-spaced integer steps up to ``steps`` (included): at least
        ``n_checkpoints`` distinct steps in all (all of ``0..steps`` if there are fewer)."""
        want = min(self.n_checkpoints, self.steps + 1)
        k = want - 1
        while True:
            grid = [int(s) for s in np.unique(np.round(np.geomspace(1, self.steps, max(k, 1))).astype(int))]
            out = sorted({0, *grid, self.steps})
            if len(out) >= want:
                return out
            k += 1


# ----------------------------------------------------------------------------- model

def _gpt2_config(cfg: IOILMConfig, vocab_size: int, n_positions: int = 64, training: bool = False) -> Any:
    from transformers import GPT2Config

    # attention dropout only in the model being trained: a loaded checkpoint has none
    return GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=cfg.d_model, n_layer=cfg.n_layers,
                      n_head=cfg.n_heads, resid_pdrop=0.0, embd_pdrop=0.0,
                      attn_pdrop=cfg.attn_dropout if training else 0.0,
                      bos_token_id=1, eos_token_id=1, pad_token_id=0, tie_word_embeddings=True,
                      architectures=["GPT2LMHeadModel"])


def _new_model(cfg: IOILMConfig, vocab_size: int, seed: int, training: bool = False) -> Any:
    from transformers import GPT2LMHeadModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(_gpt2_config(cfg, vocab_size, training=training))
    model.config._attn_implementation = "eager"
    if cfg.freeze_names:
        ids, codes = name_codes(cfg, seed)
        with torch.no_grad():
            model.transformer.wte.weight[ids] = codes
    return model


def _key_config(cfg: IOILMConfig) -> dict:
    """The config as the cache key hashes it (the seed is the run's, not the config's default)."""
    return dataclasses.asdict(cfg.replace(seed=0))


def _key(cfg: IOILMConfig, seed: int, dev: torch.device = torch.device("cpu")) -> str:
    """The run's cache key. A run trained on another device than the CPU is another run (its
    weights differ from the CPU run's), so its key carries the device type."""
    blob = json.dumps({"cfg": _key_config(cfg), "seed": int(seed),
                       "code": CODE_VERSION, "vocab": vocabulary(), "text": [TRAIN_TEMPLATES, TEST_TEMPLATES,
                                                                              TRAIN_NAMES, FILLER_TEMPLATES]},
                      sort_keys=True)
    key = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return key if dev.type == "cpu" else f"{key}-{dev.type}"


def _train_device(device: str | torch.device | None) -> torch.device:
    """Where a run trains: the CPU unless a device is asked for. The book's seeds were validated
    on the CPU (see the package docstring: which solution a run finds is fragile), so a GPU is
    used for training only on request, never because it is present."""
    return torch.device("cpu") if device is None else default_device(device)


# ----------------------------------------------------------------------------- the run

@dataclass
class IOILMRun:
    """A trained (or cached) run: its config, seed, checkpoint steps and training history.

    ``history``: one row per logged step (``step``, ``loss``: mean next-token cross-entropy in
    nats over the batch's real tokens, ``lr``). ``seconds``: training wall time when it was
    trained (NaN when the run came from an older cache entry without it).
    """

    cfg: IOILMConfig
    seed: int
    path: Path
    checkpoints: list[int]
    history: pd.DataFrame
    seconds: float = float("nan")

    @cached_property
    def tokenizer(self) -> Any:
        """The word-level tokenizer (:func:`build_tokenizer`)."""
        return build_tokenizer()

    def _check_step(self, step: int) -> int:
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or int(step) not in self.checkpoints:
            raise SVToolsError(f"step {step!r} is not a checkpoint of this run; checkpoints: {self.checkpoints}")
        return int(step)

    def hf_model(self, step: int, device: str | torch.device | None = None) -> Any:
        """The raw ``GPT2LMHeadModel`` at checkpoint ``step`` (weights read with safetensors)."""
        from safetensors.torch import load_model as st_load

        step = self._check_step(step)
        model = _new_model(self.cfg, len(self.tokenizer), 0)
        st_load(model, str(self.path / f"step_{step:06d}.safetensors"), device="cpu")
        return model.to(default_device(device)).eval()

    def load(self, step: int, *, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32) -> Any:
        """The model at checkpoint ``step`` as a TransformerLens bridge (:func:`svtools.load_model`)
        with the word-level tokenizer; ``cfg.model_name`` reads ``ioi-lm seed S step T``."""

        bridge = load_model(self.hf_model(step, device), tokenizer=self.tokenizer, device=device, dtype=dtype)
        bridge.cfg.model_name = f"ioi-lm seed {self.seed} step {step}"
        return bridge

    def prompts(self, n: int, seed: int = 0, split: str = "test") -> IOIDataset:
        """``n`` IOI prompts (mixed ABBA/BABA), every word in the model's vocabulary.

        ``split``: ``"test"`` (held-out names and held-out templates), ``"train"`` (the training
        names and templates), or one factor held out at a time: ``"test_templates"`` (training
        names, held-out templates) and ``"test_names"`` (held-out names, training templates).
        """
        pools = {"test": (TEST_TEMPLATES, TEST_NAMES), "train": (TRAIN_TEMPLATES, TRAIN_NAMES),
                 "test_templates": (TEST_TEMPLATES, TRAIN_NAMES), "test_names": (TRAIN_TEMPLATES, TEST_NAMES)}
        if split not in pools:
            raise SVToolsError(f"split must be one of {sorted(pools)}, got {split!r}")
        templates, names = pools[split]
        return ioi_prompts(n, seed=seed, templates=templates, names=names)

    def logits(self, step: int, dataset: IOIDataset, *, device: str | torch.device | None = None
               ) -> Float[Tensor, "batch vocab"]:
        """Next-token logits at each prompt's END position, ``(batch, vocab)``, on the CPU."""
        return self._end_logits(step, dataset.tokens(self.tokenizer, device=default_device(device)), device)

    def _end_logits(self, step: int, tokens: Any, device: Optional[Any] = None) -> Float[Tensor, "batch vocab"]:
        """:meth:`logits` of already tokenised prompts (``IOIDataset.tokens``)."""
        model = self.hf_model(step, device)
        dev = next(model.parameters()).device
        with torch.no_grad():
            out = model(input_ids=tokens.input_ids.to(dev), attention_mask=tokens.attention_mask.to(dev)).logits
        r = torch.arange(out.shape[0], device=out.device)
        return out[r, tokens.positions.end.to(dev)].float().cpu()

    #: How many checkpoints' evaluation logits :meth:`accuracy` keeps (one entry: 256 x vocabulary floats).
    _ACCURACY_KEEP = 8

    def accuracy(self, step: int, *, n: int = 256, seed: int = 12345, split: str = "test",
                 metric: str = "top1") -> float:
        """Fraction of ``n`` prompts of ``split`` the model gets right at checkpoint ``step``.

        ``metric="top1"``: the IO name is the model's most likely next token at END, over the
        whole vocabulary (strict); ``"io_vs_s"``: the IO name's logit beats the subject's (the
        usual IOI metric). Held-out by default: names and templates never in a training IOI
        sentence.
        """
        check_metric(metric)
        memo = self.__dict__.setdefault("_accuracy_memo", EndLogitsMemo(self._ACCURACY_KEEP))  # one forward per step
        return ioi_accuracy(*memo.get(self, self._check_step(step), n, seed, split), metric)


# ----------------------------------------------------------------------------- training

def _lr_at(cfg: IOILMConfig, step: int) -> float:
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def _ckpt_name(step: int) -> str:
    return f"step_{step:06d}.safetensors"


def _check_entry(path: Path, cfg: IOILMConfig, seed: int) -> tuple[Optional[dict], Optional[str]]:
    """``(meta, None)`` when the cache entry ``path`` is the run ``(cfg, seed)`` and intact, else
    ``(None, what is wrong)``: meta.json readable and equal to the request (config, seed, code
    version, checkpoint steps, a complete and finite history), every checkpoint present with the
    size recorded (entries written before sizes were recorded: the safetensors header must match
    the file's length)."""
    meta, problem = _cache.read_meta(path)
    if problem:
        return None, problem
    want = _key_config(cfg)
    got = meta.get("config")
    got = {k: v for k, v in got.items() if k in want} | {"seed": 0} if isinstance(got, dict) else got
    if got != want:
        diff = [k for k in want if not isinstance(got, dict) or got.get(k) != want[k]] or ["its fields"]
        return None, f"meta.json is of another config ({', '.join(diff[:3])} differ)"
    if meta.get("seed") != seed:
        return None, f"meta.json is of seed {meta.get('seed')!r}, not {seed}"
    if meta.get("code_version") != CODE_VERSION:
        return None, f"meta.json was written by code version {meta.get('code_version')!r}, this is {CODE_VERSION}"
    steps = cfg.checkpoint_steps()
    if meta.get("checkpoints") != steps:
        return None, "meta.json lists other checkpoints than the config's"
    hist = meta.get("history")
    if not isinstance(hist, list) or not hist or not all(
            isinstance(h, dict) and isinstance(h.get("loss"), (int, float)) and math.isfinite(h["loss"]) for h in hist):
        return None, "its training history is missing or not finite (a diverged run)"
    sizes = meta.get("files")
    problem = _cache.files_problem(path, [_ckpt_name(s) for s in steps], sizes if isinstance(sizes, dict) else None)
    return (None, problem) if problem else (meta, None)


def _load_cached(path: Path, cfg: IOILMConfig, seed: int) -> Optional[IOILMRun]:
    """The cached run at ``path``, or None when there is none. A damaged entry, or one that is not
    this run, is removed (with a warning; an error naming the command when it cannot be) and None
    returned, so the caller retrains."""
    if not path.exists():
        return None
    meta, problem = _check_entry(path, cfg, seed)
    if problem:
        _cache.discard(path, problem)
        return None
    return IOILMRun(cfg=cfg, seed=seed, path=path, checkpoints=list(meta["checkpoints"]),
                    history=pd.DataFrame(meta["history"]), seconds=float(meta.get("seconds", float("nan"))))


def train(cfg: Optional[IOILMConfig] = None, *, seed: Optional[int] = None, progress: bool = True,
          device: str | torch.device | None = None, cache: bool = True) -> IOILMRun:
    """Train the IOI language model (or load the cached run with the same config and seed).

    Each step draws ``cfg.batch`` fresh sequences (:func:`training_texts`, seeded by the run's
    seed and the step), and takes one AdamW step on the mean next-token cross-entropy over their
    real tokens (padding masked). Weights at :meth:`IOILMConfig.checkpoint_steps` (step 0 = the
    initialisation) are written as safetensors.

    Args:
        cfg: the config (default :class:`IOILMConfig`).
        seed: the training seed (initialisation and data order); default ``cfg.seed``.
        progress: a progress bar over steps.
        device: default cpu, even where a GPU is present: the book's runs were trained and
            validated on the CPU, and a run trained elsewhere has other weights (it is cached
            under its own key). ``"cuda"`` trains on the GPU.
        cache: read and write the on-disk cache (``$SVTOOLS_CACHE``, see :func:`cache_dir`).
            With ``cache=False`` the run is written to a fresh temporary directory.

    The cache (:mod:`svtools._cache`): an entry is built in a temporary directory and moved into
    place in one step; on every read its ``meta.json`` is compared with the request (config,
    seed, :data:`CODE_VERSION`, checkpoint steps, a finite history) and every checkpoint with its
    recorded size and safetensors header. A damaged entry is removed with a warning and the run
    retrained; a failed or killed run leaves nothing behind (a killed one is removed by the next
    call). A run is trained by one process at a time: the trainer holds the run's lock
    (``$SVTOOLS_CACHE/locks``), and a second process asking for it meanwhile waits, then loads the
    entry the first one wrote (if the first one failed, the second one trains).

    The training step: each step's data is prepared ahead in a background thread and AdamW runs
    its ``foreach`` implementation; both leave the weights bit-identical to the straightforward
    loop's (checked over 300 default-config steps; ``benchmarks/ioi_lm_step.py`` compares them).
    ``device="cuda"`` trains on the GPU (model, data and optimiser there); that path has not been
    tested on a GPU, and it would not reproduce the CPU runs' weights.

    Raises:
        SVToolsError: a bad argument; training diverged (the loss or the weights became
            non-finite: nothing is cached); ``SVTOOLS_CACHE`` is a file or cannot be written.
    """
    cfg = IOILMConfig() if cfg is None else cfg
    if not isinstance(cfg, IOILMConfig):
        raise SVToolsError(f"cfg must be an IOILMConfig, got {type(cfg).__name__}")
    seed = as_seed(cfg.seed if seed is None else seed, "seed", max_value=SEED_MAX)
    cache = as_bool(cache, "cache")
    dev = _train_device(device)
    key = _key(cfg, seed, dev)
    where = cache_dir() if cache else None
    if not cache:
        _about_to_train(cfg, [seed])
        return _build(cfg, seed, key, None, dev, progress)
    _cache.check_root(where)
    _cache.clean_stale(where, "ioi_lm_")
    hit = _load_cached(where / key, cfg, seed)
    if hit is not None:
        return hit
    # One trainer per run: a second process asking for the same run (another notebook, a
    # background train_seeds) waits here, then loads what the first one cached.
    with _cache.lock(f"ioi_lm-{key}"):
        hit = _load_cached(where / key, cfg, seed)
        if hit is not None:
            return hit
        _about_to_train(cfg, [seed])
        return _build(cfg, seed, key, where, dev, progress)


def train_seeds(cfg: Optional[IOILMConfig] = None, seeds: Sequence[int] = (0, 1, 2), *,
                processes: Optional[int] = None, device: str | torch.device | None = None,
                progress: bool = False) -> list[IOILMRun]:
    """Train (or load) several seeds of ``cfg``, in parallel processes when more than one core is free.

    Seeds already in the cache are loaded; the others are trained by ``train(cfg, seed=s)``, each in
    its own process (one torch thread each) when ``processes`` > 1, else one after another here.
    Each run's numbers do not depend on where it ran: a CPU run is deterministic and its process
    shares nothing with the others, so the weights are bit-identical to a serial run's
    (``tests/test_ioi_lm_parallel.py``). Two callers asking for the same run never train it twice:
    :func:`train` holds the run's cache lock while it trains, and the second one loads the result.

    Args:
        cfg: the config (default :class:`IOILMConfig`).
        seeds: the training seeds.
        processes: how many processes train at once; default: the cores this process may use
            (``os.sched_getaffinity``; ``SVTOOLS_TRAIN_PROCESSES`` overrides), at most one per
            missing seed. Other load on the machine is not subtracted: parallel runs take no
            longer than serial ones there either. On CUDA the seeds train here, one after another.
        device: as in :func:`train` (default cpu).
        progress: progress bars (serial training only).

    Returns:
        The runs, in the order of ``seeds``.

    Raises:
        SVToolsError: a bad argument; a worker's error (re-raised with the seed that failed).
    """
    cfg = IOILMConfig() if cfg is None else cfg
    if not isinstance(cfg, IOILMConfig):
        raise SVToolsError(f"cfg must be an IOILMConfig, got {type(cfg).__name__}")
    if isinstance(seeds, (int, np.integer)) or not isinstance(seeds, Sequence):
        raise SVToolsError(f"seeds must be a sequence of ints, got {seeds!r}")
    seeds = [as_seed(s, "seeds[i]", max_value=SEED_MAX) for s in seeds]
    dev = _train_device(device)
    where = cache_dir()
    _cache.check_root(where)
    missing = [s for s in dict.fromkeys(seeds) if _check_entry(where / _key(cfg, s, dev), cfg, s)[1] is not None]
    if processes is None:
        env = os.environ.get("SVTOOLS_TRAIN_PROCESSES")
        processes = as_int(env, "SVTOOLS_TRAIN_PROCESSES", min_value=1) if env else _cores()
    processes = as_int(processes, "processes", min_value=1)
    n = min(processes, len(missing))
    if n > 1 and dev.type == "cpu":
        _about_to_train(cfg, missing)
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {s: pool.submit(_train_worker, cfg, s) for s in missing}
            for s, f in futures.items():
                err = f.exception()
                if err is not None:
                    raise SVToolsError(f"training seed {s} in a worker process failed: {err}") from err
    return [train(cfg, seed=s, progress=progress, device=dev) for s in seeds]


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _train_worker(cfg: IOILMConfig, seed: int) -> str:
    """One seed in a worker process of :func:`train_seeds` (CPU); returns the run's directory."""
    return str(train(cfg, seed=seed, progress=False, device="cpu").path)


def _about_to_train(cfg: IOILMConfig, seeds: list[int]) -> None:
    """Called just before ``seeds`` of ``cfg`` are trained (not loaded): a hook for the unit
    tests' guard (tests/conftest.py), which fails a test that would train the book's runs."""


def _build(cfg: IOILMConfig, seed: int, key: str, where: Optional[Path], dev: torch.device,
           progress: bool) -> IOILMRun:
    """Train ``(cfg, seed)`` on ``dev``; publish the run into ``where`` (None: a temporary directory)."""
    # the build directory first: a cache that cannot be written is said before minutes of training
    with _cache.building(where, prefix=f"ioi_lm_{key}_") as tmp:
        tok = build_tokenizer()
        model = _new_model(cfg, len(tok), seed, training=True).to(dev).train()
        if _FUSED_GELU:
            for block in model.transformer.h:
                if type(block.mlp.act).__name__ == "NewGELUActivation":
                    block.mlp.act = NewGELU()
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98),
                                **_ADAMW_KW)
        ckpts = cfg.checkpoint_steps()
        hist: list[dict] = []
        threads = torch.get_num_threads()
        if dev.type == "cpu":
            # A model this small is fastest on one thread: measured 0.24 s vs 2.4 s per step with two
            # threads on a loaded 2-core machine (thread spin-waiting); results are identical.
            torch.set_num_threads(1)
        t0 = time.perf_counter()
        try:
            _train_loop(model, opt, tok, cfg, seed, ckpts, tmp, dev, hist, progress)
        finally:
            torch.set_num_threads(threads)
        seconds = time.perf_counter() - t0
        info = {"config": dataclasses.asdict(cfg), "seed": seed, "code_version": CODE_VERSION, "checkpoints": ckpts,
                "history": hist, "seconds": seconds, "device": str(dev),
                "files": _cache.file_sizes(tmp, [_ckpt_name(s) for s in ckpts])}
        (tmp / "meta.json").write_text(json.dumps(info))
        path = tmp
        if where is not None:  # atomic; when a concurrent trainer of this key published first, its entry is kept
            path = _cache.publish(tmp, where / key, lambda p: _check_entry(p, cfg, seed)[1] is None)
    return IOILMRun(cfg=cfg, seed=seed, path=path, checkpoints=ckpts, history=pd.DataFrame(hist), seconds=seconds)


def _train_loop(model, opt, tok, cfg: IOILMConfig, seed: int, ckpts: list[int], out: Path, dev: torch.device,
                hist: list[dict], progress: bool) -> None:
    from safetensors.torch import save_model

    frozen = None
    if cfg.freeze_names:
        ids, codes = name_codes(cfg, seed)
        frozen = (ids.to(dev), codes.to(dev))
    wte = model.transformer.wte.weight
    data = Prefetch(lambda step: step_data(cfg, seed, tok, step), range(cfg.steps), depth=PREFETCH)
    try:
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(seed)
            for step in tqdm(range(cfg.steps + 1), desc=f"ioi_lm seed {seed}", disable=not progress):
                if step in ckpts:
                    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
                        raise SVToolsError(f"training diverged before step {step} (non-finite weights; lr={cfg.lr}, "
                                           f"weight_decay={cfg.weight_decay}); nothing is cached. Lower cfg.lr.")
                    model.eval()
                    save_model(model, str(out / _ckpt_name(step)))
                    model.train()
                if step == cfg.steps:
                    break
                codes, ids, am, w = next(data)
                if codes is not None:  # this step's names: fresh codes (the checkpoints hold the fixed ones)
                    with torch.no_grad():
                        wte[frozen[0]] = codes.to(dev)
                lr = _lr_at(cfg, step)
                for g in opt.param_groups:
                    g["lr"] = lr
                opt.zero_grad(set_to_none=True)
                loss = _loss_backward(model, ids, am, w, cfg.buckets, dev)
                if not math.isfinite(loss):  # the finite-loss guard: a NaN run is never cached
                    raise SVToolsError(f"training diverged at step {step}: the loss is {loss} (lr={cfg.lr}, "
                                       f"weight_decay={cfg.weight_decay}); nothing is cached. Lower cfg.lr.")
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                if frozen is not None:  # the name rows stay as drawn (weight decay included)
                    with torch.no_grad():
                        wte[frozen[0]] = frozen[1]
                hist.append({"step": step, "loss": loss, "lr": lr})
    finally:
        data.close()


def _loss_backward(model: Any, ids: Tensor, am: Tensor, w: Tensor, buckets: int, dev: torch.device) -> float:
    """Backpropagate the batch's weighted next-token loss ``sum(ce * w) / sum(w)``; return it.

    ``ids``, ``am``: ``(batch, seq)`` right-padded token ids and attention mask; ``w``:
    ``(batch, seq - 1)`` weights of the targets ``ids[:, 1:]``. The sequences are split into
    ``buckets`` groups of similar length, each cut to its own longest sequence (less padding:
    about 18% faster per step with 3 buckets on the default config); the groups' gradients add up
    to the whole batch's (equal up to floating-point summation order).
    """
    total, loss = w.sum(), 0.0
    for rows in am.sum(1).argsort(stable=True).chunk(buckets):
        n = int(am[rows].sum(1).max())
        x, a, wb = ids[rows, :n].to(dev), am[rows, :n].to(dev), w[rows, :n - 1].to(dev)
        logits = model(input_ids=x, attention_mask=a).logits[:, :-1]
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                               reduction="none").view_as(wb)
        part = (ce * wb).sum() / total.to(dev)
        part.backward()
        loss += float(part.detach())
    return loss
