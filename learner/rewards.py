"""Reward from the feedback signals: a weighted sum, clipped to [-1, 1].

The weights are settings, so an operator can say, for example, that a copy matters more
than dwell time. Explicit signals dominate by default; the implicit ones nudge.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from loraloop.core.gen.loraloop.v1 import common_pb2


class RewardConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    thumbs: float = Field(1.0, description="Weight of thumbs (+1 up / -1 down).")
    rating: float = Field(1.0, description="Weight of the rating, mapped from [0,1] to [-1,1].")
    accepted: float = Field(0.5, description="Added when accepted, subtracted when not.")
    copied: float = Field(0.3, description="Added when the response was copied.")
    regenerated: float = Field(-0.5, description="Added when the user asked for another one.")
    edited: float = Field(-0.1, description="Added when the user edited the response.")
    follow_up: float = Field(0.1, description="Added when the user asked a follow-up.")
    dwell: float = Field(0.2, description="Weight of dwell time, saturating at dwell_full_ms.")
    dwell_full_ms: int = Field(30_000, gt=0, description="Dwell that earns the full weight.")


def reward_config(weights: dict[str, float]) -> RewardConfig:
    """The reward function with `weights` overriding its defaults (settings.reward_weights)."""
    try:
        return RewardConfig(**weights)
    except ValidationError as exc:
        known = ", ".join(RewardConfig.model_fields)
        raise ValueError(
            f"reward_weights {weights}: {exc.errors()[0]['msg']}; known weights: {known}"
        ) from exc


def reward(signals: common_pb2.FeedbackSignals, cfg: RewardConfig | None = None) -> float:
    """The scalar reward of one response's feedback."""
    cfg = cfg or RewardConfig()
    total = 0.0
    if signals.HasField("thumbs"):
        total += cfg.thumbs * max(-1, min(1, signals.thumbs))
    if signals.HasField("rating"):
        total += cfg.rating * (2.0 * signals.rating - 1.0)
    if signals.HasField("accepted"):
        total += cfg.accepted if signals.accepted else -cfg.accepted
    if signals.HasField("copied") and signals.copied:
        total += cfg.copied
    if signals.HasField("regenerated") and signals.regenerated:
        total += cfg.regenerated
    if signals.HasField("edited") and signals.edited:
        total += cfg.edited
    if signals.HasField("follow_up") and signals.follow_up:
        total += cfg.follow_up
    if signals.HasField("dwell_ms"):
        total += cfg.dwell * min(1.0, max(0, signals.dwell_ms) / cfg.dwell_full_ms)
    return max(-1.0, min(1.0, total))
