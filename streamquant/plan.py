"""Device and memory policy: which device, which dtype, how many samples per micro-batch.

Every decision about where tensors live and how big a micro-batch is belongs here, so the engine and the pipeline
stay free of policy.
"""
from __future__ import annotations

import resource

import torch

from streamquant.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UserError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for CUDA but no CUDA device is available")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' keeps CPU runs in float32 (bf16 matmuls are slow there) and uses bf16 on GPUs."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def pin_host_memory(device: torch.device) -> bool:
    """Pinned host buffers only pay off (and only work) when a CUDA device consumes them."""
    return device.type == "cuda"


def micro_batch_for(seqlen: int, hidden: int, intermediate: int, dtype: torch.dtype, budget_bytes: int = 512 << 20) -> int:
    """Samples per micro-batch so one block's activations (MLP intermediates dominate) stay within a budget."""
    bytes_per_sample = seqlen * (4 * hidden + 3 * intermediate) * torch.finfo(dtype).bits // 8
    return max(1, budget_bytes // max(1, bytes_per_sample))


def peak_host_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_gpu_bytes(device: torch.device) -> int:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else 0
