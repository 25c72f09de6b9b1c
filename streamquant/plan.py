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


def peak_gpu_reserved_bytes(device: torch.device) -> int:
    """What the caching allocator held (what nvidia-smi and a 24 GiB card see), not just live tensors."""
    return int(torch.cuda.max_memory_reserved(device)) if device.type == "cuda" else 0


# ---------------------------------------------------------------------------------------------------------------
# The memory plan: predicted peak bytes per pipeline stage, from config.json and safetensors headers only.
# Each term names the tensor the pipeline really holds at that moment (see pipeline.py); `plan` and `run` use it to
# pick the micro-batch that fits --gpu-mem, and report.json puts the measured peaks beside it.
# ---------------------------------------------------------------------------------------------------------------
from dataclasses import dataclass, field  # noqa: E402

GIB = 1 << 30


@dataclass(frozen=True)
class Workload:
    """What a run will do, as far as memory is concerned."""

    samples: int
    seqlen: int
    eval_windows: int = 0
    method: str = "dart"
    weights: str = "rtn"
    w_bits: int = 4
    a_bits: int = 4
    r1_reservoir_bytes: int = 256 << 20
    r2_tokens: int = 16384
    write: bool = True


@dataclass
class Plan:
    micro_batch: int
    device: str
    stages: dict[str, dict[str, int]] = field(default_factory=dict)   # stage -> {"gpu_bytes", "host_bytes"}
    output_bytes: int = 0
    min_gpu_bytes: int = 0
    gpu_budget: int | None = None

    @property
    def peak_gpu_bytes(self) -> int:
        return max(s["gpu_bytes"] for s in self.stages.values())

    @property
    def peak_host_bytes(self) -> int:
        return max(s["host_bytes"] for s in self.stages.values())

    def to_json(self) -> dict:
        return {"micro_batch": self.micro_batch, "device": self.device, "peak_gpu_bytes": self.peak_gpu_bytes,
                "peak_host_bytes": self.peak_host_bytes, "output_bytes": self.output_bytes,
                "min_gpu_bytes": self.min_gpu_bytes, "gpu_budget": self.gpu_budget, "stages": self.stages}


def _activation_bytes_per_token(spec, b: int, a_bits: int) -> int:
    """One decoder layer's live activations per token: residual/normed/output hidden, q/k/v/attention output, the
    MLP's gate/up/act/product, and fp32 temporaries of the per-token quantizer and the online R4 on the widest input."""
    h, i = spec.hidden_size, spec.intermediate_size
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    act = b * (6 * h + 2 * q + 2 * kv + 4 * i)
    return act + (4 * 3 * max(h, i) if a_bits < 16 else 0)


