"""Simulated users for the demo: each has a hidden taste for one response tone.

The tiny model answers in one of three tones it learnt from its corpus (friendly, formal,
brief), picked at random. A user's reward comes from a tone scorer that reads only the
response text (it knows nothing of the model), turned into the implicit and explicit
signals a real app would see, with noise.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

TONES = ("friendly", "formal", "brief")

_FRIENDLY = re.compile(
    r"!|so much fun|great question|happy to help|sure thing|good luck|you will love", re.I
)
_FORMAL = re.compile(
    r"certainly|with respect to|recommended approach|thank you for your question|"
    r"in general|furthermore|moreover|additionally|it is advisable|subsequently",
    re.I,
)

PROMPTS = (
    "How do I cook pasta?",
    "What should I see in Paris?",
    "How can I get better at tennis?",
    "How do I learn the guitar?",
    "How do I write cleaner code?",
    "Any tips for a trip to Tokyo?",
    "How do I make a good omelette?",
    "How should I train for a marathon?",
)


def tone_of(text: str) -> str:
    """Which tone a response is written in, from its wording alone."""
    friendly, formal = len(_FRIENDLY.findall(text)), len(_FORMAL.findall(text))
    if friendly > formal:
        return "friendly"
    if formal > friendly:
        return "formal"
    return "brief" if len(text.split()) <= 14 else "other"


@dataclass
class SimulatedUser:
    user_id: str
    likes: str  # one of TONES: hidden from the system
    rng: random.Random

    def prompt(self) -> str:
        return self.rng.choice(PROMPTS)

    def score(self, text: str) -> float:
        """The user's true reward for a reply: 1 when it is in the liked tone."""
        return 1.0 if tone_of(text) == self.likes else 0.0

    def react(self, text: str) -> tuple[float, dict[str, object]]:
        """(true reward in [0, 1], the feedback signals the app reports, with noise)."""
        liked = self.score(text) == 1.0
        noise = self.rng.random() < 0.1  # one reaction in ten is the opposite
        happy = liked != noise
        signals: dict[str, object] = {
            "thumbs": 1 if happy else -1,
            "accepted": happy,
            "dwell_ms": int(
                self.rng.uniform(8_000, 30_000) if happy else self.rng.uniform(0, 4_000)
            ),
        }
        if not happy and self.rng.random() < 0.5:
            signals["regenerated"] = True
        return self.score(text), signals


def make_users(n: int, seed: int = 0) -> list[SimulatedUser]:
    """`n` users whose tastes cycle through the tones."""
    return [
        SimulatedUser(f"user-{i:02d}", TONES[i % len(TONES)], random.Random(seed * 1000 + i))
        for i in range(n)
    ]
