"""Residual-stream activations of a real model, collected over a list of texts.

The residual stream *at layer* ``l`` (``0 <= l < n_layers``) is the input of block ``l``, the
vector its attention heads read (before any layer norm the block applies): for ``l = 0`` the
embeddings as the first block sees them (BERT: after its embedding LayerNorm), for ``l > 0`` the
output of block ``l - 1``. This is HuggingFace's ``output_hidden_states[l]``. The output of the
last block is not offered: post-LN models (BERT) and pre-LN models (GPT-2, whose last hidden state
HuggingFace returns after the final LayerNorm) disagree on what it is. Read from the
TransformerLens bridge's ``blocks.{l}.hook_resid_pre``, so it works for every model
:func:`svtools.load_model` returns.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from svtools._checks import SVToolsError, as_bool, as_int
from svtools.bridge import check_bridge, prepare_tokens
from svtools.data.ioi import ioi_prompts
from svtools.data.text import PLAIN_SENTENCES
from svtools.runtime import tqdm

__all__ = ["residual_activations", "sample_texts"]


def _hook_name(model: Any, layer: int) -> tuple[int, str]:
    n = int(model.cfg.n_layers)
    try:
        layer = as_int(layer, "layer", min_value=0, max_value=n - 1)
    except SVToolsError as exc:
        raise SVToolsError(f"layer must be an integer in [0, {n - 1}] (the input of block layer; "
                           f"n_layers = {n}), got {layer!r}") from exc
    return layer, f"blocks.{layer}.hook_resid_pre"


def residual_activations(model: Any, texts: Sequence[str] | Int[Tensor, "batch pos"], layer: int, *,
                         attention_mask: Optional[Int[Tensor, "batch pos"]] = None, batch_size: int = 32,
                         skip_first: bool = False, return_index: bool = False, progress: bool = True):
    """Residual-stream vectors at ``layer`` for every real (unpadded) token of ``texts``.

    Args:
        model: a bridge from :func:`svtools.load_model`.
        texts: strings (tokenised with the model's tokenizer and special tokens, as
            :func:`svtools.bridge.tokenize` does) or ``(batch, pos)`` token ids.
        attention_mask: with token ids only: ``(batch, pos)``, 1 for real tokens, right-padded
            (default: all real).
        layer: ``0 .. n_layers - 1``: the input of block ``layer`` (see module doc).
        batch_size: texts per forward pass.
        skip_first: drop position 0 of every text (BOS / ``[CLS]``, which often has an outlying
            norm that would dominate a dictionary).
        return_index: also return ``(n_tokens, 2)`` ``(text, position)`` of every row.
        progress: show a progress bar over batches.

    Returns:
        ``Float[Tensor, "n_tokens d_model"]`` on the CPU, rows in text order then position order
        (and the index if asked). Identity: the rows of text ``b`` equal the model's
        ``hidden_states[layer][b, :len_b]``.
    """
    check_bridge(model)
    batch_size = as_int(batch_size, "batch_size", min_value=1)
    skip_first = as_bool(skip_first, "skip_first")
    return_index = as_bool(return_index, "return_index")
    layer, name = _hook_name(model, layer)
    if isinstance(texts, (list, tuple)) and len(texts) == 0:
        raise SVToolsError("texts is empty")
    # the same input checks as decompose: a supported model in eval mode (dropout would make two
    # identical calls differ), ids in the vocabulary, a 0/1 right-padded mask, no more positions
    # than the model has
    ids, am = prepare_tokens(model, texts, attention_mask)
    rows, index = [], []
    starts = range(0, ids.shape[0], batch_size)
    for s in tqdm(starts, desc=f"residual stream, layer {layer}", disable=not progress):
        b_ids, b_am = ids[s:s + batch_size], am[s:s + batch_size]
        keep = int(b_am.sum(1).max())
        b_ids, b_am = b_ids[:, :keep], b_am[:, :keep]
        with torch.no_grad():
            _, cache = model.run_with_cache(b_ids, attention_mask=b_am, names_filter=lambda n: n == name)
        if name not in cache:
            raise SVToolsError(f"the model's bridge does not expose the hook {name!r}")
        acts = cache[name].detach().float().cpu() if cache[name].dtype not in (torch.float32, torch.float64) \
            else cache[name].detach().cpu()
        m = b_am.bool().cpu()
        if skip_first:
            m[:, 0] = False
        rows.append(acts[m])
        if return_index:
            bi, pi = torch.nonzero(m, as_tuple=True)
            index.append(torch.stack([bi + s, pi], -1))
    out = torch.cat(rows)
    if out.shape[0] == 0:
        raise SVToolsError("no tokens left (every text is empty after skip_first)")
    return (out, torch.cat(index)) if return_index else out


def sample_texts(n_doc: int = 400, n_ioi: int = 100, *, seed: int = 0) -> list[str]:
    """Offline text for activation statistics: the book's plain sentences
    (:data:`svtools.data.text.PLAIN_SENTENCES`), ``n_ioi`` IOI prompts and ``n_doc`` prose
    sentences from the documentation bundled with Python itself (``pydoc_data.topics``: English
    technical prose, 40-200 characters, lines with code symbols dropped), shuffled with ``seed``.
    Deterministic; needs no network."""
    import random
    import re

    from pydoc_data.topics import topics

    n_doc = as_int(n_doc, "n_doc", min_value=0)
    n_ioi = as_int(n_ioi, "n_ioi", min_value=0)
    seed = as_int(seed, "seed")
    prose = re.split(r"(?<=[.!?])\s+", " ".join(topics[k] for k in sorted(topics)))
    prose = [re.sub(r"\s+", " ", t).strip() for t in prose]
    prose = sorted({t for t in prose if 40 <= len(t) <= 200 and not re.search(r"[>{}\[\]=*_|]", t)})
    random.Random(seed).shuffle(prose)
    if n_doc > len(prose):
        raise SVToolsError(f"n_doc={n_doc} but only {len(prose)} documentation sentences are available")
    ioi = ioi_prompts(n_ioi, seed=seed).texts if n_ioi else []
    return list(PLAIN_SENTENCES) + list(ioi) + prose[:n_doc]
