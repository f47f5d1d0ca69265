"""The engine a server runs, chosen by name; a backend is imported only when chosen."""

from __future__ import annotations

from loraloop.core.settings import Settings
from loraloop.service.engines.protocol import Engine


def build_engine(settings: Settings) -> Engine:
    """The engine named by `settings.engine`; its heavy imports happen only here."""
    if settings.engine == "hf":
        from loraloop.service.engines.hf import HFEngine

        return HFEngine(settings)
    if settings.engine == "vllm":
        from loraloop.service.engines.vllm import VLLMEngine  # imports vllm: only when chosen

        return VLLMEngine(settings)
    raise ValueError(f"unknown engine {settings.engine!r}: use 'hf' or 'vllm'")
