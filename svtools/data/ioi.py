"""Indirect-object-identification (IOI) prompts with the token positions of their names.

An IOI prompt names two people, then repeats one of them (the *subject* S) and stops where the
other (the *indirect object* IO) should come next::

    When Mary and John went to the store, John gave a drink to      -> " Mary"
         IO       S1                      S2                    END

Two name orders are generated: ``ABBA`` (IO named first: "Mary and John ..., John ... to") and
``BABA`` (S named first: "John and Mary ..., John ... to"). Templates, names, places and objects
are our own. Generation is seeded and uses :class:`random.Random`, so the same seed gives the same
prompts on every machine.

Token positions are computed for a given (fast, Hugging Face) tokenizer from the character offsets
it reports, never by assuming one word = one token, and are checked: each name must be exactly one
token, else :class:`~svtools._checks.SVToolsError` names the prompt and the name
(:func:`single_token_names` selects the names that survive a tokenizer beforehand).

Conventions for positions (``IOIPositions``):

* Indices are into the token ids *as the model sees them*: ``tokenizer(text,
  add_special_tokens=True)`` by default, so a ``[CLS]`` (BERT) or BOS (tokenizers that add one)
  counts as position 0. GPT-2's tokenizer adds no BOS; TransformerLens may prepend one
  itself: pass ``prepend_bos=True`` to both :meth:`IOIDataset.positions` and
  :meth:`IOIDataset.tokens` to get that layout.
* ``END`` is the last real token of the prompt (the word after which IO should be predicted, "to"
  in most templates): the last token that is neither padding nor special. For BERT it is the token
  just before ``[SEP]``; for a bidirectional model it is simply the final word token.
* Batches are padded on the **right**, so a prompt's positions do not depend on the batch it sits
  in; they match ``tokenizer(texts, padding=True)`` whenever the tokenizer pads on the right (its
  ``padding_side``), which is what :meth:`IOIDataset.tokens` always does, whatever
  ``padding_side`` says.
"""

from __future__ import annotations

import random
import string
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Optional, Sequence, Union

import torch
from jaxtyping import Int
from torch import Tensor

from svtools._checks import SVToolsError, as_int
from svtools.runtime import default_device

if TYPE_CHECKING:  # pragma: no cover - typing only
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "TEMPLATES", "NAMES", "PLACES", "OBJECTS", "ORDERS",
    "IOIPrompt", "IOIPositions", "IOITokens", "IOIDataset", "UnknownWordsWarning",
    "ioi_prompts", "single_token_names",
]

# Fields a template may use. {A} and {B} are the two names of the first clause (in text order),
# {S} is the repeated subject (S2); {PLACE} and {OBJECT} are fillers.
_FIELDS = {"A", "B", "S", "PLACE", "OBJECT"}

TEMPLATES: tuple[str, ...] = (
    "When {A} and {B} went to the {PLACE}, {S} gave a {OBJECT} to",
    "After {A} and {B} arrived at the {PLACE}, {S} handed a {OBJECT} to",
    "Then, {A} and {B} had a long talk at the {PLACE}. {S} passed the {OBJECT} to",
    "While {A} and {B} were working at the {PLACE}, {S} offered a {OBJECT} to",
    "Yesterday {A} and {B} met at the {PLACE}, and {S} brought a {OBJECT} to",
    "On Friday, {A} and {B} walked to the {PLACE}. Later, {S} showed the {OBJECT} to",
    "The day {A} and {B} visited the {PLACE}, {S} sent a {OBJECT} to",
    "Once {A} and {B} got back from the {PLACE}, {S} threw the {OBJECT} to",
    "At the {PLACE}, {A} and {B} sat down together, and {S} gave the {OBJECT} to",
    "Since {A} and {B} were both at the {PLACE}, {S} lent a {OBJECT} to",
    "When {A} and {B} finished cleaning the {PLACE}, {S} sold the {OBJECT} to",
    "Before {A} and {B} left the {PLACE}, {S} returned the {OBJECT} to",
    "Last week {A} and {B} stayed late at the {PLACE}, so {S} mailed a {OBJECT} to",
    "As {A} and {B} were leaving the {PLACE}, {S} tossed the {OBJECT} to",
    "After {A} met {B} at the {PLACE}, {S} quietly gave the {OBJECT} to",
    "Earlier today {A} and {B} ate lunch at the {PLACE}. Afterwards {S} gave the {OBJECT} back to",
)

