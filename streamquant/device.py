"""Device and numerics policy: which device and dtype a run uses, in what precision rotations are fused, whether host
buffers are pinned, and how a GPU budget is enforced. Every such decision lives here, so the engine, the rotations
and the pipeline stay free of policy."""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from typing import Iterator

import torch

from streamquant.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str = "auto", local_rank: int | None = None) -> torch.device:
    """The run's device; under torchrun (`local_rank`), 'auto' and 'cuda' mean this rank's GPU, cuda:LOCAL_RANK."""
    if local_rank is not None and name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", local_rank)
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


def rotation_dtype(device: torch.device) -> torch.dtype:
    """Precision in which rotations are fused into weights, on the device that runs the blocks.

    On a CPU, fp64 costs only 2x fp32 and keeps the invariance at 1e-12. Consumer GPUs run fp64 at 1/32-1/64 of
    their fp32 rate (a 70B block's fusions are ~14 TFLOP, ~25 s in fp64 on an RTX 3090, well under a second in
    fp32), so on CUDA the fusion runs in fp32 with TF32 off: relative error ~1e-6, a thousand times below the
    bf16 rounding every fused weight receives anyway."""
    return torch.float32 if device.type == "cuda" else torch.float64


@contextlib.contextmanager
def full_fp32_matmuls() -> Iterator[None]:
    """TF32 off for the enclosed matmuls (PyTorch's default, but a user's script may have turned it on): rotations,
    Hessians, QR and the Whip loss are the fp32 matmuls of a run, and none of them tolerates a 10-bit mantissa.
    The block forwards, where TF32 would pay, already run in bf16 on CUDA."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


def serial_helper_thread() -> None:
    """Run this helper thread's torch CPU ops (the block read-ahead's copies and NaN checks) on the thread itself.

    A second thread that runs one parallel op gets an OpenMP team of its own. libgomp then manages more threads than
    there are CPUs and throttles every team's spin-wait, so each small parallel region of the main thread waits for
    sleeping workers to wake: on the 2-core machine a batched 64×64 QR (R2's step) went from 0.28 to 2.4 ms once the
    read-ahead thread had checked one block, and a dart SmolLM2 run's R2 from 0.07 to 0.25 s per layer. OpenMP's
    thread count is per thread, so the main thread keeps all of its threads."""
    omp = _openmp_runtime()
    if omp is not None:
        torch.get_num_threads()   # ATen sets a thread's OpenMP count on its first op; set ours after it
        omp.omp_set_num_threads(1)


@functools.cache
def _openmp_runtime() -> ctypes.CDLL | None:
    """The OpenMP runtime torch was loaded with (its own copy, found among this process's mappings; Linux only),
    or None. A copy inside torch's package comes first: another library may have loaded the system's."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if ".so" in line}
    except OSError:
        return None
    torch_dir = os.path.dirname(torch.__file__)
    for path in sorted(paths, key=lambda p: (not p.startswith(torch_dir), p)):
        name = path.rsplit("/", 1)[-1]
        if name.startswith(("libgomp", "libiomp", "libomp")):
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            if hasattr(lib, "omp_set_num_threads"):
                return lib
    return None


def pin_host_memory(device: torch.device) -> bool:
    """Pinned host buffers only pay off (and only work) when a CUDA device consumes them."""
    return device.type == "cuda"


def free_gpu_bytes(device: torch.device) -> int | None:
    """What the CUDA device has free right now (None elsewhere): the budget a run without --gpu-mem must still fit."""
    if device.type != "cuda":
        return None
    return int(torch.cuda.mem_get_info(device)[0])


def cap_gpu_memory(device: torch.device, budget: int) -> None:
    """Make --gpu-mem a hard limit: the caching allocator refuses to grow past it (OOM instead of a silent overrun)."""
    if device.type != "cuda":
        return
    total = torch.cuda.get_device_properties(device).total_memory
    if budget > total:
        raise UserError(f"--gpu-mem {budget / 2**30:.2f} GiB exceeds the device's {total / 2**30:.2f} GiB")
    torch.cuda.set_per_process_memory_fraction(budget / total, device)


def warm_up(device: torch.device) -> None:
    """Load now what a run loads anyway (the CUDA context and cuBLAS handle, torch.optim's imports), so the planner's
    host baseline includes their resident pages instead of seeing them appear mid-run, unplanned."""
    import torch._dynamo  # noqa: F401  (torch.optim pulls it in on first use: ~70 MB of code the run will hold)

    if device.type == "cuda":
        a = torch.ones(64, 64, device=device)
        (a @ a).sum().item()
