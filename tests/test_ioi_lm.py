"""The IOI language model (svtools.ioi_lm): tokenizer and positions, the accuracy metric, the
train/test split, determinism, the on-disk cache, and exact decomposition of its checkpoints.

Everything runs on a tiny config (a few seconds); the default config's targets (held-out
accuracy, END -> IO attention) are measured in the emergence chapter, not here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from svtools import SVToolsError, ioi_lm
from svtools.ioi_lm import gelu as lm_gelu, language as lm_language, training as lm_training
from svtools.data import TEMPLATES, ioi_prompts
from conftest import svtools_cache_at

TINY = ioi_lm.IOILMConfig(n_layers=2, n_heads=2, d_model=16, steps=12, n_checkpoints=5, batch=8, warmup=2)
HAND = "When Mary and John went to the store, John gave a drink to"


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    with svtools_cache_at(tmp_path_factory.mktemp("svtools_cache")) as path:
        yield path


@pytest.fixture(scope="module")
def run(cache_env):
    return ioi_lm.train(TINY, seed=0, progress=False)


def hand_prompt():
    """The prompt HAND with IO = Mary (ABBA), built through ioi_prompts."""
    for seed in range(20):
        ds = ioi_prompts(1, seed=seed, templates=[TEMPLATES[0]], names=["Mary", "John"], places=["store"],
                         objects=["drink"], order="ABBA")
        if ds[0].io == "Mary":
            assert ds.texts == [HAND]
            return ds
    raise AssertionError("no seed gave IO = Mary")


# ------------------------------------------------------------------ tokenizer, positions, metric

def test_hand_checked_positions():
    tok = ioi_lm.build_tokenizer()
    ds = hand_prompt()
    words = ["<bos>", "When", "Mary", "and", "John", "went", "to", "the", "store", ",", "John", "gave", "a",
             "drink", "to"]
    assert tok.convert_ids_to_tokens(tok(HAND)["input_ids"]) == words
    pos = ds.positions(tok)
    assert (int(pos.io[0]), int(pos.s1[0]), int(pos.s2[0]), int(pos.end[0])) == (2, 4, 10, 14)
    assert int(pos.io_id[0]) == tok.convert_tokens_to_ids("Mary")
    assert int(pos.s_id[0]) == tok.convert_tokens_to_ids("John")


def test_ioi_tokens_on_the_loaded_model(run):
    from svtools import ioi

    model = run.load(run.checkpoints[-1], device="cpu")
    ids, am, pos = ioi.ioi_tokens(model, hand_prompt())
    assert ids[0, 0] == run.tokenizer.bos_token_id  # the tokenizer adds <bos>; tokenize() adds no second one
    assert (int(pos.io[0]), int(pos.s1[0]), int(pos.s2[0]), int(pos.end[0])) == (2, 4, 10, 14)


def test_accuracy_metric_on_hand_made_logits():
    tok = ioi_lm.build_tokenizer()
    pos = hand_prompt().positions(tok)
    mary, john, the = (tok.convert_tokens_to_ids(w) for w in ("Mary", "John", "the"))
    logits = torch.zeros(1, len(tok))
    logits[0, mary], logits[0, john] = 2.0, 1.0
    assert ioi_lm.ioi_accuracy(logits, pos, "top1") == 1.0
    assert ioi_lm.ioi_accuracy(logits, pos, "io_vs_s") == 1.0
    logits[0, the] = 3.0  # IO beats S but is not the top token
    assert ioi_lm.ioi_accuracy(logits, pos, "top1") == 0.0
    assert ioi_lm.ioi_accuracy(logits, pos, "io_vs_s") == 1.0
    logits[0, john] = 5.0  # S wins
    assert ioi_lm.ioi_accuracy(logits, pos, "top1") == 0.0
    assert ioi_lm.ioi_accuracy(logits, pos, "io_vs_s") == 0.0
    with pytest.raises(SVToolsError, match="metric"):
        ioi_lm.ioi_accuracy(logits, pos, "top5")


def test_run_accuracy_reads_the_logits_at_end(run):
    step = run.checkpoints[-1]
    ds = run.prompts(16, seed=3)
    logits = run.logits(step, ds)
    pos = ds.positions(run.tokenizer)
    assert run.accuracy(step, n=16, seed=3) == ioi_lm.ioi_accuracy(logits, pos, "top1")
    # the same logits from the model's own forward pass on the hand-tokenised prompts
    hf = run.hf_model(step, device="cpu")
    tokens = ds.tokens(run.tokenizer, device="cpu")
    with torch.no_grad():
        full = hf(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).logits
    torch.testing.assert_close(logits, full[torch.arange(16), tokens.positions.end])


def test_accuracy_runs_the_model_once_per_checkpoint_and_prompts(run, monkeypatch):
    """Both metrics at a checkpoint come from one forward pass; other checkpoints and other prompts
    get their own, and every value equals the one computed from scratch."""
    from svtools.ioi_lm.training import IOILMRun

    fresh = IOILMRun(cfg=run.cfg, seed=run.seed, path=run.path, checkpoints=run.checkpoints,
                     history=run.history)  # no memo from other tests
    calls = []
    real = IOILMRun._end_logits
    monkeypatch.setattr(IOILMRun, "_end_logits", lambda self, *a, **k: calls.append(a[0]) or real(self, *a, **k))
    first, last = run.checkpoints[0], run.checkpoints[-1]
    for step in (last, first, last):
        for split, seed in (("test", 3), ("train", 3), ("test", 4)):
            ds = run.prompts(16, seed=seed, split=split)
            logits, pos = real(run, step, ds.tokens(run.tokenizer)), ds.positions(run.tokenizer)
            for metric in ("top1", "io_vs_s"):
                assert fresh.accuracy(step, n=16, seed=seed, split=split, metric=metric) == \
                    ioi_lm.ioi_accuracy(logits, pos, metric)
    assert sorted(calls) == sorted([last] * 3 + [first] * 3)  # the second pass over `last` is remembered
    for keep, expected in ((1, [first, last, first]), (2, [first, last])):  # beyond `keep`, the oldest goes
        monkeypatch.setattr(IOILMRun, "_ACCURACY_KEEP", keep)
        calls.clear()
        small = IOILMRun(cfg=run.cfg, seed=run.seed, path=run.path, checkpoints=run.checkpoints,
                         history=run.history)
        for step in (first, last, first):
            small.accuracy(step, n=16, seed=3)
        assert calls == expected
    with pytest.raises(SVToolsError, match="not a checkpoint"):
        fresh.accuracy(last + 1, n=16, seed=3)


# ------------------------------------------------------------------ data split

def test_split_names_and_templates_are_disjoint():
    assert not set(ioi_lm.TEST_NAMES) & set(ioi_lm.TRAIN_NAMES)
    assert not set(ioi_lm.TEST_TEMPLATES) & set(ioi_lm.TRAIN_TEMPLATES)
    texts, flags = lm_language.training_batch(3000, 0, 0.6)
    ioi = [t for t, f in zip(texts, flags) if f]
    assert 1650 < len(ioi) < 1950
    test_names = set(ioi_lm.TEST_NAMES)
    for t in ioi:
        assert not set(lm_language._words([t])) & test_names, t
        assert t.endswith(" .")
    # every held-out name still occurs in filler text, so it is a known word
    filler = set(lm_language._words([t for t, f in zip(texts, flags) if not f]))
    assert test_names <= filler
    # held-out templates: never the template of a training IOI sentence, but made of seen parts
    opening_of = {t: next(o for o in ioi_lm.OPENINGS if t.startswith(o)) for t in ioi_lm.TEST_TEMPLATES}
    assert all(any(t.startswith(o) for t in ioi_lm.TRAIN_TEMPLATES) for o in opening_of.values())


def test_test_prompts_are_in_vocabulary(run):
    tok = run.tokenizer
    pools = {"test": (ioi_lm.TEST_TEMPLATES, ioi_lm.TEST_NAMES), "train": (ioi_lm.TRAIN_TEMPLATES, ioi_lm.TRAIN_NAMES),
             "test_templates": (ioi_lm.TEST_TEMPLATES, ioi_lm.TRAIN_NAMES),
             "test_names": (ioi_lm.TRAIN_TEMPLATES, ioi_lm.TEST_NAMES)}
    for split, (templates, names) in pools.items():
        ds = run.prompts(64, seed=1, split=split)
        ids = ds.tokens(tok, device="cpu").input_ids
        assert not (ids == tok.unk_token_id).any(), split
        assert set(ds.template_ids) <= set(range(len(templates)))
        assert set(ds.io_names) | set(ds.s_names) <= set(names)
        for p in ds:  # the text is the split's template, filled in
            a, b = (p.io, p.s) if p.order == "ABBA" else (p.s, p.io)
            assert p.text == templates[p.template_id].format(A=a, B=b, S=p.s, PLACE=p.place, OBJECT=p.obj)
    with pytest.raises(SVToolsError, match="split"):
        run.prompts(4, split="validation")


# ------------------------------------------------------------------ checkpoints, determinism, cache

def test_default_checkpoints_are_log_spaced():
    steps = ioi_lm.IOILMConfig().checkpoint_steps()
    assert len(steps) >= 25 and steps[0] == 0 and steps[-1] == ioi_lm.IOILMConfig().steps
    assert steps == sorted(set(steps))
    gaps = [b - a for a, b in zip(steps[1:], steps[2:])]
    assert gaps[-1] > 10 * gaps[0]  # log-spaced: dense early, sparse late


def test_training_is_deterministic(cache_env):
    from safetensors.torch import load_file

    a = ioi_lm.train(TINY, seed=1, progress=False, cache=False)
    b = ioi_lm.train(TINY, seed=1, progress=False, cache=False)
    c = ioi_lm.train(TINY, seed=2, progress=False, cache=False)
    last = f"step_{TINY.steps:06d}.safetensors"
    wa, wb, wc = (load_file(str(r.path / last)) for r in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    assert a.history["loss"].tolist() == b.history["loss"].tolist()
    assert a.history["loss"].iloc[-1] < a.history["loss"].iloc[0]  # it learns
    for r in (a, b, c):  # cache=False runs live in fresh temporary directories
        assert Path(cache_env) not in r.path.parents
        shutil.rmtree(r.path)


def test_cache_round_trip(run, cache_env, monkeypatch):
    assert Path(cache_env) in run.path.parents
    assert (run.path / "meta.json").is_file()
    for s in run.checkpoints:
        assert (run.path / f"step_{s:06d}.safetensors").is_file()

    def no_training(*a, **k):
        raise AssertionError("the cached run was retrained")

    monkeypatch.setattr(lm_training, "_train_loop", no_training)
    again = ioi_lm.train(TINY, seed=0, progress=False)
    assert again.path == run.path and again.checkpoints == run.checkpoints
    assert again.history.equals(run.history)
    w0, w1 = run.hf_model(run.checkpoints[-1], "cpu"), again.hf_model(run.checkpoints[-1], "cpu")
    assert all(torch.equal(p, q) for p, q in zip(w0.parameters(), w1.parameters()))
    # another config or seed is another cache entry: it would train (and hits the patched loop)
    with pytest.raises(AssertionError, match="retrained"):
        ioi_lm.train(TINY.replace(lr=1e-3), seed=0, progress=False)
    with pytest.raises(AssertionError, match="retrained"):
        ioi_lm.train(TINY, seed=5, progress=False)


def test_checkpoints_differ_and_step0_is_the_initialisation(run):
    m0, m1 = run.hf_model(0, "cpu"), run.hf_model(run.checkpoints[-1], "cpu")
    init = lm_training._new_model(TINY, len(run.tokenizer), 0)
    assert all(torch.equal(p, q) for p, q in zip(m0.parameters(), init.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(m0.parameters(), m1.parameters()))


def test_name_embeddings_stay_the_drawn_codes(run, cache_env):
    """freeze_names: every checkpoint's name rows are name_codes(cfg, seed) exactly (weight decay
    and all), while the other rows learn; with freeze_names=False the name rows learn too."""
    ids, codes = ioi_lm.name_codes(TINY, 0)
    assert ids.tolist() == run.tokenizer.convert_tokens_to_ids(list(ioi_lm.LM_NAMES))
    assert codes.shape == (len(ioi_lm.LM_NAMES), TINY.d_model)
    other = torch.ones(len(run.tokenizer), dtype=torch.bool)
    other[ids] = False
    first = run.hf_model(0, "cpu").transformer.wte.weight.detach()
    for step in run.checkpoints:
        wte = run.hf_model(step, "cpu").transformer.wte.weight.detach()
        assert torch.equal(wte[ids], codes), step
    assert not torch.equal(wte[other], first[other])
    # the shared name direction: mean pairwise cosine of codes about name_shared^2 / (name_shared^2 + 1)
    c = torch.nn.functional.normalize(codes.double(), dim=1)
    mean_cos = float((c @ c.T).fill_diagonal_(0).sum() / (len(c) * (len(c) - 1)))
    expect = TINY.name_shared ** 2 / (TINY.name_shared ** 2 + 1)
    assert abs(mean_cos - expect) < 0.1, (mean_cos, expect)
    # another seed draws other codes; unfrozen names are learnt
    assert not torch.equal(ioi_lm.name_codes(TINY, 1)[1], codes)
    free = ioi_lm.train(TINY.replace(freeze_names=False, resample_names=False), seed=0, progress=False, cache=False)
    w0, w1 = (free.hf_model(s, "cpu").transformer.wte.weight.detach() for s in (0, free.checkpoints[-1]))
    assert not torch.equal(w0[ids], w1[ids])
    shutil.rmtree(free.path)


def test_resampled_name_codes():
    """name_codes(step=k): the codes of training step k share the run's name direction and differ
    from the fixed codes and from step k+1 only by fresh N(0, I/d) parts; deterministic."""
    d = 64
    cfg = ioi_lm.IOILMConfig(d_model=d)
    _, fixed = ioi_lm.name_codes(cfg, 3)
    _, k5 = ioi_lm.name_codes(cfg, 3, step=5)
    assert torch.equal(k5, ioi_lm.name_codes(cfg, 3, step=5)[1])
    for other in (fixed, ioi_lm.name_codes(cfg, 3, step=6)[1]):
        diff = (k5 - other).double()          # (g_k - g') / sqrt(d): no shared part, variance 2/d
        assert not torch.equal(k5, other)
        assert float(diff.mean(0).norm()) < 0.25 * cfg.name_shared  # shared direction cancels
        assert abs(float(diff.var()) * d / 2 - 1) < 0.1
    # each step's codes keep the shared direction: mean code has length about name_shared
    assert abs(float(k5.double().mean(0).norm()) - cfg.name_shared) < 0.1
    with pytest.raises(SVToolsError, match="step"):
        ioi_lm.name_codes(cfg, 3, step=-1)


def test_resampling_changes_training_not_checkpoint_codes(run, cache_env):
    """With resample_names the training sees other name codes (the weights after one step
    differ from a run without it) while every checkpoint holds the fixed codes."""
    fixed = ioi_lm.train(TINY.replace(resample_names=False), seed=0, progress=False, cache=False)
    ids, codes = ioi_lm.name_codes(TINY, 0)
    w = [[r.hf_model(s, "cpu").transformer.h[0].attn.c_attn.weight.detach() for s in (0, 1)] for r in (run, fixed)]
    assert torch.equal(w[0][0], w[1][0])
    assert not torch.allclose(w[0][1], w[1][1])
    assert torch.equal(fixed.hf_model(1, "cpu").transformer.wte.weight.detach()[ids], codes)
    shutil.rmtree(fixed.path)
    # attention dropout is a training device only: a loaded checkpoint gives the same output twice
    model = run.hf_model(run.checkpoints[-1], "cpu").train()
    assert TINY.attn_dropout > 0 and model.config.attn_pdrop == 0.0
    x = torch.tensor([[1, 5, 6, 7]])
    torch.testing.assert_close(model(input_ids=x).logits, model(input_ids=x).logits, rtol=0, atol=0)


@pytest.mark.parametrize("buckets", [1, 3, 8])
def test_bucketed_loss_is_the_batch_loss(buckets):
    """_loss_backward over length buckets gives the batch's mean next-token cross-entropy and its
    gradient, checked against transformers' own loss (labels, padding ignored) on the padded batch."""
    tok = ioi_lm.build_tokenizer()
    texts = ioi_lm.training_texts(16, seed=1, ioi_fraction=0.5)
    ids, am = lm_language.encode(tok, texts)
    assert am.sum(1).min() < am.shape[1]  # the batch has padding to cut
    model = lm_training._new_model(TINY, len(tok), 0)
    ref = model(input_ids=ids, attention_mask=am, labels=ids.masked_fill(am == 0, -100)).loss
    ref.backward()
    g_ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss = lm_training._loss_backward(model, ids, am, am[:, 1:].float(), buckets, torch.device("cpu"))
    assert abs(loss - float(ref.detach())) < 1e-5
    for p, g in zip(model.parameters(), g_ref):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def test_bad_input():
    with pytest.raises(SVToolsError, match="divisible"):
        ioi_lm.IOILMConfig(d_model=30, n_heads=4)
    with pytest.raises(SVToolsError, match="steps"):
        ioi_lm.IOILMConfig(steps=0)
    with pytest.raises(SVToolsError, match="cfg"):
        ioi_lm.train({"steps": 3})
    with pytest.raises(SVToolsError, match="freeze_names"):
        ioi_lm.IOILMConfig(freeze_names=1)
    with pytest.raises(SVToolsError, match="resample_names"):
        ioi_lm.IOILMConfig(freeze_names=False)
    with pytest.raises(SVToolsError, match="attn_dropout"):
        ioi_lm.IOILMConfig(attn_dropout=1.0)
    with pytest.raises(SVToolsError, match="buckets"):
        ioi_lm.IOILMConfig(buckets=0)
    with pytest.raises(SVToolsError, match="name_shared"):
        ioi_lm.IOILMConfig(name_shared=float("nan"))


