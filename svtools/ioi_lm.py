"""A small causal language model trained here on IOI text: a real IOI circuit on every machine.

The paper's real-model results use GPT-2 small and Pythia-160M, which need the model hub. This
module trains, offline and on a CPU, a GPT-2-architecture model
(``transformers.GPT2LMHeadModel`` built from a local ``GPT2Config``: 3 layers x 4 heads,
``d_model`` 64 by default, 2.5-4 minutes per seed on one CPU core) on a small language of
our own:

* indirect-object-identification (IOI) sentences (:func:`svtools.data.ioi_prompts` on the
  templates :data:`TRAIN_TEMPLATES`, compositions of an opening and an action) followed by their
  answer ("When Mary and John went to the store, John gave a drink to Mary ."), and
* filler sentences that are not IOI ("Kate bought a pen at the market .", "It was a quiet day at
  the park ."), some with one name, some with two, some with the same name twice, so the model
  has to learn names as words of a language rather than a lookup from the IOI templates.

Tokens are whole words and punctuation marks (a ``tokenizers`` ``WordLevel`` model, built from
the word lists below, wrapped in ``PreTrainedTokenizerFast``; the tokenizer adds a ``<bos>`` at
position 0, the attention sink). Names and templates are split: the *test* split uses names
that never appear in a training IOI sentence (they do appear in filler sentences, so the model
knows them as words) and templates never used in training.

**Names are random codes, never learnt** (``freeze_names``, the default). Each of the 300 names'
embedding rows (tied to the unembedding) is a shared "name" direction plus an independent
Gaussian code (:func:`name_codes`); with ``resample_names`` (the default) every training step
draws fresh codes, and the saved checkpoints hold one fixed draw per seed. So nothing in the
model belongs to one name, and every name, held out or not, is to the model a draw it has never
seen: the model has to learn circuits that compare and copy *whatever* code sits in a name's
place. Filler sentences draw held-out names 70% of the time (``filler_test_share``), so held-out
and training names are about equally frequent.

**Training choices** (``answer_weight`` 4: the loss at an IOI sentence's answer token counts four
times; ``attn_dropout`` 0.1 while training; 3 layers). Why, from our exploration while building
this module (single runs, seeds 0-2, 128-256 held-out prompts, not re-run by the book):

* learnt name embeddings did not generalise to held-out names (100 names: top-1 0.4-21%; 300
  names: the IO name beat the subject on 96-100% of held-out prompts but top-1 was 2-70%);
* one fixed draw of codes, 2 layers (version 3 of this module): held-out top-1 0.996 / 0.879 /
  0.984 while training names scored 0.996-1.0;
* re-drawn codes removed that gap (in the runs that learnt the task, held-out top-1 within 0.08
  of training top-1, within 0.02 in most; 3 layers, plain language modelling: 0.92-0.996 in 5
  runs); weighting the answer 4x brought
  the task forward (learnt by about step 1,800; 0.996-1.0 in 3 runs), but with 2 layers two of
  three seeds still stalled at 0.5 (IO and S alike);
* without attention dropout, 7 of our 13 3-layer runs with re-drawn codes and 3,000 steps
  (answer weight 1-8, other settings varied) solved the task *symmetrically*: their
  heads attend IO and S1 alike (about 0.5 each) and add both names, and other heads, attending
  S2, subtract the subject. Dropout on the attention makes that cancellation unreliable; with
  it the three default runs grew heads that attend END -> IO selectively. Which solution a run
  finds is fragile: the same config with GPT-2's GELU computed by another kernel (equal to
  2e-7) gave a symmetric run for seed 1, and dropout 0.2 stalled seed 1 at 0.53.

``train(cfg, seed=s)`` returns an :class:`IOILMRun` with log-spaced checkpoints (step 0
included). Runs are cached on disk (safetensors, one file per checkpoint) under
``$SVTOOLS_CACHE/ioi_lm/<key>`` (default ``~/.cache/svtools``), where the key hashes the
config, the seed and :data:`CODE_VERSION`; a second call with the same arguments loads instead
of training. ``run.load(step)`` gives a TransformerLens bridge (via :func:`svtools.load_model`)
that :func:`svtools.decompose` and :func:`svtools.sad.head_sparsity` accept, with the word-level
tokenizer attached; ``run.prompts(n, seed, split)`` gives an :class:`svtools.data.IOIDataset` in
the model's vocabulary, so ``svtools.sad.ioi_tokens(model, dataset)`` returns ids and the IO,
S1, S2 and END positions.

Determinism: with the same config and seed a CPU run reproduces the same weights bit for bit
(one thread or several: the model is small enough that torch's CPU kernels are deterministic);
CUDA runs are deterministic up to floating-point reduction order.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import random
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from svtools import _cache
from svtools._checks import (SVToolsError, as_bool, as_float, as_int, as_names, as_seed, check_columns,
                             check_numeric_columns)
from svtools.data.ioi import NAMES, OBJECTS, PLACES, IOIDataset, ioi_prompts
from svtools.runtime import default_device, tqdm

__all__ = ["IOILMConfig", "IOILMRun", "train", "CODE_VERSION", "cache_dir", "TRAIN_TEMPLATES",
           "TEST_TEMPLATES", "TRAIN_NAMES", "TEST_NAMES", "LM_NAMES", "OPENINGS", "ACTIONS", "FILLER_TEMPLATES", "build_tokenizer",
           "filler_sentences", "training_texts", "name_ids", "name_codes", "role_attention", "ROLE_PAIRS", "ioi_accuracy",
           "top_heads", "over_checkpoints", "over_seeds"]

#: Bumped whenever a change to this module changes what ``train`` produces (it is part of the
#: cache key, so old cached runs are not reused after such a change).
CODE_VERSION = 4

#: The LM's IOI templates are compositions: an opening that names {A} and {B}, then an action
#: of the subject {S} that ends with "to" (10 x 8 = 80 templates). Held out: 12 of them, each a
#: combination never seen in training of an opening and an action that are seen (in others).
OPENINGS: tuple[str, ...] = (
    "When {A} and {B} went to the {PLACE},", "After {A} and {B} arrived at the {PLACE},",
    "While {A} and {B} were working at the {PLACE},", "Yesterday {A} and {B} met at the {PLACE}, and",
    "Once {A} and {B} got back from the {PLACE},", "Since {A} and {B} were both at the {PLACE},",
    "Before {A} and {B} left the {PLACE},", "As {A} and {B} were leaving the {PLACE},",
    "Then, {A} and {B} had a long talk at the {PLACE}.", "Last week {A} and {B} stayed late at the {PLACE}, so",
)
ACTIONS: tuple[str, ...] = (
    "{S} gave a {OBJECT} to", "{S} handed a {OBJECT} to", "{S} passed the {OBJECT} to", "{S} offered a {OBJECT} to",
    "{S} showed the {OBJECT} to", "{S} sent a {OBJECT} to", "{S} threw the {OBJECT} to", "{S} lent a {OBJECT} to",
)
_ALL = [(i, j, f"{o} {a}") for i, o in enumerate(OPENINGS) for j, a in enumerate(ACTIONS)]
#: Templates used in training, and the held-out ones (``(8 i + j) % 7 == 3`` for opening i, action j).
TRAIN_TEMPLATES: tuple[str, ...] = tuple(t for i, j, t in _ALL if (8 * i + j) % 7 != 3)
TEST_TEMPLATES: tuple[str, ...] = tuple(t for i, j, t in _ALL if (8 * i + j) % 7 == 3)
#: 300 names, far more than :data:`svtools.data.NAMES` (a word-level vocabulary has no single-token
#: constraint): with more training names (240) than model dimensions the circuits that compare and
#: copy names have to work on the whole space of name codes, so they cannot be specific to the
#: training names.
LM_NAMES: tuple[str, ...] = NAMES + (
    "Oliver", "Sophie", "Lucas", "Chloe", "Noah", "Ella", "Leo", "Grace", "Oscar", "Ruby", "Hugo", "Ivy",
    "Felix", "Maya", "Owen", "Clara", "Isaac", "Nora", "Theo", "Lucy", "Adrian", "Julia", "Victor", "Rachel",
    "Andrew", "Hannah", "Thomas", "Olivia", "Carl", "Diana", "Frank", "Irene", "Harry", "Megan", "Patrick",
    "Naomi", "Steven", "Wendy", "Brian", "Fiona", "Colin", "Tina", "Dennis", "Vera", "Gordon", "Paula",
    "Keith", "Sally", "Wayne", "Tessa", "Bruce", "Karen", "Louis", "Holly", "Ralph", "Monica", "Albert",
    "Esther", "Gavin", "Jenny", "Nathan", "Rita", "Walter", "Zoe",
    "Aaron", "Abigail", "Agnes", "Alan", "Amber", "Amelia", "Andrea", "Angela", "Arthur", "Audrey",
    "Barbara", "Beatrice", "Benjamin", "Bernard", "Beth", "Betty", "Billy", "Blake", "Bonnie", "Brandon",
    "Brenda", "Calvin", "Carla", "Carmen", "Caroline", "Carter", "Cecil", "Charles", "Charlotte", "Cheryl",
    "Chris", "Christine", "Cindy", "Claire", "Clifford", "Connor", "Craig", "Crystal", "Curtis", "Cynthia",
    "Dale", "Dana", "Daphne", "Darren", "Dean", "Debbie", "Denise", "Derek", "Dorothy", "Douglas", "Dylan",
    "Edgar", "Edith", "Edward", "Eileen", "Elaine", "Eleanor", "Eli", "Elijah", "Elise", "Ellen", "Emily",
    "Emmett", "Ethan", "Eugene", "Evan", "Evelyn", "Faith", "Felicity", "Flora", "Floyd", "Frances",
    "Gabriel", "Gary", "Gemma", "Gerald", "Gilbert", "Gina", "Glenn", "Gloria", "Greg", "Gwen", "Harold",
    "Harvey", "Hazel", "Heidi", "Herbert", "Howard", "Ian", "Ingrid", "Iris", "Isabel", "Jacob", "Janet",
    "Jasmine", "Jeffrey", "Jeremy", "Jerry", "Jessica", "Joan", "Joel", "Jordan", "Joseph", "Joyce",
    "Judith", "Justin", "Kathy", "Keira", "Kelly", "Kenneth", "Kyle", "Lance", "Larry", "Leah", "Leonard",
    "Leslie", "Lillian", "Lionel", "Lloyd", "Logan", "Lorna", "Luke", "Lydia", "Mabel", "Marcus", "Margaret",
    "Marion", "Mark", "Marvin", "Matthew", "Maurice", "Melanie", "Melvin", "Mia", "Miles", "Miriam", "Molly",
    "Morgan", "Nancy", "Neil", "Nicole", "Nigel", "Nina", "Norman", "Olga", "Oswald", "Pamela", "Percy",
    "Philip", "Phoebe", "Priscilla", "Quentin", "Ramona", "Randy", "Raymond", "Rebecca", "Rex", "Richard",
    "Roger", "Roland", "Ronald", "Rosa", "Rose", "Roy", "Russell", "Ruth", "Sabrina", "Samuel", "Sandra",
    "Scott", "Selma", "Seth", "Sharon", "Sheila", "Shirley", "Sidney", "Sophia", "Stanley", "Stella",
    "Stuart", "Sylvia", "Ted", "Terry", "Tiffany", "Timothy", "Todd", "Tracy", "Travis", "Trevor", "Ursula",
    "Valerie", "Vanessa", "Vernon", "Vincent", "Viola", "Violet", "Warren", "Wesley", "Willa", "William",
)
#: Every fifth name is held out of the training IOI sentences (it still occurs in filler).
TEST_NAMES: tuple[str, ...] = LM_NAMES[4::5]
TRAIN_NAMES: tuple[str, ...] = tuple(n for n in LM_NAMES if n not in TEST_NAMES)

#: Non-IOI sentences of our own. ``{N}``/``{M}`` are names, ``{PLACE}``/``{OBJECT}`` fillers.
#: They use the words of the held-out templates too, so those words are not unseen at test.
FILLER_TEMPLATES: tuple[str, ...] = (
    "{N} went to the {PLACE} .",
    "{N} bought a {OBJECT} at the {PLACE} .",
    "It was a quiet day at the {PLACE} .",
    "The {OBJECT} was on the table in the {PLACE} .",
    "{N} likes the {PLACE} very much .",
    "{N} and {M} live near the {PLACE} .",
    "{N} was tired , so {N} went home early .",
    "Last week {N} stayed late at the {PLACE} .",
    "Earlier today {N} ate lunch at the {PLACE} .",
    "Afterwards the {PLACE} was closed .",
    "As the rain started , {N} was leaving the {PLACE} .",
    "{N} quietly read a {OBJECT} at the {PLACE} .",
    "{N} mailed a {OBJECT} to the {PLACE} .",
    "{N} tossed the {OBJECT} back into the box .",
    "{N} met {M} at the {PLACE} , and they talked for a while .",
    "On Friday the {PLACE} was busy .",
    "The {OBJECT} from the {PLACE} was new .",
    "{N} said that {M} had found the {OBJECT} .",
    "{N} gave the {OBJECT} to a friend .",
    "Then {N} walked to the {PLACE} with {M} .",
    # one name, copied after "to": every name (held-out ones too) is seen as a word that can be
    # repeated from the context, without the IOI structure (two names, one repeated)
    "{N} was happy , and everyone waved to {N} .",
    "When {N} came back , the dog ran to {N} .",
    "{N} found the {OBJECT} , so it went back to {N} .",
    "The {OBJECT} at the {PLACE} was given to {N} .",
    "Everyone at the {PLACE} was kind to {N} , and {N} was glad .",
)

_NAMELESS = tuple(t for t in FILLER_TEMPLATES if "{N}" not in t)

_BOS, _PAD, _UNK = "<bos>", "<pad>", "<unk>"


def cache_dir() -> Path:
    """Where trained runs live: ``$SVTOOLS_CACHE/ioi_lm`` (default ``~/.cache/svtools/ioi_lm``)."""
    return _cache.root() / "ioi_lm"


#: Seeds of :func:`train` lie in ``[0, SEED_MAX]`` (the name codes derive generator seeds from it).
SEED_MAX = 2**32 - 1


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


# ----------------------------------------------------------------------------- text and tokenizer

def _words(texts: Sequence[str]) -> list[str]:
    from tokenizers.pre_tokenizers import Whitespace

    pre = Whitespace()
    return [w for t in texts for w, _ in pre.pre_tokenize_str(t)]


@functools.lru_cache(maxsize=1)
def _vocabulary() -> tuple[str, ...]:
    fill = {"N": "x", "M": "x", "A": "x", "B": "x", "S": "x", "PLACE": "x", "OBJECT": "x"}
    texts = [t.format(**fill) for t in (*TRAIN_TEMPLATES, *TEST_TEMPLATES, *FILLER_TEMPLATES)]
    words = set(_words(texts)) | set(LM_NAMES) | set(PLACES) | set(OBJECTS) | {"."}
    words.discard("x")
    return (_PAD, _BOS, _UNK, *sorted(words))


def build_tokenizer() -> Any:
    """The word-level tokenizer (a ``PreTrainedTokenizerFast``), built offline from the word lists.

    Splits on whitespace and punctuation (``\\w+|[^\\w\\s]+``), one id per word, adds ``<bos>`` in
    front of every text, pads with ``<pad>`` (id 0) on the right; unknown words map to
    ``<unk>``. The same vocabulary on every machine (sorted word list).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(_vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=_UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single=f"{_BOS} $A", special_tokens=[(_BOS, vocab[_BOS])])
    # name_or_path / add_bos_token: TransformerLens reads them and would otherwise try to reload
    # the tokenizer from the hub under its name to make it add a BOS (this one already does).
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=_BOS, eos_token=_BOS, pad_token=_PAD,
                                   unk_token=_UNK, name_or_path="svtools-ioi-lm", add_bos_token=True)
    fast.padding_side = "right"
    return fast


