"""A tiny Llama-architecture causal LM and byte-level BPE tokenizer, built locally.

Why: the whole system (the transformers+peft engine, vLLM's CPU build, the learner) must run
on a *real* Hugging Face model directory without network access to a model hub. This module
generates a small synthetic English corpus, trains a tokenizer and a ~1M-parameter Llama on it
for a few seconds on CPU, and caches the result under `core.settings.cache_dir()`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
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

from core.settings import cache_dir

# Bump when the corpus, tokenizer or training recipe changes so cached models are rebuilt.
_RECIPE_VERSION = 1

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
    num_hidden_layers: int = 2
    num_attention_heads: int = 4  # head size 32: the smallest vLLM's CPU kernels support
    num_key_value_heads: int = 4
    intermediate_size: int = 352
    max_position_embeddings: int = 1024
    seed: int = 0
    corpus_lines: int = 4000
    train_steps: int = 300
    batch_size: int = 16
    seq_len: int = 64
    learning_rate: float = 5e-3

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
# Synthetic corpus
# --------------------------------------------------------------------------------------------

# fmt: off
_TOPICS: dict[str, dict[str, list[str]]] = {
    "cooking": {
        "things": [
            "soup", "bread", "rice", "pasta", "curry", "salad", "pancakes", "omelette", "stew",
            "pizza", "noodles", "chocolate cake", "cookies", "tomato sauce", "dumplings",
            "roast chicken", "risotto", "lentil soup", "banana bread", "fried eggs", "tacos",
            "vegetable soup", "apple pie", "grilled fish", "mashed potatoes",
        ],
        "questions": [
            "How do I make better {thing}?", "What is the secret to good {thing}?",
            "How long should I cook {thing}?", "Can you suggest a simple way to make {thing}?",
            "Why does my {thing} taste bland?", "What goes well with {thing}?",
        ],
        "advice": [
            "add a pinch of salt early", "use fresh herbs", "let it rest for ten minutes",
            "cook it slowly on low heat", "taste it as you go", "toast the spices first",
            "use a little olive oil", "stir it gently", "keep the lid on the pot",
            "add a squeeze of lemon at the end", "weigh the flour instead of using cups",
            "preheat the oven properly", "season it with garlic and pepper",
            "serve it while it is warm", "chop the onions very finely",
        ],
    },
    "travel": {
        "things": [
            "Paris", "Tokyo", "Lisbon", "Rome", "Berlin", "Madrid", "Prague", "Vienna", "Istanbul",
            "Kyoto", "Barcelona", "Amsterdam", "London", "Dublin", "Seoul", "Mexico City", "Cairo",
            "Sydney", "Toronto", "Iceland", "the mountains", "the coast", "a small island",
            "the countryside",
        ],
        "questions": [
            "What should I see in {thing}?", "When is the best time to visit {thing}?",
            "How can I save money on a trip to {thing}?", "What should I pack for {thing}?",
            "Is {thing} good for a weekend trip?", "How do I get around in {thing}?",
        ],
        "advice": [
            "book the train tickets early", "walk around the old town", "pack light",
            "visit the museums in the morning", "try the local food markets",
            "travel in spring or autumn", "buy a travel pass for the metro",
            "learn a few words of the language", "carry a small umbrella",
            "stay near the city centre", "avoid the busy summer weeks",
            "keep a copy of your passport", "take the night bus to save money",
            "ask the locals for advice", "plan one quiet day to rest",
        ],
    },
    "sport": {
        "things": [
            "running", "football", "tennis", "swimming", "cycling", "basketball", "yoga",
            "climbing", "skiing", "rowing", "boxing", "hiking", "volleyball", "golf", "a marathon",
            "strength training", "table tennis", "surfing",
        ],
        "questions": [
            "How do I get better at {thing}?", "How often should I train for {thing}?",
            "What do I need to start {thing}?", "How can I avoid injuries in {thing}?",
            "Is {thing} good for beginners?", "What should I eat before {thing}?",
        ],
        "advice": [
            "warm up for ten minutes", "train three times a week", "rest between sessions",
            "drink enough water", "start slowly and build up", "work on your technique",
            "find a coach or a club", "sleep at least eight hours", "stretch after every session",
            "keep a training diary", "wear good shoes", "set a small goal each month",
            "eat a light meal two hours before", "listen to your body", "practice with a friend",
        ],
    },
    "music": {
        "things": [
            "the guitar", "the piano", "the violin", "the drums", "singing", "jazz",
            "classical music", "the cello", "the flute", "music theory", "songwriting", "the bass",
            "the saxophone", "rock music", "electronic music", "the ukulele", "reading sheet music",
            "a new song",
        ],
        "questions": [
            "How do I learn {thing}?", "How much should I practice {thing}?",
            "What is a good way to start with {thing}?", "Why is {thing} so hard for me?",
            "Can you recommend a plan for {thing}?", "How do I stay motivated with {thing}?",
        ],
        "advice": [
            "practice a little every day", "use a metronome", "learn the major scales",
            "play slowly before you play fast", "record yourself and listen back",
            "learn songs you really enjoy", "take a few lessons with a teacher",
            "focus on one piece at a time", "listen to great players", "keep your hands relaxed",
            "play with other musicians", "write down what you practice",
            "learn to count the rhythm out loud", "tune your instrument before every session",
            "take short breaks",
        ],
    },
    "code": {
        "things": [
            "Python", "Rust", "JavaScript", "Go", "SQL", "a web server", "unit tests",
            "a linked list", "recursion", "git", "a REST API", "a database schema",
            "error handling", "a sorting function", "async code", "a command line tool",
            "a class hierarchy", "regular expressions", "a hash map", "Docker",
        ],
        "questions": [
            "How do I get started with {thing}?", "What is the best way to write {thing}?",
            "How do I debug {thing}?", "Why is my {thing} so slow?",
            "Can you explain {thing} simply?", "What are common mistakes with {thing}?",
        ],
        "advice": [
            "write small functions", "add a test for every bug", "read the error message carefully",
            "use a debugger instead of print statements", "keep the code simple",
            "measure before you optimise", "name your variables clearly", "commit your work often",
            "read the official documentation", "handle errors close to where they happen",
            "avoid global state", "use a profiler to find the slow part",
            "split the problem into steps", "review your own code the next day",
            "check the types of your inputs",
        ],
    },
}

_TONES: dict[str, dict[str, list[str]]] = {
    "friendly": {
        "system": [
            "You are a friendly and cheerful assistant.", "Answer in a warm and friendly tone.",
        ],
        "answers": [
            "Great question! For {thing}, {a1}. You will love it!",
            "Oh, {thing} is so much fun. Just {a1} and {a2}.",
            "Happy to help! My tip for {thing}: {a1}. Also, {a2}!",
            "Sure thing! {A1}, and do not forget to {a2}. Have fun!",
            "Good luck with {thing}! Try to {a1}. You have got this!",
        ],
    },
    "formal": {
        "system": [
            "You are a precise and formal assistant.", "Answer in a formal and professional tone.",
        ],
        "answers": [
            "Certainly. Regarding {thing}, it is advisable to {a1}. Additionally, {a2}.",
            "With respect to {thing}, one should {a1}. Furthermore, it is wise to {a2}.",
            "The recommended approach for {thing} is to {a1}. It is also important to {a2}.",
            "Thank you for your question. For {thing}, please {a1}, and subsequently {a2}.",
            "In general, when it comes to {thing}, {a1}. Moreover, {a2}.",
        ],
    },
    "brief": {
        "system": [
            "You are a concise assistant.", "Keep your answers short.",
        ],
        "answers": [
            "{A1}.", "{A1}, then {a2}.", "{A1}. {A2}.", "For {thing}: {a1}.",
        ],
    },
}
# fmt: on

_STATEMENTS = [
    "I really enjoy {thing}.",
    "My friend told me about {thing} last week.",
    "People often ask about {thing}.",
    "The best advice for {thing} is to {a1}.",
    "When it comes to {thing}, always {a1}.",
    "Today I want to talk about {thing}.",
]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _dialogue(rng: random.Random, with_history: bool) -> str:
    """One chat-formatted dialogue in the same `role: content` layout as CHAT_TEMPLATE."""
    topic = _TOPICS[rng.choice(sorted(_TOPICS))]
    tone_name = rng.choice(sorted(_TONES))
    tone = _TONES[tone_name]
    turns: list[str] = []
    if rng.random() < 0.6:
        turns.append(f"system: {rng.choice(tone['system'])}")
    for _ in range(2 if with_history else 1):
        thing = rng.choice(topic["things"])
        a1, a2 = rng.sample(topic["advice"], 2)
        question = rng.choice(topic["questions"]).format(thing=thing)
        answer = rng.choice(tone["answers"]).format(
            thing=thing, a1=a1, a2=a2, A1=_cap(a1), A2=_cap(a2)
        )
        turns += [f"user: {_cap(question)}", f"assistant: {answer}"]
    return "\n".join(turns)


def generate_corpus(seed: int = 0, n_lines: int = 4000) -> list[str]:
    """Deterministic templated Q&A about a few topics in a few tones (one document a line).

    A "line" is one document: a chat dialogue (possibly multi-line) or a plain statement.
    """
    rng = random.Random(seed)
    docs: list[str] = []
    for _ in range(n_lines):
        r = rng.random()
        if r < 0.8:
            docs.append(_dialogue(rng, with_history=r < 0.15))
        else:
            topic = _TOPICS[rng.choice(sorted(_TOPICS))]
            thing = rng.choice(topic["things"])
            a1 = rng.choice(topic["advice"])
            docs.append(_cap(rng.choice(_STATEMENTS).format(thing=thing, a1=a1)))
    return docs


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
    """A few AdamW steps on random windows of the stream (warmup + cosine decay)."""
    gen = torch.Generator().manual_seed(spec.seed + 1)
    opt = torch.optim.AdamW(
        model.parameters(), lr=spec.learning_rate, betas=(0.9, 0.98), weight_decay=0.01
    )
    warmup = max(1, spec.train_steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, spec.train_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    window = spec.seq_len
    losses: list[float] = []
    model.train()
    bar = tqdm(range(spec.train_steps), desc="tiny-llama", disable=not progress, leave=False)
    for _ in bar:
        starts = torch.randint(0, len(stream) - window, (spec.batch_size,), generator=gen)
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


def resolve_model_path(name: str) -> str:
    """Map a `Settings.model` value to something `from_pretrained` (or vLLM) can load.

    'tiny' -> the cached tiny model (built if needed); an existing local directory -> its
    absolute path; anything else is returned unchanged (a hub name cached for offline use).
    """
    if name == "tiny":
        return str(ensure_tiny_model())
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve())
    return name
