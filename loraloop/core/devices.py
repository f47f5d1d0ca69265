"""Where the model runs and in which dtype: `Settings.device` and `Settings.dtype` resolved.

`device="auto"` is CUDA when torch sees a GPU (`torch.cuda.is_available()`), else the CPU;
`"cuda"` on a machine without one is refused at start-up (`DeviceUnavailableError`, a
one-line message naming LORALOOP_DEVICE) rather than failing on the first tensor.
`dtype="auto"` is bfloat16 on CUDA (what GPUs serve at, half the memory of float32) and
float32 on the CPU (where bfloat16 matmuls are slow and the tests' tolerances are float32's).
The hf engine and the learner put the base model, the LoRA bank and every tensor they build
on the resolved device; the learner keeps its optimiser's master weights in float32 whatever
the model's dtype (learner/algos/reinforce.py).
"""

from __future__ import annotations

import torch

from loraloop.core.settings import StartupError

__all__ = ["DeviceUnavailableError", "resolve_device", "resolve_dtype", "resolved_dtype_name"]


class DeviceUnavailableError(StartupError, ValueError):
    """`Settings.device` asks for a device this machine does not have."""


def resolve_device(name: str) -> torch.device:
    """The torch device of a `Settings.device` value ("auto", "cpu" or "cuda")."""
    if name == "cpu":
        return torch.device("cpu")
    cuda = torch.cuda.is_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "cpu")
    if name == "cuda":
        if not cuda:
            build = torch.version.cuda
            why = (
                f"torch {torch.__version__} (CUDA {build}) sees no GPU"
                if build
                else f"torch {torch.__version__} is a CPU-only build"
            )
            raise DeviceUnavailableError(
                f"LORALOOP_DEVICE=cuda but CUDA is not available here: {why} "
                "(torch.cuda.is_available() is False); run on a GPU host, or set "
                "LORALOOP_DEVICE=auto or cpu"
            )
        return torch.device("cuda")
    raise DeviceUnavailableError(f"LORALOOP_DEVICE={name!r}: use auto, cpu or cuda")


def resolved_dtype_name(name: str, device: torch.device) -> str:
    """A `Settings.dtype` value with "auto" resolved for `device`: bfloat16 on CUDA, else
    float32; explicit values are kept."""
    if name != "auto":
        return name
    return "bfloat16" if device.type == "cuda" else "float32"


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The torch dtype of a `Settings.dtype` value on `device`."""
    resolved = resolved_dtype_name(name, device)
    value = getattr(torch, resolved, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(
            f"LORALOOP_DTYPE={name!r} is not a torch dtype: use auto, float32, bfloat16 or float16"
        )
    return value