def filler_sentences(n: int, *, seed: int = 0, names: Sequence[str] = LM_NAMES,
                     test_share: Optional[float] = None) -> list[str]:
    """``n`` filler (non-IOI) sentences from :data:`FILLER_TEMPLATES`, deterministic in ``seed``.

    Names are drawn uniformly from ``names``; with ``test_share`` (a probability), each name slot
    is instead a held-out name (:data:`TEST_NAMES`) with that probability and a training name
    otherwise (two slots of one sentence never get the same name).
    """
    n = as_int(n, "n", min_value=0)
    seed = as_int(seed, "seed")
    if test_share is not None:
        test_share = as_float(test_share, "test_share (a probability, or None)", lo=0.0, hi=1.0)
    if isinstance(names, str) or not all(isinstance(v, str) for v in names) or len(set(names)) < 2:
        raise SVToolsError(f"names must be a list of at least 2 different names (a sentence may hold two), "
                           f"got {names!r}")
    rng = random.Random(seed)

    def pick() -> str:
        return rng.choice(TEST_NAMES if rng.random() < test_share else TRAIN_NAMES)

    out = []
    for _ in range(n):
        t = rng.choice(FILLER_TEMPLATES)
        if test_share is None:
            a, b = rng.sample(list(names), 2)
        else:
            a = pick()
            b = pick()
            while b == a:
                b = pick()
        out.append(t.format(N=a, M=b, PLACE=rng.choice(PLACES), OBJECT=rng.choice(OBJECTS)))
    return out


def training_texts(n: int, *, seed: int = 0, ioi_fraction: float = 0.5,
                   test_share: Optional[float] = None) -> list[str]:
    """``n`` training sequences: IOI sentences with their answer, or one/two filler sentences.

    An IOI sequence is a prompt of the training split (:data:`TRAIN_TEMPLATES`,
    :data:`TRAIN_NAMES`) followed by `` IO .``; a filler sequence is one or two sentences of
    :func:`filler_sentences` (``test_share`` as there; :class:`IOILMConfig` trains with its
    ``filler_test_share``); half of the IOI sentences follow a filler sentence without names (so
    names move around). Which is which is drawn with ``random.Random(seed)``.
    """
    n = as_int(n, "n", min_value=0)
    seed = as_int(seed, "seed")
    ioi_fraction = as_float(ioi_fraction, "ioi_fraction", lo=0.0, hi=1.0)
    if test_share is not None:
        test_share = as_float(test_share, "test_share (a probability, or None)", lo=0.0, hi=1.0)
    return _training_batch(n, seed, ioi_fraction, test_share)[0]


def _training_batch(n: int, seed: int, ioi_fraction: float,
                    test_share: Optional[float] = None) -> tuple[list[str], list[bool]]:
    rng = random.Random(seed)
    is_ioi = [rng.random() < ioi_fraction for _ in range(n)]
    n_ioi = sum(is_ioi)
    ioi = ioi_prompts(max(n_ioi, 1), seed=rng.randrange(2**31), templates=TRAIN_TEMPLATES, names=TRAIN_NAMES)
    fill = filler_sentences(2 * n, seed=rng.randrange(2**31), test_share=test_share)
    out, i, j = [], 0, 0
    for flag in is_ioi:
        if flag:
            p = ioi[i]
            # half of the IOI sentences follow a short sentence without names, so the names sit
            # at varying positions and position alone cannot solve the task
            pre = ""
            if rng.random() < 0.5:
                pre = rng.choice(_NAMELESS).format(PLACE=rng.choice(PLACES), OBJECT=rng.choice(OBJECTS)) + " "
            out.append(f"{pre}{p.text} {p.io} .")
            i += 1
        else:
            k = 1 + (rng.random() < 0.5)
            out.append(" ".join(fill[j:j + k]))
            j += k
    return out, is_ioi