# Common short first names; each is one token for GPT-2/Pythia-style byte-level BPE (with its
# leading space) and one WordPiece in the lowercased BERT vocabulary. Names that are also common
# English words (Rose, Mark, Grace, ...) are left out.
NAMES: tuple[str, ...] = (
    "Mary", "John", "Tom", "James", "Sarah", "Paul", "Kate", "Lisa", "David", "Emma",
    "Jack", "Alice", "Peter", "Laura", "Sam", "Amy", "Ben", "Helen", "Daniel", "Adam",
    "Eric", "Jane", "Henry", "Susan", "George", "Alex", "Anne", "Michael", "Robert", "Linda",
    "Kevin", "Jason", "Ryan", "Martin", "Anna", "Simon",
)

PLACES: tuple[str, ...] = (
    "store", "park", "market", "school", "library", "station", "cafe", "office", "garden",
    "beach", "museum", "restaurant", "hospital", "house", "bakery", "gym",
)

# Objects start with a consonant sound so that "a {OBJECT}" reads correctly.
OBJECTS: tuple[str, ...] = (
    "book", "ball", "drink", "letter", "key", "bag", "ring", "box", "cake", "card", "pen",
    "hat", "gift", "phone", "ticket", "basket",
)

ORDERS: tuple[str, ...] = ("ABBA", "BABA")


class _NameTokenError(SVToolsError):
    """A name is not exactly one token (or its two mentions tokenise differently, or the tokenizer
    does not know it)."""


class UnknownWordsWarning(UserWarning):
    """Some IOI prompts hold words the tokenizer maps to its unknown token (e.g. the IOI language
    model's word-level tokenizer on the default :data:`TEMPLATES`)."""


@dataclass(frozen=True)
class IOIPrompt:
    """One IOI prompt with the character spans ``(start, end)`` of its three name mentions."""

    text: str
    io: str
    s: str
    template_id: int
    order: str  # "ABBA" (IO named first) or "BABA" (S named first)
    place: str
    obj: str
    io_span: tuple[int, int]
    s1_span: tuple[int, int]
    s2_span: tuple[int, int]


@dataclass(frozen=True)
class IOIPositions:
    """Per-prompt token indices (into the ids the model sees) and the ids of the two names.

    All fields have shape ``(batch,)``; ``length`` is the number of non-padding tokens, so a
    right-padded row ``i`` is real up to ``length[i]`` (exclusive).
    """

    io: Int[Tensor, "batch"]
    s1: Int[Tensor, "batch"]
    s2: Int[Tensor, "batch"]
    end: Int[Tensor, "batch"]
    length: Int[Tensor, "batch"]
    io_id: Int[Tensor, "batch"]
    s_id: Int[Tensor, "batch"]

    @property
    def first(self) -> Int[Tensor, "batch"]:
        """Position of the first name of the opening clause (``{A}``): ``io`` in ABBA prompts,
        ``s1`` in BABA prompts. Identity: ``first == minimum(io, s1)`` (every template names
        ``{A}`` before ``{B}``, both before ``{S}``)."""
        return torch.minimum(self.io, self.s1)

    @property
    def second(self) -> Int[Tensor, "batch"]:
        """Position of the second name of the opening clause (``{B}``): ``maximum(io, s1)``."""
        return torch.maximum(self.io, self.s1)

    def as_dict(self) -> dict[str, Tensor]:
        """``{"IO": io, "S1": s1, "S2": s2, "END": end}``."""
        return {"IO": self.io, "S1": self.s1, "S2": self.s2, "END": self.end}

    def to(self, device: Union[str, torch.device]) -> "IOIPositions":
        """The same positions on ``device``."""
        return IOIPositions(**{k: getattr(self, k).to(device) for k in self.__dataclass_fields__})


