"""`loraloop eval`: how fast and how far personalization gets, with seeds and intervals.

1. The model: how well-formed its replies are and how well it obeys a full control line
   (one style per attribute), sampled directly with transformers at temperature 1.
2. The loop: for each seed, the demo world (`loraloop.demo.run_world`: Kafka, server,
   learner, simulated users) with every series on the same prompts: base, global, the
   bandit's arm alone, personalized (bandit + LoRA) and the oracle (the system prompt that
   asks for exactly the user's taste). Reported per group of users (all, shared tastes,
   idiosyncratic tastes), with 95 % bootstrap intervals over (seed, user) pairs:
   - interactions until the mean personalized reward (centred mean of 5 interactions)
     reaches 80 % of the oracle's;
   - personalized reward at interactions 91-100 (or the last 10) as a share of the oracle's;
   - personalized vs global: relative gain over the last quarter;
   - what the LoRA adds: personalized minus arm-only, last half, with a one-sided
     sign-flip test on the per-interaction differences.
"""

from __future__ import annotations

import itertools
import json
import random
import re
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import cast

import numpy as np
from rich.console import Console
from rich.table import Table

from loraloop.demo import ALL_SERIES, DEMO_ARMS, MAX_TOKENS, Rewards, run_world
from loraloop.demo_world import SimulatedUser, make_users, style_of
from loraloop.devtools.demo_corpus import (
    ATTRIBUTES,
    BASE_MIX,
    control_line,
    corpus_sentences,
    sample_prompt,
)

console = Console()
_SPLIT = re.compile(r"[.!?:\n]+")


def _norm(sentence: str) -> str:
    return " ".join(re.sub(r"[^a-z ,']", " ", sentence.lower()).split())


def known_sentences() -> set[str]:
    """The corpus's sentences, normalised as `is_well_formed` compares them."""
    return {_norm(p) for s in corpus_sentences() for p in _SPLIT.split(s) if _norm(p)}


def is_well_formed(text: str, known: set[str]) -> bool:
    """Every sentence (or bullet) of the reply is one the corpus can produce."""
    parts = [_norm(p) for p in _SPLIT.split(text)]
    parts = [p for p in parts if p]
    return bool(parts) and all(p in known for p in parts)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


def model_report(model_dir: str, per_style: int = 4, seed: int = 0) -> dict[str, float]:
    """Well-formedness and control obedience of sampled replies (temperature 1)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    known = known_sentences()
    rng = random.Random(seed)
    torch.manual_seed(seed)
    styles = [
        dict(zip(ATTRIBUTES, v, strict=True)) for v in itertools.product(*ATTRIBUTES.values())
    ]
    jobs: list[dict[str, str] | None] = [s for s in styles for _ in range(per_style)]
    jobs += [None] * (len(styles) * per_style // 2)  # no system line: the base mix
    texts: list[tuple[str, bool]] = []
    for i in range(0, len(jobs), 32):
        chats = []
        for style in jobs[i : i + 32]:
            msgs = [{"role": "user", "content": sample_prompt(rng)[2]}]
            if style is not None:
                msgs.insert(0, {"role": "system", "content": control_line(style)})
            chats.append(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
        enc = tok(chats, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(
                **enc, max_new_tokens=MAX_TOKENS, do_sample=True, temperature=1.0, top_p=1.0
            )
        for row in out[:, enc["input_ids"].shape[1] :]:
            finished = bool((row == tok.eos_token_id).any())
            texts.append((str(tok.decode(row, skip_special_tokens=True)).strip(), finished))
    controlled = [(s, t) for s, t in zip(jobs, texts, strict=True) if s is not None]
    free = [t for s, t in zip(jobs, texts, strict=True) if s is None]
    report = {
        "well_formed": statistics.mean(f and is_well_formed(t, known) for t, f in texts),
        "obeys_full_control_line": statistics.mean(style_of(t) == s for s, (t, _) in controlled),
    }
    for attr in ATTRIBUTES:
        report[f"obeys_{attr}"] = statistics.mean(
            style_of(t)[attr] == s[attr] for s, (t, _) in controlled
        )
    for attr, mix in BASE_MIX.items():  # what the model does unasked, vs the corpus's mix
        value = min(mix, key=mix.__getitem__)
        report[f"base_{attr}_{value}"] = statistics.mean(
            style_of(t)[attr] == value for t, _ in free
        )
    return report


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def sign_flip_p(diffs: list[float], n: int = 20_000, seed: int = 0) -> float:
    """One-sided p-value that the mean of paired differences is > 0 (sign-flip test)."""
    d = np.asarray(diffs, dtype=float)
    if len(d) == 0 or not d.any():
        return 1.0
    rng = np.random.default_rng(seed)
    flips = rng.choice([-1.0, 1.0], size=(n, len(d)))
    null = (flips * d).mean(axis=1)
    return float((1 + (null >= d.mean()).sum()) / (n + 1))


Unit = dict[str, np.ndarray]  # series -> rewards per interaction, for one (seed, user)


def _to_80(units: list[Unit]) -> float:
    """First interaction whose centred mean of 5 (mean over units) reaches 80 % of oracle."""
    curve = np.mean([u["personalized"] for u in units], axis=0)
    centred = np.convolve(curve, np.ones(5) / 5, mode="valid")  # centred[i] is about i + 2
    target = 0.8 * float(np.mean([u["oracle"].mean() for u in units]))
    hits = np.flatnonzero(centred >= target - 1e-9)
    return float(hits[0] + 3) if len(hits) else float(len(curve) + 1)


def user_to_80(unit: Unit, window: int = 10) -> float | None:
    """One (seed, user): the first interaction at which the trailing mean of `window`
    personalized rewards reaches 80 % of that user's mean oracle reward; None: never."""
    pers, target = unit["personalized"], 0.8 * float(unit["oracle"].mean())
    for i in range(window, len(pers) + 1):
        if float(pers[i - window : i].mean()) >= target - 1e-9:
            return float(i)
    return None