def predict(spec, index, work: Workload, dtype: torch.dtype, device: str, micro_batch: int,
            base_host_bytes: int) -> Plan:
    """Peak GPU and host bytes of every stage for this micro-batch (device 'cuda' or 'cpu')."""
    b = torch.finfo(dtype).bits // 8
    h, i, v, L = spec.hidden_size, spec.intermediate_size, spec.vocab_size, spec.num_layers
    q = spec.num_heads * spec.head_dim
    tokens = micro_batch * work.seqlen
    block_stored = max(index.block_bytes(k) for k in range(L))
    block_compute = spec.block_params() * b
    widest_linear = max(i * h, q * h)
    fuse64 = 2 * widest_linear * 8                               # one Linear in fp64 and its fused result
    hidden = work.samples * work.seqlen * h * b
    eval_hidden = work.eval_windows * work.seqlen * h * b
    act = tokens * _activation_bytes_per_token(spec, b, work.a_bits)
    if spec.sliding_window and work.seqlen > spec.sliding_window:
        act += micro_batch * spec.num_heads * work.seqlen ** 2 * b  # explicit mask -> SDPA materialises scores
    per_side = min(work.samples * work.seqlen, max(1, work.r1_reservoir_bytes // (4 * h) // (2 * L)))
    reservoir = 2 * L * per_side * h * 4 if work.method == "dart" else 0
    r1_train = 10 * h * h * 4 if work.method == "dart" else 0    # Z, grad, momentum, Q, R and autograd buffers
    r2_samples = min(work.r2_tokens, work.samples * work.seqlen) * q * 4 if work.method == "dart" else 0
    if work.weights == "gptq" and work.w_bits < 16:
        gptq = max(3 * h * h, 2 * i * i) * 4 + 3 * widest_linear * 4   # Hessian + inverse/Cholesky, weight copies
    else:
        gptq = widest_linear * 4 * 2 if work.w_bits < 16 else 0       # RTN codes and dequantized copy
    embed_stored = v * h * index.entries["model.embed_tokens.weight"].nbytes // max(1, v * h)
    embed_fuse = 2 * embed_stored + 2 * 4096 * h * 8 if work.method != "none" else embed_stored  # rotate.fuse chunks
    logits = work.seqlen * v * 4 * 3

    on_gpu = device == "cuda"
    staging = 2 * block_stored                                    # block in use + the prefetched one (pinned host)
    gpu, host = {}, {}
    # capture: one full-precision block and a micro-batch on the device; hidden states and reservoir on the host
    gpu["capture"] = block_compute + act
    host["capture"] = hidden + reservoir + staging + fuse64 + embed_stored
    gpu["r1"] = r1_train
    host["r1"] = hidden + reservoir
    gpu["embed"] = 0                                              # pass 2 starts: E·R1 and the hidden buffers
    host["embed"] = hidden + eval_hidden + embed_fuse
    # quantize pass: rotated block (probe, then final), R2 samples, GPTQ Hessians, micro-batch activations
    gpu["quantize"] = block_compute + act + gptq + r2_samples
    host["quantize"] = hidden + eval_hidden + staging + fuse64 + block_stored
    if work.eval_windows:
        gpu["eval"] = v * h * b + logits
        host["eval"] = hidden + eval_hidden + 2 * v * h * b + 2 * 4096 * h * 8
    stages = {}
    for name in gpu:
        g = gpu[name] if on_gpu else 0
        # on a CPU run the device is the host: its tensors add to the resident set
        host_total = base_host_bytes + host[name] + (0 if on_gpu else gpu[name])
        stages[name] = {"gpu_bytes": int(g), "host_bytes": int(host_total)}
    output = 0
    if work.write:
        packed = spec.block_params() * (0.5 if work.w_bits < 16 else b) * L
        output = int(packed + 2 * v * h * b)
    return Plan(micro_batch, device, stages, output)


def fit_micro_batch(spec, index, work: Workload, dtype: torch.dtype, device: str, gpu_budget: int | None,
                    base_host_bytes: int, requested: int | None = None) -> Plan:
    """The largest micro-batch whose predicted GPU peak fits the budget; refuse (with the minimum) when none does."""
    def at(mb: int) -> Plan:
        return predict(spec, index, work, dtype, device, mb, base_host_bytes)

    if requested is not None:
        mb = requested
    elif device == "cuda" and gpu_budget is not None:
        lo, hi = 1, max(1, work.samples)
        while lo < hi:  # the prediction grows with the micro-batch: binary search the largest that fits
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if at(mid).peak_gpu_bytes <= gpu_budget else (lo, mid - 1)
        mb = lo
    else:
        mb = min(max(1, work.samples), micro_batch_for(work.seqlen, spec.hidden_size, spec.intermediate_size, dtype))
    plan = at(mb)
    plan.min_gpu_bytes = at(1).peak_gpu_bytes
    plan.gpu_budget = gpu_budget
    if device == "cuda" and gpu_budget is not None and plan.peak_gpu_bytes > gpu_budget:
        raise UserError(f"nothing fits in --gpu-mem {gpu_budget / GIB:.2f} GiB: micro-batch {mb} needs "
                        f"{plan.peak_gpu_bytes / GIB:.2f} GiB and the smallest plan (one sample per micro-batch) "
                        f"needs {plan.min_gpu_bytes / GIB:.2f} GiB; raise --gpu-mem or lower --seqlen")
    return plan


def cap_gpu_memory(device: torch.device, budget: int) -> None:
    """Make --gpu-mem a hard limit: the caching allocator refuses to grow past it (OOM instead of a silent overrun)."""
    if device.type != "cuda":
        return
    total = torch.cuda.get_device_properties(device).total_memory
    if budget > total:
        raise UserError(f"--gpu-mem {budget / GIB:.2f} GiB exceeds the device's {total / GIB:.2f} GiB")
    torch.cuda.set_per_process_memory_fraction(budget / total, device)


def current_host_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss
