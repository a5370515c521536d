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
of training. Entries are written atomically, verified on every read against the request and
rebuilt when damaged (see :func:`train`); a run whose loss becomes non-finite stops with an
error and is never cached. ``run.load(step)`` gives a TransformerLens bridge (via :func:`svtools.load_model`)
that :func:`svtools.decompose` and :func:`svtools.sad.head_sparsity` accept, with the word-level
tokenizer attached; ``run.prompts(n, seed, split)`` gives an :class:`svtools.data.IOIDataset` in
the model's vocabulary, so ``svtools.ioi.ioi_tokens(model, dataset)`` returns ids and the IO,
S1, S2 and END positions.

Determinism: with the same config and seed a CPU run reproduces the same weights bit for bit
(one thread or several: the model is small enough that torch's CPU kernels are deterministic;
in this process or in a worker process of :func:`train_seeds`, which trains several seeds in
parallel; with the training data prepared ahead in a thread and AdamW's ``foreach``
implementation, both checked to leave every weight unchanged). CUDA runs
(``train(device="cuda")``: model, data and optimiser on the GPU) are deterministic up to
floating-point reduction order and will not reproduce the CPU runs' weights; that path has not
been tested on a GPU, and the three default seeds were validated on the CPU only. A run is trained by one process at a time (a lock in the cache): a second
process asking for it waits and loads it.

Modules: :mod:`svtools.ioi_lm.language` (the templates, names, filler sentences, training texts
and the word-level tokenizer), :mod:`svtools.ioi_lm.batches` (the name codes and each training
step's data), :mod:`svtools.ioi_lm.training` (the config, the model, training, seeds in parallel,
the on-disk cache and a run's checkpoints and accuracy), :mod:`svtools.ioi_lm.measures` (heads
found by role, measurements over checkpoints and seeds). Every public name is importable from
``svtools.ioi_lm``.
"""

from svtools.ioi_lm.language import (ACTIONS, FILLER_TEMPLATES, LM_NAMES, OPENINGS, TEST_NAMES, TEST_TEMPLATES,
                                     TRAIN_NAMES, TRAIN_TEMPLATES, build_tokenizer, filler_sentences, name_ids,
                                     training_texts)
from svtools.ioi_lm.accuracy import ioi_accuracy
from svtools.ioi_lm.measures import ROLE_PAIRS, over_checkpoints, over_seeds, role_attention, top_heads
from svtools.ioi_lm.batches import name_codes
from svtools.ioi_lm.training import (CODE_VERSION, IOILMConfig, IOILMRun, cache_dir, train,
                                     train_seeds)

__all__ = ["IOILMConfig", "IOILMRun", "train", "train_seeds", "CODE_VERSION", "cache_dir", "TRAIN_TEMPLATES",
           "TEST_TEMPLATES", "TRAIN_NAMES", "TEST_NAMES", "LM_NAMES", "OPENINGS", "ACTIONS", "FILLER_TEMPLATES",
           "build_tokenizer", "filler_sentences", "training_texts", "name_ids", "name_codes", "role_attention",
           "ROLE_PAIRS", "ioi_accuracy", "top_heads", "over_checkpoints", "over_seeds"]