@dataclass(frozen=True)
class IOITokens:
    """Right-padded token ids of a dataset with the matching positions (all on one device)."""

    input_ids: Int[Tensor, "batch seq"]
    attention_mask: Int[Tensor, "batch seq"]
    positions: IOIPositions


def _parse_template(template: str, idx: int) -> list[tuple[str, Optional[str]]]:
    """Split a template into ``(literal, field)`` pieces, validating its fields."""
    if not isinstance(template, str):
        raise SVToolsError(f"template {idx} must be a string, got {type(template).__name__}")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise SVToolsError(f"template {idx} is not a valid format string: {template!r} ({exc})") from exc
    for _, fld, spec, conv in parsed:
        if fld is not None and (spec or conv):
            raise SVToolsError(f"template {idx}: field {{{fld}}} has a format spec or conversion "
                               f"({'!' + conv if conv else ''}{':' + spec if spec else ''}); write plain "
                               f"{{{fld}}} (padding would shift the name's characters): {template!r}")
    pieces = [(lit, fld) for lit, fld, _, _ in parsed]
    fields = [f for _, f in pieces if f is not None]
    unknown = sorted(set(fields) - _FIELDS)
    if unknown:
        raise SVToolsError(f"template {idx} uses unknown field(s) {unknown}; allowed: {sorted(_FIELDS)}: {template!r}")
    for name in ("A", "B", "S"):
        if fields.count(name) != 1:
            raise SVToolsError(f"template {idx} must contain {{{name}}} exactly once: {template!r}")
    if not fields.index("A") < fields.index("B") < fields.index("S"):
        raise SVToolsError(f"template {idx} must mention {{A}}, {{B}}, {{S}} in that order: {template!r}")
    for k, (lit, fld) in enumerate(pieces):
        if fld in ("A", "B", "S"):
            if not lit.endswith(" "):
                raise SVToolsError(f"template {idx}: {{{fld}}} must follow a space (names are read with "
                                   f"their leading space, as byte-level BPE sees them): {template!r}")
    if pieces[-1][1] is not None or not pieces[-1][0].strip():
        raise SVToolsError(f"template {idx} must end with a word after the last field (the END token): {template!r}")
    return pieces


def _check_pool(values: Sequence[str], what: str, min_len: int) -> tuple[str, ...]:
    values = tuple(values)
    if len(values) < min_len:
        raise SVToolsError(f"{what} needs at least {min_len} entries, got {len(values)}")
    if len(set(values)) != len(values):
        raise SVToolsError(f"{what} has duplicates")
    for v in values:
        if not isinstance(v, str) or not v or v != v.strip() or any(c.isspace() for c in v):
            raise SVToolsError(f"{what} entries must be non-empty words without spaces, got {v!r}")
    return values


def _fill(pieces, values: dict[str, str]) -> tuple[str, dict[str, tuple[int, int]]]:
    text, spans = "", {}
    for lit, fld in pieces:
        text += lit
        if fld is not None:
            spans[fld] = (len(text), len(text) + len(values[fld]))
            text += values[fld]
    return text, spans


