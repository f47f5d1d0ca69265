"""Preference pairs from the two signals apps already have: regenerate and edit.

A pair says which of two responses to one prompt a user preferred, as token ids (prompt,
chosen, rejected), for the DPO step (learner/algos/dpo.py):

- Regenerate. A response B whose request named A in GenerateRequest.regenerates (the user
  asked again instead of using A) is preferred over A, on A's prompt (the context in which
  the user turned A down), unless B's own feedback turns it down too: a thumbs down, a
  rating below 0.5, accepted=false or regenerated=true, or a later request regenerating B
  before B's sample closed (that one then pairs against B). The joiner joins B with A
  (learner/joiner.py): B's sample carries A.
- Edit. FeedbackSignals.edited_text, the response as the user rewrote it, is preferred
  over the response, on its prompt. It is tokenized here as a whole response: with the
  logged response's leading whitespace (the model writes after "assistant:") unless the
  edit has its own, and the end-of-sequence token.

A pair rides on the sample that completes it (B's for a regenerate, the edited
response's for an edit), so it is learnt when that sample is, exactly once: the sample's
Kafka position is recorded with the version that applied it (learner/applied.py), and a
replay skips the sample and its pairs alike.

A pair is skipped, and counted by reason, when its two responses are the same tokens, an
edit is longer than preference_max_edit_chars, or prompt and response exceed the model's
context.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from loraloop.core.gen.loraloop.v1 import common_pb2, events_pb2
from loraloop.core.settings import PreferenceLearning, Settings, default_of
from loraloop.learner.joiner import Sample


@dataclass(frozen=True)
class PreferenceConfig:
    """Which losses train the adapter, and which signals make pairs (the settings)."""

    mode: PreferenceLearning = field(default_factory=lambda: default_of("preference_learning"))
    sources: frozenset[str] = field(
        default_factory=lambda: frozenset(default_of("preference_sources"))
    )
    max_edit_chars: int = default_of("preference_max_edit_chars")

    @classmethod
    def from_settings(cls, settings: Settings) -> PreferenceConfig:
        return cls(
            settings.preference_learning,
            frozenset(settings.preference_sources),
            settings.preference_max_edit_chars,
        )

    def uses(self, source: str) -> bool:
        """Whether pairs from `source` ("regenerate", "edit") are made."""
        return self.mode != "reward" and source in self.sources


@dataclass(frozen=True)
class Pair:
    """The user preferred `chosen` over `rejected` as the response to `prompt`."""

    source: str  # "regenerate" or "edit"
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def turned_down(signals: common_pb2.FeedbackSignals) -> bool:
    """Whether feedback says the response was not wanted."""
    return (
        (signals.HasField("thumbs") and signals.thumbs < 0)
        or (signals.HasField("rating") and signals.rating < 0.5)
        or (signals.HasField("accepted") and not signals.accepted)
        or (signals.HasField("regenerated") and signals.regenerated)
    )


class PairMaker:
    """Turns a joined sample into the preference pairs it carries."""

    def __init__(self, cfg: PreferenceConfig, tokenizer: Any, context: int | None) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.context = context
        self.skipped: Counter[str] = Counter()  # pairs not made, by reason

    def pairs(self, sample: Sample) -> list[Pair]:
        """The sample's pairs: its regenerate pair, then one per feedback with an edit."""
        out = []
        if self.cfg.uses("regenerate") and sample.replaced is not None:
            out.append(self._regenerate(sample, sample.replaced))
        if self.cfg.uses("edit"):
            out += [self._edit(sample.interaction, f) for f in sample.feedbacks]
        return [p for p in out if p is not None]

    def _regenerate(self, sample: Sample, replaced: events_pb2.Interaction) -> Pair | None:
        if sample.replaced_again or any(turned_down(f.signals) for f in sample.feedbacks):
            self.skipped["turned_down"] += 1
            return None
        return self._checked(
            "regenerate",
            replaced.prompt_token_ids,
            sample.interaction.response_token_ids,
            replaced.response_token_ids,
        )

    def _edit(
        self, interaction: events_pb2.Interaction, feedback: events_pb2.FeedbackEvent
    ) -> Pair | None:
        if not feedback.signals.HasField("edited_text"):
            return None
        text = feedback.signals.edited_text
        if not text.strip():
            self.skipped["empty"] += 1
            return None
        if len(text) > self.cfg.max_edit_chars:
            self.skipped["too_long"] += 1
            return None
        chosen = self.encode_response(text, interaction.response_text)
        return self._checked(
            "edit", interaction.prompt_token_ids, chosen, interaction.response_token_ids
        )

    def encode_response(self, text: str, like: str) -> list[int]:
        """Token ids of `text` as a whole response, shaped like the response `like`."""
        lead = "" if text[:1].isspace() else like[: len(like) - len(like.lstrip())]
        ids = list(self.tokenizer(lead + text, add_special_tokens=False)["input_ids"])
        eos = self.tokenizer.eos_token_id
        return ids + ([int(eos)] if eos is not None else [])

    def _checked(
        self, source: str, prompt: Iterable[int], chosen: Iterable[int], rejected: Iterable[int]
    ) -> Pair | None:
        pair = Pair(source, list(prompt), list(chosen), list(rejected))
        if not pair.prompt or not pair.chosen or not pair.rejected:
            self.skipped["empty"] += 1
            return None
        if pair.chosen == pair.rejected:
            self.skipped["identical"] += 1
            return None
        longest = len(pair.prompt) + max(len(pair.chosen), len(pair.rejected))
        if self.context is not None and longest > self.context:
            self.skipped["too_long"] += 1
            return None
        return pair
