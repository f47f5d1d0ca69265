"""The locally built tiny Llama: loadable, vLLM-compatible shape, lossless tokenizer,
deterministic build, and training that actually learned the corpus."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from loraloop.core.model_loading import ModelNotConfiguredError, resolve_model_path
from loraloop.devtools.tiny_model import (
    VLLM_CPU_HEAD_SIZES,
    TinyModelSpec,
    build_tiny_model,
    ensure_tiny_model,
    generate_corpus,
    init_model,
    tiny_model_dir,
    token_stream,
)

# A spec that builds in about a second: few corpus lines, three training steps.
QUICK = dataclasses.replace(TinyModelSpec(), corpus_lines=300, train_steps=3)


@pytest.fixture(scope="module")
def model(model_dir: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path):
    return AutoTokenizer.from_pretrained(model_dir)


def test_loads_as_llama_with_vllm_compatible_shape(model_dir: Path, model, tokenizer) -> None:
    config = AutoConfig.from_pretrained(model_dir)
    assert config.model_type == "llama"
    assert config.tie_word_embeddings is False
    head_dim = config.hidden_size // config.num_attention_heads
    assert getattr(config, "head_dim", head_dim) == head_dim
    assert head_dim >= 32 and head_dim in VLLM_CPU_HEAD_SIZES
    assert next(model.parameters()).dtype == torch.float32
    assert len(tokenizer) == config.vocab_size
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (
        config.bos_token_id,
        config.eos_token_id,
    )
    assert tokenizer.pad_token_id == config.pad_token_id
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    assert (model_dir / "generation_config.json").is_file()
    assert model_dir == tiny_model_dir()


def test_tokenizer_round_trips(tokenizer) -> None:
    texts = [
        *generate_corpus(seed=7, n_lines=50),
        "How do I cook rice in Lisbon?  Two  spaces,\ttabs and\nnewlines.",
        "Unicode survives too: café, naïve, Straße, 東京, 🙂.",
        " leading and trailing spaces ",
    ]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # corpus words are whole tokens, not byte soup
    assert len(tokenizer("user: How do I learn the piano?")["input_ids"]) < 15


def test_chat_template(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Keep your answers short."},
        {"role": "user", "content": "What should I pack for Tokyo?"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<s>system: Keep your answers short.\nuser: What should I pack for Tokyo?\nassistant:"
    )


def test_generation_produces_corpus_like_tokens(model, tokenizer) -> None:
    messages = [{"role": "user", "content": "How do I get better at tennis?"}]
    enc = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=24, do_sample=False)
    new = out[0, enc["input_ids"].shape[1] :]
    assert len(new) > 0
    text = tokenizer.decode(new, skip_special_tokens=True)
    corpus_words = {w.strip(".,!?:").lower() for d in generate_corpus(0, 500) for w in d.split()}
    words = [w.strip(".,!?:").lower() for w in text.split()]
    assert words, text
    assert sum(w in corpus_words for w in words) / len(words) > 0.8, text


def test_training_lowered_held_out_loss(model_dir: Path, model, tokenizer) -> None:
    spec = TinyModelSpec()
    seen = set(generate_corpus(spec.seed, spec.corpus_lines))
    held_out = [d for d in generate_corpus(seed=12345, n_lines=400) if d not in seen]
    stream = token_stream(held_out, tokenizer)
    n = min(16, len(stream) // 64)
    batch = stream[: n * 64].view(n, 64)
    untrained = init_model(spec, AutoConfig.from_pretrained(model_dir)).eval()
    with torch.no_grad():
        trained_loss = model(input_ids=batch, labels=batch).loss.item()
        untrained_loss = untrained(input_ids=batch, labels=batch).loss.item()
    assert untrained_loss > 6.0  # ~ln(2048): uniform guessing
    assert trained_loss < 2.0
    assert trained_loss < untrained_loss / 3


def test_build_is_deterministic_and_atomic(tmp_path: Path) -> None:
    a = build_tiny_model(tmp_path / "a", QUICK, progress=False)
    b = build_tiny_model(tmp_path / "b", QUICK, progress=False)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    # only the two finished directories: no temp or half-written leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
    # rebuilding in place replaces the old build cleanly
    build_tiny_model(a, QUICK, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
    assert torch.equal(load_file(a / "model.safetensors")["lm_head.weight"], wb["lm_head.weight"])


def test_different_seed_gives_different_weights(tmp_path: Path) -> None:
    a = build_tiny_model(tmp_path / "a", dataclasses.replace(QUICK, train_steps=0), False)
    b = build_tiny_model(tmp_path / "b", dataclasses.replace(QUICK, train_steps=0, seed=1), False)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert not torch.equal(wa["lm_head.weight"], wb["lm_head.weight"])


def test_ensure_builds_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORALOOP_CACHE_DIR", str(tmp_path))
    path = ensure_tiny_model(progress=False, spec=QUICK)
    assert path == tmp_path / "models" / f"tiny-llama-{QUICK.digest()}"
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model(progress=False, spec=QUICK) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert QUICK.digest() != TinyModelSpec().digest()


def test_resolve_model_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    local = tmp_path / "my-model"
    local.mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("my-model") == str(local.resolve())
    assert resolve_model_path("org/some-hub-model") == "org/some-hub-model"
    # No model named: a start-up error that says what to set, never a model trained on the fly.
    for unset in ("", "  "):
        with pytest.raises(ModelNotConfiguredError, match="LORALOOP_MODEL"):
            resolve_model_path(unset)