class IOIDataset(Sequence[IOIPrompt]):
    """An immutable list of :class:`IOIPrompt` with tokenisation helpers.

    Build it with :func:`ioi_prompts`. Indexing with an int gives a prompt, with a slice a
    smaller ``IOIDataset``.
    """

    def __init__(self, prompts: Sequence[IOIPrompt], seed: Optional[int] = None):
        self.prompts: tuple[IOIPrompt, ...] = tuple(prompts)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return IOIDataset(self.prompts[i], self.seed)
        return self.prompts[i]

    def __iter__(self) -> Iterator[IOIPrompt]:
        return iter(self.prompts)

    def __repr__(self) -> str:
        n_abba = sum(p.order == "ABBA" for p in self.prompts)
        return f"IOIDataset(n={len(self)}, ABBA={n_abba}, BABA={len(self) - n_abba}, seed={self.seed})"

    @property
    def texts(self) -> list[str]:
        """The prompt strings, in order."""
        return [p.text for p in self.prompts]

    @property
    def io_names(self) -> list[str]:
        return [p.io for p in self.prompts]

    @property
    def s_names(self) -> list[str]:
        return [p.s for p in self.prompts]

    @property
    def template_ids(self) -> list[int]:
        return [p.template_id for p in self.prompts]

    def positions(self, tokenizer: "PreTrainedTokenizerBase", *, add_special_tokens: bool = True,
                  prepend_bos: bool = False) -> IOIPositions:
        """Token indices of IO, S1, S2 and END in each prompt's ids, checked against the tokens.

        ``add_special_tokens`` is passed to the tokenizer (True: the ids the model sees, with any
        ``[CLS]``/BOS it adds). ``prepend_bos=True`` shifts every index by one for a BOS token put
        in front *in addition* (TransformerLens style; :meth:`tokens` does the same).
        Identity: ``ids[i, positions.io[i]] == positions.io_id[i]`` and the token at ``io``
        decodes to the IO name (lowercased for uncased tokenizers); same for S1, S2 with ``s_id``.
        Raises :class:`SVToolsError` if a name is not exactly one token.
        """
        return self._encode(tokenizer, add_special_tokens=add_special_tokens, prepend_bos=prepend_bos)[1]

    def tokens(self, tokenizer: "PreTrainedTokenizerBase", *, device: Union[str, torch.device, None] = None,
               add_special_tokens: bool = True, prepend_bos: bool = False) -> IOITokens:
        """Right-padded ``input_ids``/``attention_mask`` ``(batch, seq)`` with matching positions.

        Row ``i`` holds ``tokenizer(text_i, add_special_tokens=...)`` ids (after a BOS if
        ``prepend_bos``), then the pad id (``pad_token_id``, else ``eos_token_id``, else 0) with
        mask 0. Tensors go to ``device`` (default: cuda when available, else cpu).
        """
        ids, pos = self._encode(tokenizer, add_special_tokens=add_special_tokens, prepend_bos=prepend_bos)
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        seq = max(len(r) for r in ids)
        input_ids = torch.full((len(ids), seq), int(pad), dtype=torch.long)
        mask = torch.zeros((len(ids), seq), dtype=torch.long)
        for i, row in enumerate(ids):
            input_ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, :len(row)] = 1
        dev = default_device(device)
        return IOITokens(input_ids.to(dev), mask.to(dev), pos.to(dev))

    def _encode(self, tokenizer, *, add_special_tokens: bool, prepend_bos: bool):
        if len(self) == 0:
            raise SVToolsError("the IOI dataset is empty")
        if not getattr(tokenizer, "is_fast", False):
            raise SVToolsError("IOI positions need a fast tokenizer (character offsets); "
                               f"got {type(tokenizer).__name__}. Load it with use_fast=True.")
        bos_id = None
        if prepend_bos:
            bos_id = tokenizer.bos_token_id
            if bos_id is None:
                raise SVToolsError(f"prepend_bos=True but the tokenizer {type(tokenizer).__name__} has no bos_token")
        shift = int(prepend_bos)
        unk = getattr(tokenizer, "unk_token_id", None)
        unknown_words: dict[str, int] = {}  # word the tokenizer does not know -> prompts it is in
        all_ids: list[list[int]] = []
        cols: dict[str, list[int]] = {k: [] for k in ("io", "s1", "s2", "end", "length", "io_id", "s_id")}
        for i, p in enumerate(self.prompts):
            enc = tokenizer(p.text, add_special_tokens=add_special_tokens, return_offsets_mapping=True,
                            return_special_tokens_mask=True)
            ids = list(enc["input_ids"])
            offsets = [tuple(o) for o in enc["offset_mapping"]]
            special = list(enc["special_tokens_mask"])

            def locate(span: tuple[int, int], role: str, name: str) -> int:
                a, b = span
                hits = [j for j, (s, e) in enumerate(offsets) if not special[j] and s < e and s < b and e > a]
                if len(hits) != 1 or p.text[offsets[hits[0]][0]:offsets[hits[0]][1]].strip() != name:
                    pieces = [p.text[offsets[j][0]:offsets[j][1]] for j in hits]
                    raise _NameTokenError(
                        f"prompt {i} ({p.text!r}): name {name!r} ({role}) is not exactly one token for "
                        f"{type(tokenizer).__name__}; it covers tokens {pieces}. Drop it from the name list "
                        f"(see svtools.data.single_token_names) or use another tokenizer.")
                return hits[0]

            io = locate(p.io_span, "IO", p.io)
            s1 = locate(p.s1_span, "S1", p.s)
            s2 = locate(p.s2_span, "S2", p.s)
            real = [j for j in range(len(ids)) if not special[j] and offsets[j][0] < offsets[j][1]]
            end = real[-1]
            if offsets[end][1] != len(p.text.rstrip()):
                raise SVToolsError(f"prompt {i} ({p.text!r}): the last real token does not end the text; "
                                   f"cannot locate END for {type(tokenizer).__name__}")
            if not (max(io, s1) < s2 < end):
                raise SVToolsError(f"prompt {i} ({p.text!r}): positions out of order "
                                   f"(IO={io}, S1={s1}, S2={s2}, END={end})")
            if ids[s1] != ids[s2]:
                raise _NameTokenError(f"prompt {i} ({p.text!r}): S1 and S2 tokenise differently "
                                   f"({ids[s1]} vs {ids[s2]}) for {type(tokenizer).__name__}")
            if unk is not None:
                for j, name, role in ((io, p.io, "IO"), (s1, p.s, "S")):
                    if ids[j] == unk:
                        raise _NameTokenError(
                            f"prompt {i} ({p.text!r}): name {name!r} ({role}) is not in the vocabulary of "
                            f"{type(tokenizer).__name__}: it becomes the unknown token "
                            f"{tokenizer.unk_token!r}, so IO and S could not be told apart. Use names the "
                            "tokenizer knows (for the IOI language model: run.prompts(...) or "
                            "names=svtools.ioi_lm.LM_NAMES).")
                for j in range(len(ids)):
                    if ids[j] == unk and not special[j]:
                        w = p.text[offsets[j][0]:offsets[j][1]]
                        unknown_words[w] = unknown_words.get(w, 0) + 1
            if ids[io] == ids[s1] and p.io != p.s:
                raise _NameTokenError(f"prompt {i} ({p.text!r}): IO {p.io!r} and S {p.s!r} are the same token "
                                      f"({ids[io]}) for {type(tokenizer).__name__}")
            if bos_id is not None:
                ids = [int(bos_id)] + ids
            all_ids.append(ids)
            for k, v in (("io", io), ("s1", s1), ("s2", s2), ("end", end)):
                cols[k].append(v + shift)
            cols["length"].append(len(ids))
            cols["io_id"].append(ids[io + shift])
            cols["s_id"].append(ids[s1 + shift])
        if unknown_words:
            n_bad = sum(any(ids[j] == unk for j in range(len(ids))) for ids in all_ids)
            top = sorted(unknown_words, key=lambda w: (-unknown_words[w], w))[:5]
            warnings.warn(f"{n_bad} of {len(all_ids)} IOI prompts hold words that {type(tokenizer).__name__} does "
                          f"not know (they become {tokenizer.unk_token!r}: {top}); the model never saw them, "
                          "so its answers on these prompts say little. Use templates and names in its "
                          "vocabulary (for the IOI language model: run.prompts(...)).", UnknownWordsWarning,
                          stacklevel=3)
        pos = IOIPositions(**{k: torch.tensor(v, dtype=torch.long) for k, v in cols.items()})
        return all_ids, pos


