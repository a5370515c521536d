"""What svtools needs of a model, and how it feeds one: the layer below models and decomposition.

A model reaches svtools as a TransformerLens ``TransformerBridge`` (:func:`svtools.load_model`).
This module holds what both the loader (:mod:`svtools.models`) and the decomposition
(:mod:`svtools.decomposition`) need, so that neither imports the other's internals:

* the checks: :func:`check_bridge` (is it a bridge?), :func:`check_supported` (is its attention
  one svtools decomposes exactly?), :func:`check_layer` and :func:`check_heads` (index checks);
* facts about the wrapped Hugging Face model: :func:`hf_model_of`, :func:`model_type`,
  :func:`is_causal`;
* the inputs: :func:`tokenize` (the one tokenisation path), :func:`prepends_bos`,
  :func:`as_token_ids` (everything a user may pass as tokens) and :func:`prepare_tokens` (those
  checks plus eval mode and the model's position limit, on the model's device).
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from svtools._checks import SVToolsError, UnsupportedModelError, as_indices, as_int

__all__ = ["SUPPORTED_MODEL_TYPES", "check_bridge", "check_supported", "hf_model_of", "model_type", "is_causal",
           "check_layer", "check_heads", "prepends_bos", "tokenize", "as_token_ids", "prepare_tokens"]

#: HuggingFace ``model_type`` values whose attention svtools decomposes exactly (tested on each).
SUPPORTED_MODEL_TYPES = {"gpt2", "gpt_neox", "llama", "bert"}


def check_bridge(model: Any) -> None:
    """Raise unless ``model`` is a TransformerLens bridge as :func:`svtools.load_model` returns it."""
    if hasattr(model, "cfg") and hasattr(model, "original_model") and hasattr(model, "run_with_cache"):
        return
    if isinstance(model, type):
        raise SVToolsError(f"model is the class {model.__name__}, not a model: build or load one, then pass "
                           "it through svtools.load_model")
    if isinstance(model, torch.nn.Module) and hasattr(model, "config"):
        raise SVToolsError(f"model is a raw transformers {type(model).__name__}: pass it through "
                           "svtools.load_model(model) first (svtools reads the attention from the bridge's hooks)")
    raise SVToolsError(f"model must be a TransformerBridge from svtools.load_model, got {type(model).__name__}")


def check_supported(hf_model: Any) -> None:
    """Raise :class:`~svtools.models.UnsupportedModelError` unless the model's attention is one svtools handles."""
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


# ----------------------------------------------------------------------------- model facts

def hf_model_of(model: Any) -> Any:
    """The Hugging Face model a bridge wraps (``model.original_model``)."""
    try:
        return model.original_model
    except AttributeError as exc:
        raise SVToolsError("model must be a TransformerLens TransformerBridge (use svtools.load_model)") from exc


def model_type(model: Any) -> str:
    """The wrapped model's Hugging Face ``config.model_type`` (``"gpt2"``, ``"gpt_neox"``, ...)."""
    return getattr(hf_model_of(model).config, "model_type", "?")


def is_causal(model: Any) -> bool:
    """Whether queries see only earlier keys (decoders) or all keys (BERT)."""
    return model_type(model) != "bert"


def check_layer(model: Any, layer: int) -> int:
    """One layer index (Python or numpy int; negative counts from the end) -> ``0..n_layers-1``."""
    check_bridge(model)
    n = model.cfg.n_layers
    try:
        v = as_int(layer, "layer")
    except SVToolsError as exc:
        raise SVToolsError(f"unknown layer {layer!r}: the model has {n} layers (0..{n - 1}); {exc}") from None
    if not (-n <= v < n):
        raise SVToolsError(f"unknown layer {layer!r}: the model has {n} layers (0..{n - 1})")
    return v % n


def check_heads(model: Any, head: int | Sequence[int] | None) -> list[int]:
    """Head indices (an int, a list/array of ints, or None = all) -> list of ``0..n_heads-1``."""
    check_bridge(model)
    n = model.cfg.n_heads
    if head is None:
        return list(range(n))
    try:
        heads = as_indices(head, "head", allow_empty=True)
    except SVToolsError as exc:
        raise SVToolsError(f"unknown head(s) {head!r}: each layer has {n} heads (0..{n - 1}); {exc}") from None
    bad = [h for h in heads if not (0 <= h < n)]
    if bad or not heads:
        raise SVToolsError(f"unknown head(s) {bad or heads!r}: each layer has {n} heads (0..{n - 1})")
    return heads


# ----------------------------------------------------------------------------- tokens

def prepends_bos(model: Any) -> bool:
    """Whether :func:`tokenize` puts a BOS token in front of what the tokenizer returns.

    True when the bridge's ``cfg.default_prepend_bos`` asks for a BOS (TransformerLens'
    convention for GPT-2 and Pythia) and the tokenizer does not add one itself.
    """
    return bool(getattr(model.cfg, "default_prepend_bos", False)) and not \
        bool(getattr(model.cfg, "tokenizer_prepends_bos", True))