def _median_user_to_80(units: list[Unit]) -> float:
    """Median over (seed, user) of `user_to_80`, a user who never gets there counting as
    one interaction past the end."""
    rounds = len(units[0]["personalized"])
    return float(np.median([user_to_80(u) or rounds + 1 for u in units]))


def _share_at(units: list[Unit], end: int) -> float:
    pers = np.mean([u["personalized"][end - 10 : end].mean() for u in units])
    return float(pers / np.mean([u["oracle"].mean() for u in units]))


def _gain(units: list[Unit]) -> float:
    q = len(units[0]["personalized"]) * 3 // 4
    pers = np.mean([u["personalized"][q:].mean() for u in units])
    glob = np.mean([u["global"][q:].mean() for u in units])
    return float(pers / glob - 1) if glob > 0 else float("inf")


def _lora_added(units: list[Unit]) -> float:
    h = len(units[0]["personalized"]) // 2
    return float(np.mean([(u["personalized"][h:] - u["arm"][h:]).mean() for u in units]))


def _interval(
    units: list[Unit], metric: Callable[[list[Unit]], float], n: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """(value, low, high): the metric and its 95 % bootstrap interval over units."""
    rng = np.random.default_rng(seed)
    draws = [
        metric([units[i] for i in rng.integers(len(units), size=len(units))]) for _ in range(n)
    ]
    return metric(units), float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))


