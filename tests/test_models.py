"""Model access: embedded default offline, hub failures fast and clear, unsupported models refused."""

from __future__ import annotations

import time

import pytest

import svtools
from svtools.models import HubUnavailableError, UnsupportedModelError


def test_embedded_model_is_minilm(minilm):
    assert minilm.cfg.n_layers == 6 and minilm.cfg.n_heads == 12 and minilm.cfg.d_head == 32
    assert type(minilm).__name__ == "TransformerBridge"
    ids, am = svtools.decomposition.tokenize(minilm, ["hello world", "a longer sentence than that"])
    assert ids.shape == am.shape and am[0].sum() < am[1].sum()
    assert ids[0, 0] == minilm.tokenizer.cls_token_id


@pytest.mark.parametrize("name,kw", [("gpt2", {}), ("EleutherAI/pythia-160m", {"checkpoint": 1000})])
def test_unreachable_hub_fails_fast(monkeypatch, tmp_path, name, kw):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    t = time.monotonic()
    with pytest.raises(HubUnavailableError, match="unreachable"):
        svtools.load_model(name, **kw)
    assert time.monotonic() - t < 10


def test_dead_endpoint_fails_fast(monkeypatch, tmp_path):
    """No HF_HUB_OFFLINE, but nothing answers: a connection check, not a hang."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    t = time.monotonic()
    with pytest.raises(HubUnavailableError):
        svtools.load_model("gpt2", timeout=2.0)
    assert time.monotonic() - t < 10


def test_fallback_to_embedded_says_so(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    model = svtools.load_model("gpt2", fallback=True)
    assert "Falling back" in capsys.readouterr().out
    assert model.cfg.model_name == "all-MiniLM-L6-v2"


def test_unsupported_architecture():
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(num_hidden_layers=1, num_attention_heads=2, hidden_size=16, ffn_dim=32, vocab_size=50,
                    max_position_embeddings=32, word_embed_proj_dim=16)
    with pytest.raises(UnsupportedModelError, match="unsupported architecture 'opt'"):
        svtools.load_model(OPTForCausalLM(cfg))


def test_bad_model_argument():
    with pytest.raises(svtools.SVToolsError):
        svtools.load_model(42)
    with pytest.raises(svtools.SVToolsError, match="checkpoints"):
        svtools.load_model("minilm", checkpoint=10)


def test_hub_answers_but_download_fails(monkeypatch, tmp_path, capsys):
    """A host that accepts connections but serves no model (proxy, outage): still a clear error."""
    import svtools.models as models
    from transformer_lens.model_bridge import TransformerBridge

    real = TransformerBridge.boot_transformers

    def refuse(name, *args, **kwargs):
        if name == "gpt2":
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")
        return real(name, *args, **kwargs)

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(TransformerBridge, "boot_transformers", refuse)
    with pytest.raises(HubUnavailableError, match="from the hub"):
        svtools.load_model("gpt2")
    model = svtools.load_model("gpt2", fallback=True)
    assert "Falling back" in capsys.readouterr().out and model.cfg.model_name == "all-MiniLM-L6-v2"