def test_bad_step(run):
    with pytest.raises(SVToolsError, match="not a checkpoint"):
        run.load(3 if 3 not in run.checkpoints else 10_000)


# ------------------------------------------------------------------ analysis on the checkpoints

@pytest.mark.parametrize("which", ["first", "last"])
def test_decomposition_is_exact_on_checkpoints(run, which):
    from svtools import decompose, ioi, sad

    step = run.checkpoints[0] if which == "first" else run.checkpoints[-1]
    model = run.load(step, device="cpu")
    ids, am, pos = ioi.ioi_tokens(model, run.prompts(8, seed=0))
    for layer in range(TINY.n_layers):
        dec = decompose(model, ids, layer, attention_mask=am, dtype=torch.float64)
        assert dec.max_pattern_error() < 1e-6
        torch.testing.assert_close(dec.terms.sum(-1), dec.scores)
    # the HF model's own attention weights agree with the bridge's pattern
    hf = run.hf_model(step, device="cpu")
    with torch.no_grad():
        att = hf(input_ids=ids, attention_mask=am, output_attentions=True).attentions
    dec = decompose(model, ids, TINY.n_layers - 1, attention_mask=am)
    real = am.bool()
    for b in range(len(ids)):
        n = int(real[b].sum())
        torch.testing.assert_close(dec.pattern[b, :, :n, :n], att[-1][b, :, :n, :n], atol=1e-5, rtol=1e-4)
    # head_sparsity with the non-attended baseline runs on it and is consistent with decompose
    df = sad.head_sparsity(model, ids, attention_mask=am, threshold=0.3, baseline="non-attended",
                           baseline_fraction=0.2, progress=False)
    assert set(df["kind"]) <= {"attended", "non-attended"}
    att_rows = df[df["kind"] == "attended"]
    assert (att_rows["attention"] >= 0.3).all()
    assert (df[df["kind"] == "non-attended"]["attention"] < 0.3).all()