def summarize(runs: list[tuple[list[SimulatedUser], Rewards]]) -> dict[str, dict[str, object]]:
    """The metrics per group of users, over every (seed, user) of the runs."""
    units: dict[str, list[Unit]] = {"all": [], "shared": [], "idiosyncratic": []}
    for people, rewards in runs:
        for u in people:
            unit = {name: np.asarray(rewards[name][u.user_id]) for name in ALL_SERIES}
            units["all"].append(unit)
            units["shared" if u.shared else "idiosyncratic"].append(unit)
    rounds = len(units["all"][0]["personalized"])
    end = min(100, rounds)
    out: dict[str, dict[str, object]] = {}
    for group, members in units.items():
        if not members:
            continue
        h = rounds // 2
        diffs = [d for u in members for d in (u["personalized"][h:] - u["arm"][h:])]
        out[group] = {
            "units": len(members),
            "to_80pct_oracle": _interval(members, _to_80),
            "median_user_to_80pct": _interval(members, _median_user_to_80),
            "users_never_at_80pct": sum(user_to_80(u) is None for u in members),
            f"share_of_oracle_at_{end}": _interval(members, lambda m: _share_at(m, end)),
            "gain_vs_global": _interval(members, _gain),
            "lora_added": _interval(members, _lora_added),
            "lora_added_p": sign_flip_p(diffs),
            "means_last_quarter": {
                name: float(np.mean([u[name][rounds * 3 // 4 :].mean() for u in members]))
                for name in ALL_SERIES
            },
        }
    return out


def validity(replies: Path, rounds: int, known: set[str]) -> dict[str, tuple[float, float]]:
    """Per series, the share of well-formed replies over the first and the last quarter
    of each user's interactions (replies.jsonl of a run, in interaction order): whether
    learning made the replies drift from what the model can say well."""
    per: dict[tuple[str, str], list[bool]] = {}
    for line in replies.read_text().splitlines():
        row = json.loads(line)
        per.setdefault((row["series"], row["user"]), []).append(is_well_formed(row["text"], known))
    q = max(1, rounds // 4)
    out: dict[str, tuple[float, float]] = {}
    for series in sorted({s for s, _ in per}):
        runs = [flags for (s, _), flags in per.items() if s == series]
        first = [f for flags in runs for f in flags[:q]]
        last = [f for flags in runs for f in flags[-q:]]
        out[series] = (float(np.mean(first)), float(np.mean(last)))
    return out


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def run_eval(
    seeds: list[int],
    users: int = 6,
    rounds: int = 100,
    out_dir: str = "out/eval",
    skip_model: bool = False,
    overrides: dict[str, object] | None = None,
    tastes: str = "demo",
    signals: str = "demo",
) -> int:
    from loraloop.devtools.tiny_model import ensure_tiny_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, object] = {
        "seeds": seeds,
        "users": users,
        "rounds": rounds,
        "tastes": tastes,
        "signals": signals,
    }
    if not skip_model:
        with console.status("sampling the model against every full control line..."):
            report = model_report(str(ensure_tiny_model()))
        results["model"] = report
        console.print("model: " + ", ".join(f"{k} {v:.3f}" for k, v in report.items()))
    runs = []
    for seed in seeds:
        console.print(f"seed {seed}: {users} users x {rounds} interactions, all series")
        code, rewards = run_world(
            users,
            rounds,
            out / f"seed-{seed}",
            {"arms_file": DEMO_ARMS} | (overrides or {}),
            series=ALL_SERIES,
            seed=seed,
            quiet=True,
            tastes=tastes,
            signals=signals,
        )
        if code:
            console.print(f"[red]seed {seed}: the run failed; logs in {out}/seed-{seed}/")
            return 1
        runs.append((make_users(users, seed, tastes, signals), rewards))
    known = known_sentences()
    checks = [validity(out / f"seed-{seed}" / "replies.jsonl", rounds, known) for seed in seeds]
    valid = {
        name: tuple(float(np.mean([c[name][i] for c in checks])) for i in (0, 1))
        for name in checks[0]
    }
    summary = summarize(runs)
    results["summary"] = summary
    results["well_formed_first_last_quarter"] = valid
    (out / "eval.json").write_text(json.dumps(results, indent=2))
    _print(summary, rounds)
    console.print(
        "well-formed replies, first -> last quarter: "
        + ", ".join(f"{n} {a:.2f} -> {b:.2f}" for n, (a, b) in valid.items())
    )
    console.print(f"details: {out / 'eval.json'}")
    return 0


Interval = tuple[float, float, float]  # estimate, low, high


def _fmt(v: Interval, rounds: int, kind: str) -> str:
    value, low, high = v
    if kind == "pct":
        return f"{value:+.0%} [{low:+.0%}, {high:+.0%}]"
    if kind == "count":

        def show(x: float) -> str:
            return f">{rounds}" if x > rounds else f"{x:.0f}"

        return f"{show(value)} [{show(low)}, {show(high)}]"
    return f"{value:.2f} [{low:.2f}, {high:.2f}]"


def _print(summary: dict[str, dict[str, object]], rounds: int) -> None:
    end = min(100, rounds)
    table = Table(title="Personalization, 95 % bootstrap intervals over (seed, user)")
    table.add_column("metric")
    for group in summary:
        table.add_column(f"{group} ({summary[group]['units']})")
    rows = [
        ("interactions to 80 % of oracle", "to_80pct_oracle", "count"),
        ("  per user, median (mean of 10)", "median_user_to_80pct", "count"),
        (f"share of oracle at {end}", f"share_of_oracle_at_{end}", "share"),
        ("personalized vs global (last quarter)", "gain_vs_global", "pct"),
        ("LoRA's added reward (last half)", "lora_added", "share"),
    ]
    for label, key, kind in rows:
        table.add_row(
            label, *(_fmt(cast(Interval, s[key]), rounds, kind) for s in summary.values())
        )
    table.add_row(
        "  users never at 80 %", *(str(s["users_never_at_80pct"]) for s in summary.values())
    )
    table.add_row(
        "  one-sided p (LoRA adds > 0)", *(f"{s['lora_added_p']:.4f}" for s in summary.values())
    )
    for name in ALL_SERIES:
        table.add_row(
            f"mean reward, {name} (last quarter)",
            *(f"{s['means_last_quarter'][name]:.2f}" for s in summary.values()),  # type: ignore[index]
        )
    console.print(table)
