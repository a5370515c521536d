"""The IOI language model's language: templates, names, filler sentences, training texts, tokenizer.

IOI templates are compositions of an opening and an action (:data:`OPENINGS`, :data:`ACTIONS`;
training and held-out splits :data:`TRAIN_TEMPLATES`, :data:`TEST_TEMPLATES`), over 300 names
(:data:`LM_NAMES`, split into :data:`TRAIN_NAMES` and :data:`TEST_NAMES`); filler sentences
(:data:`FILLER_TEMPLATES`) make it a language rather than a lookup. :func:`training_texts` draws
training sequences; :func:`build_tokenizer` is the word-level tokenizer over :func:`vocabulary`.
"""

from __future__ import annotations

import functools
import random
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from svtools._checks import SVToolsError, as_float, as_int
from svtools.data.ioi import NAMES, OBJECTS, PLACES, ioi_prompts

__all__ = ["OPENINGS", "ACTIONS", "TRAIN_TEMPLATES", "TEST_TEMPLATES", "LM_NAMES", "TEST_NAMES", "TRAIN_NAMES",
           "FILLER_TEMPLATES", "build_tokenizer", "filler_sentences", "training_texts", "name_ids"]

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


# ----------------------------------------------------------------------------- text and tokenizer

def _words(texts: Sequence[str]) -> list[str]:
    from tokenizers.pre_tokenizers import Whitespace

    pre = Whitespace()
    return [w for t in texts for w, _ in pre.pre_tokenize_str(t)]


@functools.lru_cache(maxsize=1)
def vocabulary() -> tuple[str, ...]:
    """The tokenizer's words in id order: ``<pad>``, ``<bos>``, ``<unk>``, then every word of the
    templates, names, places and objects, sorted (the same on every machine; built once)."""
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

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=_UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single=f"{_BOS} $A", special_tokens=[(_BOS, vocab[_BOS])])
    # name_or_path / add_bos_token: TransformerLens reads them and would otherwise try to reload
    # the tokenizer from the hub under its name to make it add a BOS (this one already does).
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=_BOS, eos_token=_BOS, pad_token=_PAD,
                                   unk_token=_UNK, name_or_path="svtools-ioi-lm", add_bos_token=True)
    fast.padding_side = "right"
    return fast


def name_ids() -> Tensor:
    """The token ids of :data:`LM_NAMES` in :func:`build_tokenizer`'s vocabulary, ``(300,)``."""
    vocab = {w: i for i, w in enumerate(vocabulary())}
    return torch.tensor([vocab[n] for n in LM_NAMES])


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
    return training_batch(n, seed, ioi_fraction, test_share)[0]


def training_batch(n: int, seed: int, ioi_fraction: float,
                    test_share: Optional[float] = None) -> tuple[list[str], list[bool]]:
    """:func:`training_texts` and, for each sequence, whether it is an IOI sentence (with its answer)."""
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


def encode(tok: Any, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
    """``(input_ids, attention_mask)`` of ``texts``, right-padded to the longest, as ``(batch, seq)`` tensors."""
    enc = tok(list(texts), padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]
