"""svtools: singular vectors of attention heads, sparse attention decomposition and its controls.

Companion package to the book reproducing Franco, Loughridge & Crovella, "Singular Vectors of
Attention Heads Align with Features" (ICML 2026).

Light modules (pure torch) are imported eagerly; those that need transformers/TransformerLens
(``load_model``, ``decompose``) and the book's chapter modules load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from svtools import runtime  # noqa: F401 - first: its clock (runtime.elapsed) starts with svtools
from svtools._checks import SVToolsError
from svtools.qk import QKSVD, RotarySpec, qk_svd, random_rotation, rotary_matrices
from svtools.sparsity import n_recon, rolls_tovee
from svtools.terms import relative_terms, rotated_terms, sad_terms

__version__ = "0.1.0"

# Deliberately lazy: loading models/decomposition (and the study modules below) on first use keeps
# `import svtools` to the light linear-algebra modules above.
_LAZY = {
    "load_model": "svtools.models",
    "HubUnavailableError": "svtools.models",
    "UnsupportedModelError": "svtools.models",
    "ModelNotFoundError": "svtools.models",
    "pattern_tolerance": "svtools.models",
    "attention_patterns": "svtools.models",
    "head_weights": "svtools.decomposition",
    "decompose_layers": "svtools.decomposition",
    "decompose": "svtools.decomposition",
    "HeadDecomposition": "svtools.decomposition",
}
_SUBMODULES = {"toy", "alignment", "theory", "data", "sad", "plots", "models", "decomposition", "runtime",
               "sae", "activations", "bridge", "ioi", "report"}

__all__ = [
    "QKSVD", "RotarySpec", "SVToolsError", "qk_svd", "random_rotation", "rotary_matrices",
    "sad_terms", "rotated_terms", "relative_terms", "n_recon", "rolls_tovee", *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"svtools.{name}")
    raise AttributeError(f"module 'svtools' has no attribute {name!r}")
