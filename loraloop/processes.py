"""Run `loraloop serve` / `loraloop learn` as child processes (the demo and the tests)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

from pydantic import SecretStr

from loraloop.core.settings import Settings


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that hands these settings to a child process."""
    env = dict(os.environ)
    for name, value in settings.model_dump().items():
        if value is None:
            env.pop(f"LORALOOP_{name.upper()}", None)
            continue
        if isinstance(value, SecretStr):  # masked in reprs, handed over in full
            value = value.get_secret_value()
        env[f"LORALOOP_{name.upper()}"] = (
            json.dumps(value) if isinstance(value, list | dict) else str(value)
        )
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Process:
    """A `loraloop` subcommand whose output is collected, and optionally copied to a log.

    Construction returns once a line matches `ready` (`match` holds it), or raises with the
    process's output if it ends or takes longer than `timeout` seconds.
    """

    def __init__(
        self,
        args: list[str],
        settings: Settings,
        ready: str,
        timeout: float = 120,
        log: Path | None = None,
        python: str | None = None,
    ) -> None:
        """`python`: the interpreter to run it with (default: this one), e.g. a virtual
        environment's with vllm installed."""
        self.name = args[0]
        self.proc = subprocess.Popen(
            [python or sys.executable, "-m", "loraloop.cli", *args],
            env=settings_env(settings),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._log: IO[str] | None = log.open("w") if log else None
        self._ready = threading.Event()
        self._pattern = re.compile(ready)
        self.match: re.Match[str] | None = None
        threading.Thread(target=self._pump, daemon=True).start()
        if not self._ready.wait(timeout) or self.match is None:
            self.kill()
            raise RuntimeError(f"`loraloop {self.name}` did not start:\n{self.output}")

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if self._log:
                self._log.write(line)
                self._log.flush()
            if not self._ready.is_set() and (m := self._pattern.search(line)):
                self.match = m
                self._ready.set()
        self._ready.set()  # ended: wake the waiter

    @property
    def output(self) -> str:
        return "".join(self.lines[-80:])

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
        self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