def _encode(tok: Any, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
    enc = tok(list(texts), padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


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


def name_ids() -> Tensor:
    """The token ids of :data:`LM_NAMES` in :func:`build_tokenizer`'s vocabulary, ``(300,)``."""
    vocab = {w: i for i, w in enumerate(_vocabulary())}
    return torch.tensor([vocab[n] for n in LM_NAMES])


def name_codes(cfg: IOILMConfig, seed: int, step: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """The name embeddings when ``cfg.freeze_names``: ``(ids, codes)``, ``codes`` ``(names, d_model)``.

    ``codes[i] = name_shared * n + g_i / sqrt(d_model)``: one unit vector ``n`` shared by every
    name (so a name is recognisable as a name) plus an independent Gaussian code ``g_i ~ N(0, I)``
    per name. ``n`` is drawn from a generator seeded by ``seed``.

    ``step=None``: the run's fixed codes (``g_i`` from the same generator), the name rows of every
    saved checkpoint. ``step=k``: the codes the training step ``k`` uses when
    ``cfg.resample_names`` (same ``n``, fresh ``g_i`` from a generator seeded by ``seed`` and
    ``k``). Training never learns these rows (the embedding is tied to the unembedding, so neither
    side of a name is learnt): nothing in the model is specific to one name, and any name, held out
    or not, is to the model a draw from the same distribution.
    """
    if step is not None and (isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0):
        raise SVToolsError(f"step must be None or a non-negative int, got {step!r}")
    seed = as_seed(seed, "seed", max_value=SEED_MAX)
    g = torch.Generator().manual_seed(int(seed) + 7919)
    n = torch.randn(cfg.d_model, generator=g, dtype=torch.float64)
    n = n / n.norm()
    ids = name_ids()
    if step is not None:
        g = torch.Generator().manual_seed((int(seed) + 7919) * 1_000_003 + int(step) + 1)
    g_codes = torch.randn(len(ids), cfg.d_model, generator=g, dtype=torch.float64)
    codes = cfg.name_shared * n + g_codes / math.sqrt(cfg.d_model)
    return ids, codes.float()


def _key_config(cfg: IOILMConfig) -> dict:
    """The config as the cache key hashes it (the seed is the run's, not the config's default)."""
    return dataclasses.asdict(cfg.replace(seed=0))


def _key(cfg: IOILMConfig, seed: int) -> str:
    blob = json.dumps({"cfg": _key_config(cfg), "seed": int(seed),
                       "code": CODE_VERSION, "vocab": _vocabulary(), "text": [TRAIN_TEMPLATES, TEST_TEMPLATES,
                                                                              TRAIN_NAMES, FILLER_TEMPLATES]},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


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
        from svtools.models import load_model

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
        model = self.hf_model(step, device)
        tokens = dataset.tokens(self.tokenizer, device=next(model.parameters()).device)
        with torch.no_grad():
            out = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).logits
        r = torch.arange(len(dataset), device=out.device)
        return out[r, tokens.positions.end].float().cpu()

    def accuracy(self, step: int, *, n: int = 256, seed: int = 12345, split: str = "test",
                 metric: str = "top1") -> float:
        """Fraction of ``n`` prompts of ``split`` the model gets right at checkpoint ``step``.

        ``metric="top1"``: the IO name is the model's most likely next token at END, over the
        whole vocabulary (strict); ``"io_vs_s"``: the IO name's logit beats the subject's (the
        usual IOI metric). Held-out by default: names and templates never in a training IOI
        sentence.
        """
        _check_metric(metric)
        ds = self.prompts(n, seed, split)
        return ioi_accuracy(self.logits(step, ds), ds.positions(self.tokenizer), metric)


def _check_metric(metric: str) -> None:
    if metric not in ("top1", "io_vs_s"):
        raise SVToolsError(f"metric must be 'top1' or 'io_vs_s', got {metric!r}")


def ioi_accuracy(logits: Float[Tensor, "batch vocab"], positions: Any, metric: str = "top1") -> float:
    """Share of prompts answered correctly from their next-token logits at END.

    ``metric="top1"``: ``argmax(logits[i]) == io_id[i]``; ``"io_vs_s"``: ``logits[i, io_id[i]] >
    logits[i, s_id[i]]``. ``positions``: the prompts' :class:`~svtools.data.IOIPositions`.
    """
    _check_metric(metric)
    io, s = positions.io_id.to(logits.device), positions.s_id.to(logits.device)
    same = int((io == s).sum())
    if same:
        raise SVToolsError(f"in {same} of {len(io)} prompts IO and S are the same token: 'IO beats S' is never "
                           "true there and top-1 cannot tell them apart (names the tokenizer does not know?)")
    if logits.ndim != 2 or logits.shape[0] != len(io):
        raise SVToolsError(f"logits must have shape (batch={len(io)}, vocab), got {tuple(logits.shape)}")
    if metric == "top1":
        ok = logits.argmax(-1) == io
    else:
        r = torch.arange(len(io), device=logits.device)
        ok = logits[r, io] > logits[r, s]
    return float(ok.float().mean())


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
        device: default cuda when available, else cpu.
        cache: read and write the on-disk cache (``$SVTOOLS_CACHE``, see :func:`cache_dir`).
            With ``cache=False`` the run is written to a fresh temporary directory.
    """
    cfg = IOILMConfig() if cfg is None else cfg
    if not isinstance(cfg, IOILMConfig):
        raise SVToolsError(f"cfg must be an IOILMConfig, got {type(cfg).__name__}")
    seed = as_seed(cfg.seed if seed is None else seed, "seed", max_value=SEED_MAX)
    cache = as_bool(cache, "cache")
    key = _key(cfg, seed)
    where = cache_dir() if cache else None
    if cache:
        _cache.check_root(where)
        _cache.clean_stale(where, "ioi_lm_")
        hit = _load_cached(where / key, cfg, seed)
        if hit is not None:
            return hit

    dev = default_device(device)
    # the build directory first: a cache that cannot be written is said before minutes of training
    with _cache.building(where, prefix=f"ioi_lm_{key}_") as tmp:
        tok = build_tokenizer()
        model = _new_model(cfg, len(tok), seed, training=True).to(dev).train()
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
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
        if cache:  # atomic; when a concurrent trainer of this key published first, its entry is kept
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
            if cfg.resample_names:  # this step's names: fresh codes (the checkpoints hold the fixed ones)
                with torch.no_grad():
                    wte[frozen[0]] = name_codes(cfg, seed, step)[1].to(dev)
            texts, is_ioi = _training_batch(cfg.batch, seed * 1_000_003 + step, cfg.ioi_fraction,
                                             cfg.filler_test_share)
            ids, am = _encode(tok, texts)
            # weight of each target token: 1, answer_weight at an IOI sentence's answer (the
            # target two before the end: "... to IO ."), 0 at padding
            w = am[:, 1:].to(torch.float32)
            if cfg.answer_weight != 1.0:
                last = am.sum(1) - 1  # index of the final "." in ids; the answer target is at last - 2
                rows = torch.nonzero(torch.tensor(is_ioi)).flatten()
                w[rows, last[rows] - 2] = cfg.answer_weight
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


# ----------------------------------------------------------------------------- heads by role

#: (query role, key role) pairs whose attention :func:`role_attention` measures.
ROLE_PAIRS: tuple[tuple[str, str], ...] = (("END", "IO"), ("END", "S1"), ("END", "S2"), ("S2", "S1"),
                                           ("S2", "IO"))


def role_attention(model: Any, dataset: IOIDataset, *, batch_size: int = 64) -> pd.DataFrame:
    """Mean attention of every head between the IOI roles, over the prompts of ``dataset``.

    For each (layer, head) and each (query role, key role) of :data:`ROLE_PAIRS`: the mean over
    prompts of ``pattern[prompt, head, pos[query role], pos[key role]]``, with a 95% interval
    over prompts (normal approximation). Heads "that move the IO name" are those with a large
    END -> IO weight (name movers, Wang et al. 2022); ``S2 -> S1`` marks duplicate-token heads.
    Works on any model :func:`svtools.load_model` gives (with a tokenizer).

    Returns a long frame: ``layer, head, query_role, key_role, mean, lo, hi, prompts``.
    """
    from svtools.decomposition import _run_once
    from svtools.models import check_bridge
    from svtools.sad import ioi_tokens

    check_bridge(model)
    batch_size = as_int(batch_size, "batch_size", min_value=1)
    ids, am, pos = ioi_tokens(model, dataset)
    dev = next(model.original_model.parameters()).device if hasattr(model, "original_model") else ids.device
    layers = list(range(model.cfg.n_layers))
    sums: dict[tuple[str, str], list[Tensor]] = {rp: [] for rp in ROLE_PAIRS}
    roles = {"IO": pos.io, "S1": pos.s1, "S2": pos.s2, "END": pos.end}
    for start in range(0, len(ids), batch_size):
        sl = slice(start, start + batch_size)
        cached = _run_once(model, ids[sl].to(dev), am[sl].to(dev), layers)
        pat = torch.stack([cached[f"blocks.{l}.attn.hook_pattern"] for l in layers], 1).float().cpu()
        r = torch.arange(pat.shape[0])
        for q, k in ROLE_PAIRS:
            qi, ki = roles[q][sl].cpu(), roles[k][sl].cpu()
            sums[(q, k)].append(pat[r, :, :, qi, ki])  # (batch, layer, head)
    rows = []
    for (q, k), chunks in sums.items():
        a = torch.cat(chunks).double()  # (prompts, layer, head)
        m, sd = a.mean(0), a.std(0) if len(a) > 1 else torch.zeros_like(a[0])
        half = 1.96 * sd / math.sqrt(len(a))
        for layer in layers:
            for h in range(a.shape[2]):
                rows.append({"layer": layer, "head": h, "query_role": q, "key_role": k,
                             "mean": float(m[layer, h]), "lo": float(m[layer, h] - half[layer, h]),
                             "hi": float(m[layer, h] + half[layer, h]), "prompts": len(a)})
    return pd.DataFrame(rows)


def top_heads(roles: pd.DataFrame, *, query_role: str = "END", key_role: str = "IO", k: int = 1,
              by: Sequence[str] = ()) -> pd.DataFrame:
    """The ``k`` heads with the largest mean ``query_role -> key_role`` attention in a
    :func:`role_attention` frame (per group of ``by``, e.g. ``("seed",)``): the heads found *by
    their role*, e.g. the heads that move the IO name to END (name movers)."""
    by = as_names(by, "by")
    k = as_int(k, "k", min_value=1)
    check_columns(roles, ["layer", "head", "query_role", "key_role", "mean", *by], "top_heads (a role_attention frame)")
    sel = roles[(roles["query_role"] == query_role) & (roles["key_role"] == key_role)]
    if sel.empty:
        raise SVToolsError(f"no rows for {query_role} -> {key_role}; roles measured: {ROLE_PAIRS}")
    if by:
        return sel.sort_values("mean", ascending=False).groupby(list(by), sort=True).head(k) \
            .sort_values([*by, "mean"], ascending=[True] * len(by) + [False]).reset_index(drop=True)
    return sel.nlargest(k, "mean").reset_index(drop=True)


def over_checkpoints(run: IOILMRun, steps: Sequence[int], dataset: IOIDataset, *, heads: Any = None,
                     sad_kwargs: Optional[dict] = None, progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Role attention and SAD of one run at several checkpoints, on one set of prompts.

    For each step: :func:`role_attention` of every head, and, unless ``sad_kwargs`` is None,
    :func:`svtools.sad.head_sparsity` of ``heads`` (``(layer, head)`` pairs; None = all) on the
    same prompts with ``sad_kwargs`` (e.g. ``baseline=["non-attended", "random"]``), its rows
    labelled by IOI role (:func:`svtools.sad.label_ioi_roles`). Both frames get ``seed`` and
    ``step`` columns. Returns ``(roles, pairs)`` (``pairs`` empty when ``sad_kwargs`` is None).
    """
    from svtools import sad

    if not isinstance(run, IOILMRun):
        raise SVToolsError(f"run must be an IOILMRun (from ioi_lm.train), got {type(run).__name__}")
    steps = [run._check_step(s) for s in (steps if isinstance(steps, (list, tuple, range)) else [steps])]
    if not steps:
        raise SVToolsError(f"steps is empty: give checkpoint steps of the run ({run.checkpoints})")
    frames_r, frames_p = [], []
    for step in tqdm(steps, desc=f"ioi_lm seed {run.seed} checkpoints", disable=not progress):
        model = run.load(step)
        ra = role_attention(model, dataset)
        frames_r.append(ra.assign(seed=run.seed, step=int(step)))
        if sad_kwargs is not None:
            ids, am, pos = sad.ioi_tokens(model, dataset)
            df = sad.head_sparsity(model, ids, attention_mask=am, heads=heads, progress=False, **sad_kwargs)
            frames_p.append(sad.label_ioi_roles(df, pos).assign(seed=run.seed, step=int(step)))
        del model
    pairs = pd.concat(frames_p, ignore_index=True) if frames_p else pd.DataFrame()
    return pd.concat(frames_r, ignore_index=True), pairs


def over_seeds(frame: pd.DataFrame, value: str, *, by: Sequence[str], seed: str = "seed",
               ci: float = 0.95) -> pd.DataFrame:
    """Mean of ``value`` over seeds per group of ``by``, with a t interval over seeds.

    ``frame`` holds one row per (seed, group), e.g. per-seed estimates. Returns ``by...``,
    ``mean``, ``lo``, ``hi`` (``mean -+ t_{(1+ci)/2, n-1} sd / sqrt(n)``; equal to the mean with
    one seed), ``seed_min``, ``seed_max``, ``seeds``.
    """
    from scipy import stats

    by = as_names(by, "by")
    ci = as_float(ci, "ci", lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    for arg, name in (("seed", seed), ("value", value)):
        if not isinstance(name, str):
            raise SVToolsError(f"{arg} must be a column name, got {name!r}")
    check_columns(frame, [*by, seed, value], "over_seeds")
    check_numeric_columns(frame, [value], "over_seeds")
    dup = frame.duplicated(subset=[*by, seed], keep=False)
    if dup.any():
        first = frame.loc[dup, [*by, seed]].iloc[0].to_dict()
        raise SVToolsError(f"over_seeds needs one row per ({', '.join([seed, *by])}); {int(dup.sum())} rows repeat "
                           f"a seed within a group (e.g. {first}): average them per seed first")
    rows = []
    kept = frame.dropna(subset=[value])
    for key, g in (kept.groupby(by, sort=True) if by else [((), kept)]):
        key = key if isinstance(key, tuple) else (key,)
        v = g[value].to_numpy(dtype=float)
        m = float(v.mean())
        half = float(stats.t.ppf((1 + ci) / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0
        rows.append(dict(zip(by, key)) | {"mean": m, "lo": m - half, "hi": m + half, "seed_min": float(v.min()),
                                           "seed_max": float(v.max()), "seeds": int(g[seed].nunique())})
    return pd.DataFrame(rows)
