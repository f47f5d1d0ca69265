"""A tiny Llama-architecture causal LM and byte-level BPE tokenizer, built locally.

Why: the whole system (the transformers+peft engine, vLLM's CPU build, the learner) must run
on a *real* Hugging Face model directory without network access to a model hub, and the demo
needs a model whose replies have styles a user can like or not. This module trains a
tokenizer and a ~1.3M-parameter Llama on the demo world's corpus (`demo_corpus`: replies
varying in tone, length, format and emoji, with control lines) in a few minutes on CPU, and
caches the result under `loraloop.core.settings.cache_dir()`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm.auto import tqdm
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from loraloop.core.settings import cache_dir
from loraloop.devtools.demo_corpus import generate_corpus

# Bump when the corpus, tokenizer or training recipe changes so cached models are rebuilt.
_RECIPE_VERSION = 2

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = [UNK, BOS, EOS, PAD]  # ids 0..3, the Llama convention (unk=0, bos=1, eos=2)

# "role: content" lines; the corpus dialogues use the same format, so the model learns it.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] | trim }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

# Head sizes vLLM's CPU attention kernels accept; 16 fails there.
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256)


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape and recipe of the tiny model; its hash names the cache directory."""

    vocab_size: int = 2048
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4  # head size 32: the smallest vLLM's CPU kernels support
    num_key_value_heads: int = 4
    intermediate_size: int = 352
    max_position_embeddings: int = 1024
    seed: int = 0
    corpus_lines: int = 40_000  # dialogues of `loraloop.devtools.demo_corpus`
    train_steps: int = 400
    batch_size: int = 16
    seq_len: int = 128
    learning_rate: float = 4e-3

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def digest(self) -> str:
        """Short stable hash of the spec and recipe version (cache key)."""
        payload = json.dumps(
            {"recipe": _RECIPE_VERSION, **dataclasses.asdict(self)}, sort_keys=True
        ).encode()
        return hashlib.sha256(payload).hexdigest()[:12]


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def train_tokenizer(corpus: list[str], spec: TinyModelSpec) -> PreTrainedTokenizerFast:
    """Byte-level BPE (lossless for any text) with Llama-style special tokens and auto-BOS."""
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    # The corpus's word inventory may not fill the vocab; reserve the rest (as Llama 3 does) so
    # len(tokenizer) == config.vocab_size and no sampled id ever lacks a token.
    missing = spec.vocab_size - tok.get_vocab_size()
    if missing > 0:
        tok.add_special_tokens([f"<reserved_{i}>" for i in range(missing)])
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, bos_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=spec.max_position_embeddings,
        padding_side="left",  # decoder-only batching pads on the left
    )


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def make_config(spec: TinyModelSpec, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """The LlamaConfig of the spec; ids of special tokens come from the tokenizer."""
    if len(tokenizer) > spec.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens > vocab_size {spec.vocab_size}")
    if spec.hidden_size % spec.num_attention_heads:
        raise ValueError("hidden_size must be divisible by num_attention_heads")
    return LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=False,
        dtype=torch.float32,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def init_model(spec: TinyModelSpec, config: LlamaConfig) -> LlamaForCausalLM:
    """Freshly initialised (untrained) model, deterministic from the spec's seed."""
    torch.manual_seed(spec.seed)
    return LlamaForCausalLM(config).float()


def token_stream(corpus: list[str], tokenizer: PreTrainedTokenizerFast) -> torch.Tensor:
    """All documents as one 1-D stream of `<s> doc </s>` token ids."""
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for enc in tokenizer(corpus, add_special_tokens=True)["input_ids"]:
        ids.extend(enc)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Pin intra-op threads for the build (tiny matmuls gain nothing from many threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train(
    model: LlamaForCausalLM, stream: torch.Tensor, spec: TinyModelSpec, progress: bool
) -> list[float]:
    """AdamW steps on windows of the stream that start at a document (warmup + cosine decay).

    Windows have a fixed length and every token counts, so the loss normaliser is the same
    for every batch (normalising per batch over variable lengths skews the style mix).
    """
    gen = torch.Generator().manual_seed(spec.seed + 1)
    opt = torch.optim.AdamW(
        model.parameters(), lr=spec.learning_rate, betas=(0.9, 0.98), weight_decay=0.01
    )
    warmup = max(1, spec.train_steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, spec.train_steps - warmup)
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    window = spec.seq_len
    bos = model.config.bos_token_id
    assert bos is not None, "the tiny tokenizer defines <bos>"
    doc_starts = stream.eq(bos).nonzero().flatten()
    doc_starts = doc_starts[doc_starts < len(stream) - window]
    if len(doc_starts) == 0:  # a corpus shorter than one window: any offset will do
        doc_starts = torch.zeros(1, dtype=torch.long)
    losses: list[float] = []
    model.train()
    bar = tqdm(range(spec.train_steps), desc="tiny-llama", disable=not progress, leave=False)
    for _ in bar:
        pick = torch.randint(0, len(doc_starts), (spec.batch_size,), generator=gen)
        starts = doc_starts[pick]
        batch = torch.stack([stream[s : s + window] for s in starts.tolist()])
        # HF shifts labels internally: labels == inputs trains next-token prediction.
        out = model(input_ids=batch, labels=batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(out.loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def build_tiny_model(
    out_dir: Path, spec: TinyModelSpec = TinyModelSpec(), progress: bool = True
) -> Path:
    """Build corpus, tokenizer and trained model into `out_dir`, atomically; return `out_dir`.

    Written into a temp dir next to `out_dir` and renamed into place, so a crash never leaves
    a half-written model that later loads (or fails) mysteriously. Deterministic from the seed.
    """
    out_dir = Path(out_dir).absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        with _torch_threads(min(2, os.cpu_count() or 1)):
            corpus = generate_corpus(spec.seed, spec.corpus_lines)
            tokenizer = train_tokenizer(corpus, spec)
            config = make_config(spec, tokenizer)
            model = init_model(spec, config)
            losses = _train(model, token_stream(corpus, tokenizer), spec, progress)
        model.generation_config = GenerationConfig(
            bos_token_id=config.bos_token_id,
            eos_token_id=config.eos_token_id,
            pad_token_id=config.pad_token_id,
            do_sample=True,
            temperature=0.8,
            top_p=0.95,
        )
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "tiny_model_spec.json").write_text(
            json.dumps(
                {
                    "spec": dataclasses.asdict(spec),
                    "digest": spec.digest(),
                    "recipe": _RECIPE_VERSION,
                    "final_loss": losses[-1] if losses else None,
                },
                indent=2,
            )
        )
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the model is meant to be shared
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        if out_dir.exists():  # replace an old build: move it aside first, then swap in
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "model")
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def tiny_model_dir(spec: TinyModelSpec = TinyModelSpec()) -> Path:
    """Cache location of the model built from `spec`."""
    return cache_dir() / "models" / f"tiny-llama-{spec.digest()}"


def ensure_tiny_model(progress: bool = True, spec: TinyModelSpec = TinyModelSpec()) -> Path:
    """Path of the cached tiny model, building it once (file-locked across processes)."""
    path = tiny_model_dir(spec)
    if (path / "config.json").is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.parent / f".{path.name}.lock")):
        if not (path / "config.json").is_file():  # another process may have built it meanwhile
            build_tiny_model(path, spec, progress=progress)
    return path
