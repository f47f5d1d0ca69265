"""The demo world's users: hidden tastes over reply styles, judged from the text alone.

`style_of` is the attribute scorer: it reads only a reply's text (no model, no corpus
code) and says its tone (friendly/formal/neutral, or mixed), length (short/long: fewer
than three sentences or bullet points, or more), format (prose/list) and whether it uses
emoji. A simulated user has a hidden taste, a few wanted attribute values; the true reward
of a reply is the share of them it has, and the user turns it into the noisy implicit and
explicit signals an app would report (accepted, copied, dwell time, regenerate, edit,
thumbs).

The population mixes *shared* tastes, which a configured arm (`loraloop/configs/demo-arms.toml`:
one system prompt per friendly, formal, brief) expresses on its own, and *idiosyncratic*
ones, which add an attribute no arm asks for (emoji, lists), so only the user's own
LoRA adapter can learn it.

Two other worlds measure what the demo's own does not (`make_users(tastes=, signals=)`):

- tastes "random": each user wants 1 to 3 attributes drawn at random, with random values,
  from the whole attribute space (tone, length, format, emoji), not the six fixed tastes;
- signals "threshold": another app's mapping from how good a reply felt to what it
  reports: thumbs up at >= 0.75 and down at <= 0.25 every time, accepted at >= 0.5, dwell
  proportional to it, regenerate below 0.3; no copy or edit.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from loraloop.devtools.demo_corpus import control_line, sample_prompt

_EMOJI = re.compile("[\U0001f300-\U0001faff\u2600-\u27bf\u2b50]")
_BULLET = re.compile(r"(?:^|\n)\s*[-*•]\s")
_SENTENCE_END = re.compile(r"[.!?\n]+")
_FRIENDLY = re.compile(
    r"!|great question|happy to help|i love|sure thing|have fun|you have got this", re.I
)
_FORMAL = re.compile(
    r"certainly|thank you for your question|regarding|advisable|furthermore|moreover|"
    r"one should|i trust this|kind regards",
    re.I,
)

# (taste, shared?): shared tastes are what an arm expresses; the others add what none does.
TASTES: tuple[tuple[dict[str, str], bool], ...] = (
    ({"tone": "friendly"}, True),
    ({"tone": "formal"}, True),
    ({"length": "short"}, True),
    ({"tone": "formal", "emoji": "yes"}, False),
    ({"tone": "friendly", "format": "list"}, False),
    ({"length": "short", "emoji": "yes"}, False),
)
_LABELS = {("emoji", "yes"): "emoji", ("emoji", "no"): "no emoji"}


def style_of(text: str) -> dict[str, str]:
    """The attribute values of a reply, from its text alone."""
    friendly, formal = len(_FRIENDLY.findall(text)), len(_FORMAL.findall(text))
    tone = "neutral"
    if friendly or formal:
        tone = "friendly" if not formal else "formal" if not friendly else "mixed"
    sentences = [s for s in _SENTENCE_END.split(text) if re.search(r"[A-Za-z]{2}", s)]
    return {
        "tone": tone,
        "length": "long" if len(sentences) >= 3 else "short",
        "format": "list" if _BULLET.search(text) else "prose",
        "emoji": "yes" if _EMOJI.search(text) else "no",
    }


def tone_of(text: str) -> str:
    """The tone of a reply (friendly, formal, neutral or mixed)."""
    return style_of(text)["tone"]


def describe(style: dict[str, str]) -> str:
    """A short label, e.g. 'formal+emoji'."""
    return "+".join(_LABELS.get((a, v), v) for a, v in style.items())


@dataclass
class SimulatedUser:
    user_id: str
    taste: dict[str, str]  # wanted attribute values: hidden from the system
    rng: random.Random
    shared: bool = True  # an arm expresses this taste on its own
    noise: float = 0.1  # share of reactions that ignore the reply (random)
    signals: str = "demo"  # how reactions become signals: "demo" or "threshold"

    @property
    def likes(self) -> str:
        return describe(self.taste)

    @property
    def oracle_prompt(self) -> str:
        """The system prompt that asks for exactly this user's taste (the oracle's)."""
        return control_line(self.taste)

    def prompt(self) -> str:
        return sample_prompt(self.rng)[2]

    def score(self, text: str) -> float:
        """The true reward of a reply: the share of the wanted attribute values it has."""
        style = style_of(text)
        return sum(style[a] == v for a, v in self.taste.items()) / len(self.taste)

    def react(self, text: str) -> tuple[float, dict[str, object]]:
        """(true reward in [0, 1], the feedback signals the app reports, with noise)."""
        true = self.score(text)
        felt = self.rng.random() if self.rng.random() < self.noise else true
        if self.signals == "threshold":
            return true, threshold_signals(felt, self.rng)
        accepted = self.rng.random() < felt
        signals: dict[str, object] = {
            "accepted": accepted,
            "dwell_ms": int(felt * 25_000 * self.rng.uniform(0.6, 1.4)),
        }
        if accepted and self.rng.random() < 0.4:
            signals["copied"] = True
        if accepted and felt < 1 and self.rng.random() < 0.5:
            signals["edited"] = True  # fixes what they did not like
        if not accepted and self.rng.random() < 0.5:
            signals["regenerated"] = True
        if self.rng.random() < 0.5 and (felt >= 0.75 or felt <= 0.25):  # half rate
            signals["thumbs"] = 1 if felt >= 0.75 else -1
        return true, signals


def threshold_signals(felt: float, rng: random.Random) -> dict[str, object]:
    """The "threshold" mapping (see the module) of how good a reply felt, in [0, 1]."""
    signals: dict[str, object] = {
        "accepted": felt >= 0.5,
        "dwell_ms": int(felt * 20_000 * rng.uniform(0.8, 1.2)),
    }
    if felt >= 0.75 or felt <= 0.25:
        signals["thumbs"] = 1 if felt >= 0.75 else -1
    if felt < 0.3:
        signals["regenerated"] = True
    return signals


ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "tone": ("friendly", "formal", "neutral"),
    "length": ("short", "long"),
    "format": ("prose", "list"),
    "emoji": ("yes", "no"),
}
# What one arm of demo-arms.toml asks for on its own.
_ARM_TASTES = ({"tone": "friendly"}, {"tone": "formal"}, {"length": "short"})


def random_taste(rng: random.Random) -> tuple[dict[str, str], bool]:
    """1 to 3 attributes with random values, and whether one arm expresses it alone."""
    wanted = rng.sample(sorted(ATTRIBUTE_VALUES), rng.randint(1, 3))
    taste = {a: rng.choice(ATTRIBUTE_VALUES[a]) for a in sorted(wanted)}
    return taste, taste in _ARM_TASTES


def make_users(
    n: int, seed: int = 0, tastes: str = "demo", signals: str = "demo"
) -> list[SimulatedUser]:
    """`n` users: tastes "demo" cycle through `TASTES` (shared ones first), "random" are
    drawn from the attribute space (seeded by `seed`); `signals` is "demo" or "threshold"
    (see the module)."""
    if tastes not in ("demo", "random") or signals not in ("demo", "threshold"):
        raise ValueError(f"unknown world: tastes {tastes!r}, signals {signals!r}")
    draw = random.Random(f"tastes-{seed}")
    users = []
    for i in range(n):
        taste, shared = TASTES[i % len(TASTES)] if tastes == "demo" else random_taste(draw)
        rng = random.Random(seed * 1000 + i)
        users.append(SimulatedUser(f"user-{i:02d}", dict(taste), rng, shared, signals=signals))
    return users