def test_role_attention_matches_patterns(run):
    from svtools import decompose, ioi

    step = run.checkpoints[-1]
    model = run.load(step, device="cpu")
    ds = run.prompts(6, seed=2)
    ra = ioi_lm.role_attention(model, ds, batch_size=4)
    ids, am, pos = ioi.ioi_tokens(model, ds)
    dec = decompose(model, ids, 1, attention_mask=am)
    r = torch.arange(len(ds))
    want = dec.pattern[r, :, pos.end, pos.io].mean(0)  # (head,)
    got = ra.query("layer == 1 and query_role == 'END' and key_role == 'IO'").sort_values("head")["mean"]
    torch.testing.assert_close(torch.tensor(got.to_numpy(), dtype=torch.float32), want.float(), atol=1e-5, rtol=1e-4)
    assert ((ra["lo"] <= ra["mean"]) & (ra["mean"] <= ra["hi"])).all()


@pytest.mark.parametrize("shape", [(4, 9, 256), (3, 1000)])
def test_fused_gelu_is_transformers_new_gelu_bit_for_bit(shape):
    """The trainer's GELU gives the value and the gradient autograd gives transformers' NewGELUActivation,
    in every bit (zeros' signs, infinities and tiny inputs included), and the trainer uses it."""
    from transformers.activations import NewGELUActivation

    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(*shape, generator=g) * 3
    x0.view(-1)[:6] = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-30, -4e4])
    grad = torch.randn(*shape, generator=g)
    xa, xb = x0.clone().requires_grad_(True), x0.clone().requires_grad_(True)
    ya, yb = NewGELUActivation()(xa), lm_gelu.NewGELU()(xb)
    ya.backward(grad)
    yb.backward(grad)

    def bits(t):
        return torch.nan_to_num(t, nan=1.5).view(torch.int32)

    assert torch.equal(bits(ya), bits(yb)) and torch.equal(ya.isnan(), yb.isnan())
    assert torch.equal(bits(xa.grad), bits(xb.grad)) and torch.equal(xa.grad.isnan(), xb.grad.isnan())
    # not vacuous: torch's own tanh GELU rounds differently somewhere, the fused one nowhere
    assert not torch.equal(bits(torch.nn.functional.gelu(x0, approximate="tanh")), bits(ya))


def test_training_with_the_fused_gelu_is_bit_identical_and_uses_it(monkeypatch):
    """A run trained with the fused GELU ends with the weights of a run trained with transformers' module."""
    from safetensors.torch import load_file

    calls = []
    apply = lm_gelu.NewGELUFunction.apply
    monkeypatch.setattr(lm_gelu.NewGELUFunction, "apply", lambda x: calls.append(1) or apply(x))
    weights = {}
    for fused in (False, True):
        monkeypatch.setattr(lm_training, "_FUSED_GELU", fused)
        n = len(calls)
        r = ioi_lm.train(TINY, seed=3, progress=False, cache=False)
        assert (len(calls) > n) == fused
        weights[fused] = load_file(str(r.path / f"step_{TINY.steps:06d}.safetensors"))
    assert weights[True].keys() == weights[False].keys()
    assert all(torch.equal(weights[True][k], weights[False][k]) for k in weights[True])
