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


def make_users(n: int, seed: int = 0) -> list[SimulatedUser]:
    """`n` users whose tastes cycle through `TASTES` (shared ones first)."""
    users = []
    for i in range(n):
        taste, shared = TASTES[i % len(TASTES)]
        users.append(
            SimulatedUser(f"user-{i:02d}", dict(taste), random.Random(seed * 1000 + i), shared)
        )
    return users