def tokenize(model: Any, texts: Sequence[str], *, prepend_bos: Optional[bool] = None
             ) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Token ids and attention mask for ``texts``, right-padded, as :func:`decompose` feeds them.

    Uses the model's tokenizer with its special tokens (BERT: ``[CLS] ... [SEP]``). For
    tokenizers that add no BOS themselves, a BOS is prepended when the bridge's
    ``cfg.default_prepend_bos`` says so (:func:`prepends_bos`), or as ``prepend_bos`` says. Position ``p`` of a text's tokens is position ``p`` in the model.
    """
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise SVToolsError("this model has no tokenizer: pass token ids (a LongTensor) instead of strings")
    if isinstance(texts, str):
        texts = [texts]
    if not texts or not all(isinstance(t, str) for t in texts):
        raise SVToolsError("texts must be a non-empty list of strings")
    enc = [tok(t, add_special_tokens=True)["input_ids"] for t in texts]
    if prepend_bos is None:
        prepend_bos = prepends_bos(model)
    if prepend_bos:
        if tok.bos_token_id is None:
            raise SVToolsError("prepend_bos=True but the tokenizer has no BOS token")
        enc = [[tok.bos_token_id] + e if (not e or e[0] != tok.bos_token_id) else e for e in enc]
    n = max(len(e) for e in enc)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    ids = torch.full((len(enc), n), pad, dtype=torch.long)
    mask = torch.zeros((len(enc), n), dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, :len(e)] = torch.tensor(e, dtype=torch.long)
        mask[i, :len(e)] = 1
    return ids, mask


def as_token_ids(model: Any, tokens: Any, attention_mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Validate what a user may pass as tokens: strings (one, a list, any iterable), token ids
    ``(batch, pos)``/``(pos,)`` (tensor, array, nested lists), or a tokenizer's ``BatchEncoding``
    (its ``input_ids`` and ``attention_mask`` are used)."""
    if isinstance(tokens, Mapping):  # a tokenizer's BatchEncoding (or a plain dict of the same)
        if "input_ids" not in tokens:
            raise SVToolsError(f"tokens given as a mapping must hold 'input_ids' (a tokenizer's output), "
                               f"got keys {list(tokens)[:5]}")
        if attention_mask is None:
            attention_mask = tokens.get("attention_mask")
        tokens = tokens["input_ids"]
    if not isinstance(tokens, (str, list, tuple, Tensor, np.ndarray)) and isinstance(tokens, Iterable):
        tokens = list(tokens)  # a generator of strings or of ids
    if isinstance(tokens, (list, tuple)) and len(tokens) == 0:
        raise SVToolsError("tokens is empty: give at least one text (or a (batch, pos) array of token ids)")
    if isinstance(tokens, (list, tuple)) and any(isinstance(t, str) for t in tokens):
        bad = [t for t in tokens if not isinstance(t, str)]
        if bad:
            raise SVToolsError(f"tokens mixes strings and other values ({bad[0]!r}): give a list of strings "
                               "or token ids, not both")
    if isinstance(tokens, str) or (isinstance(tokens, (list, tuple)) and tokens and isinstance(tokens[0], str)):
        if attention_mask is not None:
            raise SVToolsError("attention_mask is computed from the texts; pass it only with token ids")
        return tokenize(model, list(tokens) if not isinstance(tokens, str) else [tokens])
    try:
        ids = torch.as_tensor(tokens)
    except Exception as exc:
        raise SVToolsError(f"tokens must be strings or integer token ids of shape (batch, pos), "
                           f"got {type(tokens).__name__} that is not a rectangular array of ints") from exc
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise SVToolsError(f"tokens must be integer ids or strings, got dtype {ids.dtype}")
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise SVToolsError(f"tokens must have shape (batch, pos) with batch, pos >= 1, got {tuple(ids.shape)}")
    vocab = model.cfg.d_vocab
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise SVToolsError(f"token ids must lie in [0, {vocab}), got range [{int(ids.min())}, {int(ids.max())}]")
    if attention_mask is None:
        attention_mask = torch.ones_like(ids)
    try:
        attention_mask = torch.as_tensor(attention_mask)
    except Exception as exc:
        raise SVToolsError(f"attention_mask must be a (batch, pos) array of 0/1, got {type(attention_mask).__name__}") from exc
    if attention_mask.ndim == 1 and ids.shape[0] == 1:
        attention_mask = attention_mask[None]
    if attention_mask.shape != ids.shape:
        raise SVToolsError(f"attention_mask shape {tuple(attention_mask.shape)} != tokens shape {tuple(ids.shape)}")
    if attention_mask.is_complex() or not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        vals = sorted({float(v) for v in attention_mask.flatten()[:10000].tolist()} - {0.0, 1.0})[:5] \
            if not attention_mask.is_complex() else ["complex"]
        raise SVToolsError(f"attention_mask must hold only 0 (padding) and 1 (real token), got also {vals}")
    am = attention_mask.long()
    if bool((am[:, 1:] > am[:, :-1]).any()) or bool((am[:, 0] == 0).any()):
        raise SVToolsError("attention_mask must be right-padded (ones, then zeros, first token real)")
    return ids.long(), am


def _max_positions(model: Any) -> Optional[int]:
    """Longest sequence an absolute-position model accepts (None: rotary, no hard limit)."""
    cfg = hf_model_of(model).config
    if getattr(cfg, "model_type", None) == "gpt2":
        return getattr(cfg, "n_positions", None)
    if getattr(cfg, "model_type", None) == "bert":
        return getattr(cfg, "max_position_embeddings", None)
    return None


def prepare_tokens(model: Any, tokens: Any, attention_mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """``(ids, attention_mask)`` on the model's device, after every input check: a supported
    bridge in eval mode, tokens as :func:`as_token_ids` accepts them, within the position limit."""
    check_bridge(model)
    check_supported(hf_model_of(model))
    if bool(getattr(model, "training", False)) or bool(getattr(hf_model_of(model), "training", False)):
        raise SVToolsError("the model is in training mode (dropout would perturb the attention it is "
                           "compared with): call model.eval() first")
    ids, am = as_token_ids(model, tokens, attention_mask)
    n_max = _max_positions(model)
    if n_max is not None and ids.shape[1] > n_max:
        raise SVToolsError(f"sequences are {ids.shape[1]} tokens long but this model has only {n_max} "
                           "positions: truncate or split the input")
    device = next(hf_model_of(model).parameters()).device
    return ids.to(device), am.to(device)