def ioi_prompts(n: int, *, seed: int = 0, templates: Optional[Sequence[str]] = None,
                names: Optional[Sequence[str]] = None, places: Optional[Sequence[str]] = None,
                objects: Optional[Sequence[str]] = None, order: str = "mixed") -> IOIDataset:
    """``n`` IOI prompts, deterministic in ``seed``.

    Each prompt draws a template, two distinct names (IO, S), a place and an object uniformly
    with :class:`random.Random(seed)`. ``order``: ``"ABBA"``, ``"BABA"`` or ``"mixed"`` (half of
    each, ``ceil(n/2)`` ABBA, in shuffled order). Defaults: :data:`TEMPLATES`, :data:`NAMES`,
    :data:`PLACES`, :data:`OBJECTS`. Templates use ``{A} ... {B} ... {S}`` (first-clause names in
    text order, then the repeated subject), ``{PLACE}``, ``{OBJECT}``; every name must follow a
    space and the template must end with a word (END).
    """
    try:
        n = as_int(n, "n", min_value=1)
    except SVToolsError as exc:
        raise SVToolsError(f"n must be a positive int (numpy ints are fine), got {n!r}: {exc}") from None
    seed = as_int(seed, "seed")
    if order not in ("mixed", *ORDERS):
        raise SVToolsError(f"order must be 'mixed', 'ABBA' or 'BABA', got {order!r}")
    templates = tuple(TEMPLATES if templates is None else templates)
    if not templates:
        raise SVToolsError("templates is empty")
    parsed = [_parse_template(t, k) for k, t in enumerate(templates)]
    names = _check_pool(NAMES if names is None else names, "names", 2)
    places = _check_pool(PLACES if places is None else places, "places", 1)
    objects = _check_pool(OBJECTS if objects is None else objects, "objects", 1)

    rng = random.Random(seed)
    if order == "mixed":
        orders = ["ABBA"] * ((n + 1) // 2) + ["BABA"] * (n // 2)
        rng.shuffle(orders)
    else:
        orders = [order] * n
    prompts = []
    for i in range(n):
        t = rng.randrange(len(templates))
        io, s = rng.sample(names, 2)
        place, obj = rng.choice(places), rng.choice(objects)
        a, b = (io, s) if orders[i] == "ABBA" else (s, io)
        text, spans = _fill(parsed[t], {"A": a, "B": b, "S": s, "PLACE": place, "OBJECT": obj})
        io_span, s1_span = (spans["A"], spans["B"]) if orders[i] == "ABBA" else (spans["B"], spans["A"])
        prompts.append(IOIPrompt(text=text, io=io, s=s, template_id=t, order=orders[i], place=place,
                                 obj=obj, io_span=io_span, s1_span=s1_span, s2_span=spans["S"]))
    return IOIDataset(prompts, seed)


def single_token_names(tokenizer: "PreTrainedTokenizerBase", names: Optional[Sequence[str]] = None) -> list[str]:
    """The names (default :data:`NAMES`) that are one token for ``tokenizer`` where IOI puts them.

    Each name is checked inside a probe sentence, after a space and before a space and before a
    comma, as in the templates; pass the result as ``names=`` to :func:`ioi_prompts`.
    """
    names = _check_pool(NAMES if names is None else names, "names", 1)
    pieces = _parse_template("Then {A} and {B}, {S} said to", -1)
    keep = []
    for name in names:
        text, spans = _fill(pieces, {"A": name, "B": name, "S": name})
        probe = IOIDataset([IOIPrompt(text=text, io=name, s=name, template_id=-1, order="ABBA", place="",
                                      obj="", io_span=spans["A"], s1_span=spans["B"], s2_span=spans["S"])])
        try:
            with warnings.catch_warnings():  # the probe's other words are not the question here
                warnings.simplefilter("ignore", UnknownWordsWarning)
                probe.positions(tokenizer)
        except _NameTokenError:
            continue
        keep.append(name)
    return keep
