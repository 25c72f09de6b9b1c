"""The memory planner: predicted peak GPU and host bytes of every pipeline stage, the output size, the micro-batch
that fits a GPU budget, and the refusals of what this machine cannot finish — from config.json and safetensors
headers only (no tensor data)."""
from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from streamquant.errors import UserError
from streamquant.quant.gptq import REFIT_CHUNK


def micro_batch_for(seqlen: int, hidden: int, intermediate: int, dtype: torch.dtype, budget_bytes: int = 512 << 20) -> int:
    """Samples per micro-batch so one block's activations (MLP intermediates dominate) stay within a budget."""
    bytes_per_sample = seqlen * (4 * hidden + 3 * intermediate) * torch.finfo(dtype).bits // 8
    return max(1, budget_bytes // max(1, bytes_per_sample))


# ---------------------------------------------------------------------------------------------------------------
# The memory plan: predicted peak bytes per pipeline stage, from config.json and safetensors headers only.
# Each term names the tensor the pipeline really holds at that moment (see pipeline.py); `plan` and `run` use it to
# pick the micro-batch that fits --gpu-mem, and report.json puts the measured peaks beside it.
# ---------------------------------------------------------------------------------------------------------------

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
    text_bytes: int = 0               # the largest text the run tokenizes in one call (calibration or evaluation)
    held_text_bytes: int = 0          # what stays resident meanwhile: the whole calibration text and its token ids
    group_size: int = -1              # weight scales per group of input columns (-1: one per output channel)
    w_asym: bool = False              # asymmetric weights also store packed zero points
    r4_stored: bool = False           # compressed-tensors export with R4 online: a dense fp32 R4 per block
    one_pass_hessians: bool = False   # GPTQ: every group's Hessian filled in one pass, so all are held at once
    asym_calib: bool = False          # GPTQ with targets: a second in×in matrix beside each Hessian
    refit: bool = False               # GPTQ refits its scales: H + λI beside the inverse factor, the start kept
    fp_stream: bool = False           # ... from a full-precision stream: its states and its unquantized block
    ranks: int = 1                    # torchrun processes: a rank holds its share of the windows, all sampled rows

    def share(self, windows: int) -> int:
        """The most windows one rank holds (streamquant.distributed splits them contiguously)."""
        return -(-windows // self.ranks)


@dataclass
class Plan:
    micro_batch: int
    device: str
    stages: dict[str, dict[str, int]] = field(default_factory=dict)   # stage -> {"gpu_bytes", "host_bytes"}
    output_bytes: int = 0
    min_gpu_bytes: int = 0
    gpu_budget: int | None = None
    base_host_bytes: int = 0          # the process before the run (interpreter, torch, tokenizer): in every host peak

    @property
    def peak_gpu_bytes(self) -> int:
        return max(s["gpu_bytes"] for s in self.stages.values())

    @property
    def peak_host_bytes(self) -> int:
        return max(s["host_bytes"] for s in self.stages.values())

    def to_json(self) -> dict:
        return {"micro_batch": self.micro_batch, "device": self.device, "peak_gpu_bytes": self.peak_gpu_bytes,
                "peak_host_bytes": self.peak_host_bytes, "output_bytes": self.output_bytes,
                "min_gpu_bytes": self.min_gpu_bytes, "gpu_budget": self.gpu_budget,
                "base_host_bytes": self.base_host_bytes, "stages": self.stages}


def reservoir_rows(samples: int, seqlen: int, hidden: int, layers: int, sides: int, budget_bytes: int) -> int:
    """Rows R1's reservoir keeps per (layer, side): the byte budget shared out, at most every calibration token."""
    return min(samples * seqlen, max(1, budget_bytes // (4 * hidden) // (sides * layers)))


CAPTURE_OVERSAMPLE, CAPTURE_MIN_WINDOWS = 2, 8


def capture_windows(samples: int, seqlen: int, per_side: int) -> int:
    """Calibration windows the capture pass runs: enough that each (layer, side) draws its reservoir rows from at
    least 2× as many tokens (and from 8 windows or more), since capture exists only to fill the reservoir. At
    Llama-2-70B shape with 128 × 2048 samples and a 256 MiB reservoir that is 8 windows, not 128."""
    needed = max(CAPTURE_MIN_WINDOWS, -(-CAPTURE_OVERSAMPLE * per_side // seqlen))
    return min(samples, needed)


# A fast tokenizer holds ~140 bytes per character of text while it encodes a whole text at once (ids, offsets, token
# strings; measured 142-144 B/char with SmolLM2's byte-level BPE on WikiText-2 valid and test).
TOKENIZE_BYTES_PER_TEXT_BYTE = 150


def _activation_bytes_per_token(spec, b: int, a_bits: int, on_gpu: bool) -> int:
    """Live activations per token at a decoder layer's peak, the MLP: the attention residual, the normed input,
    act(gate), up, their product (transformers frees gate once act() returns), and on a GPU the block input copied
    from the host buffer (on a CPU it is a view). With activation quantization, down_proj's input also gets the online
    R4 output and the quantizer's fp32 work tensors (plus an fp32 copy of a half-precision input).
    Measured on CPU in fp32 at hidden 2048 / intermediate 7168: 3h+3i floats per token, and +2i with W4A4."""
    h, i = spec.hidden_size, spec.mlp_width
    act = b * ((4 if on_gpu else 3) * h + 3 * i)
    if spec.arch.moe is not None:
        act += 2 * b * h   # the expert loop's output accumulator and the current expert's gathered tokens
    if a_bits < 16:
        act += b * max(h, i) + 4 * max(h, i) + (4 * max(h, i) if b < 4 else 0)
    return act


@dataclass(frozen=True)
class Moment:
    """What one instant of a stage holds beyond the stage's persistent buffers: on the device and on the host."""

    device: int
    host: int


def predict(spec, index, work: Workload, dtype: torch.dtype, device: str, micro_batch: int,
            base_host_bytes: int) -> Plan:
    """Peak GPU and host bytes of every stage for this micro-batch (device 'cuda' or 'cpu').

    Each stage is the maximum over the moments the pipeline really goes through (pipeline.py, in order); each moment
    lists the tensors alive then. On a CPU run the device is the host, so device bytes add to the resident set."""
    b = torch.finfo(dtype).bits // 8
    h, i, v, L = spec.hidden_size, spec.mlp_width, spec.vocab_size, spec.num_layers
    q = spec.num_heads * spec.head_dim
    dart = work.method == "dart"
    tokens = micro_batch * work.seqlen
    stored = max(index.block_bytes(k) for k in range(L))        # one block as read from disk (prefetch staging)
    compute = spec.block_params() * b                            # one built block in the compute dtype
    codes = spec.block_params() if work.w_bits < 16 else 0       # int8 codes kept for the writer
    widest = max(i * h, q * h)
    hidden = work.share(work.samples) * work.seqlen * h * b
    eval_hidden = work.share(work.eval_windows) * work.seqlen * h * b
    on_gpu = device == "cuda"
    scores = micro_batch * spec.num_heads * work.seqlen ** 2 * b  # an explicit mask makes SDPA materialise scores
    scores = scores if spec.sliding_window and work.seqlen > spec.sliding_window else 0
    act16 = tokens * _activation_bytes_per_token(spec, b, 16, on_gpu) + scores   # capture: full precision
    act = tokens * _activation_bytes_per_token(spec, b, work.a_bits, on_gpu) + scores
    sides = len(spec.arch.capture_points)                        # reservoir rows are sampled per (layer, side)
    per_side = reservoir_rows(work.samples, work.seqlen, h, L, sides, work.r1_reservoir_bytes)
    rows = sides * L * per_side
    captured = work.share(capture_windows(work.samples, work.seqlen, per_side)) * work.seqlen * h * b
    reservoir = rows * h * 4 if dart else 0
    r1_train = 10 * h * h * 4 if dart else 0                     # Z, grad, momentum, Q, R and autograd buffers
    r1_train += 4 * max(64, rows // 100) * h * 4 if dart else 0  # a step's rows (R1: 10 % per epoch in 10 steps),
                                                                 # rotated, |.|, exp
    whip_eval = 5 * min(8192, rows) * h * 4 if dart else 0       # a chunk of rows, rotated, |.|, exp
    r2_samples = min(work.r2_tokens, work.samples * work.seqlen) * q * 4 if dart else 0
    # the full-precision stream (--asym-calib, sequential): the unquantized block beside the quantized one from its
    # build to the block's last forward, and a micro-batch of one linear's input it ran (the target GPTQ pairs)
    reference = compute + tokens * max(h, i) * 4 if work.fp_stream else 0
    weight_quant = [Moment(m.device + reference, m.host)
                    for m in _weight_quant_moments(spec, work, compute + codes, act, stored, widest, b)]
    gptq = work.weights == "gptq" and work.w_bits < 16
    early_h = h * h * 4 if dart and gptq else 0                  # the R2 pass also fills q/k/v's Hessian
    embed_stored = index.entries[spec.arch.embed].nbytes
    embed_fuse = 2 * embed_stored + 2 * 4096 * h * 8 if work.method != "none" else embed_stored  # rotate.fuse chunks
    logits = work.seqlen * v * 4 * 3                             # logits, the shifted copy, log-softmax
    rotate = _rotate_moment(spec, stored, compute, widest, on_gpu)

    stages: dict[str, tuple[int, list[Moment]]] = {             # stage -> (persistent host bytes, moments)
        "load": (0, [Moment(0, TOKENIZE_BYTES_PER_TEXT_BYTE * work.text_bytes + work.held_text_bytes)]),
    }
    if dart:  # the full-precision capture pass and R1 training exist only to learn R1
        stages["capture"] = (captured + reservoir, [Moment(0, embed_stored), rotate, Moment(compute + act16, stored)])
        # capture's hidden states are gone; on a CPU, autograd and LAPACK workspaces add ~60 MB (measured at n=576)
        stages["r1"] = (reservoir, [Moment(r1_train + whip_eval, 0 if on_gpu else 64 << 20)])
    stages |= {
        "embed": (hidden + eval_hidden, [Moment(0, embed_fuse), Moment(0, hidden if work.fp_stream else 0)]),
        "quantize": (hidden * (2 if work.fp_stream else 1) + eval_hidden, [
            rotate,                                                               # probe: R1 (and R4) only
            Moment(compute + act + early_h + (r2_samples if on_gpu else 0), stored + r2_samples),  # R2 pass
            Moment(rotate.device + early_h, rotate.host),                         # final: R1, R2, R4
            *weight_quant,
            Moment(compute + codes + act + reference, stored),                    # the quantized block's forward
            Moment(compute + codes, stored + codes // 2 + (compute if on_gpu else 0)),  # the writer's packed copy
        ]),
    }
    head = v * h * b
    # the final norm and R1 fused into a fresh lm_head (fp64 row chunks); the writer's serialised copy is no larger
    stages["head"] = (hidden + eval_hidden, [Moment(0, 2 * head + 3 * 4096 * h * 8 if work.method != "none" else 2 * head)])
    if work.eval_windows:
        stages["eval"] = (hidden + eval_hidden, [Moment(head + logits, head if on_gpu else 0)])  # one window's logits
    out: dict[str, dict[str, int]] = {}
    for name, (persistent, moments) in stages.items():
        gpu = max(m.device for m in moments) if on_gpu else 0
        # on a CPU run the device is the host: its tensors add to the resident set
        host = max(m.host + (0 if on_gpu else m.device) for m in moments)
        out[name] = {"gpu_bytes": int(gpu), "host_bytes": int(base_host_bytes + persistent + host)}
    return Plan(micro_batch, device, out, output_bytes(spec, work, b), base_host_bytes=base_host_bytes)


def _weight_quant_moments(spec, work: Workload, block: int, forward: int, stored: int, widest: int, b: int
                          ) -> list[Moment]:
    """Quantizing one block's weights beside the built block and its codes (`block`): GPTQ runs a forward
    (`forward`: activations and scratch) that feeds one group's Hessian (a MoE stage's experts': each of theirs;
    one-pass: every group's), then solves; RTN holds an fp32 work copy and the dequantized weight."""
    h, i = spec.hidden_size, spec.mlp_width
    if work.w_bits >= 16:
        return []
    if work.weights != "gptq":
        return [Moment(block + 2 * widest * 4, stored)]
    hessian = max(h * h, i * i) * 4   # H; the hook's fp32 input copy fits in the act envelope (act/up are freed by then)
    # GPTQ.quantize scans a group's stacked rows (q/k/v, gate/up) at once (_solve_bytes; measured per linear at in
    # 8192 and 14336 to within 2 %; stacked rows not re-measured)
    dims = spec.dims()
    shape = {lin.name: (dims[lin.out], dims[lin.inp]) for lin in spec.arch.linears}
    stacked = max(sum(shape[n][0] for n in group) * shape[group[0]][1] for group in spec.arch.gptq_order)
    held = 2 if work.asym_calib else 1   # --asym-calib: the target cross term D beside each Hessian
    solve = _solve_bytes(stacked, hessian, b, work.asym_calib, work.refit)
    stage = spec.arch.gptq_stage
    if not work.one_pass_hessians and len(set(stage)) == len(stage):
        return [Moment(block + forward + held * hessian, stored), Moment(block + solve, stored)]
    # a pass fills the Hessians of every group (one-pass) or of a stage's groups (a MoE block's experts); each is
    # freed by its own solve, so the groups after the one being solved that the same pass filled are still held
    groups = [(sum(shape[n][0] for n in group) * shape[group[0]][1], shape[group[0]][1] ** 2 * 4)
              for group in spec.arch.gptq_order]
    filled = [[g2 for g2 in range(len(groups)) if work.one_pass_hessians or stage[g2] == stage[g]]
              for g in range(len(groups))]
    passes = max(sum(held * groups[g2][1] for g2 in same) for same in filled)
    solves = [_solve_bytes(rows, hg, b, work.asym_calib, work.refit) + sum(held * groups[g2][1] for g2 in same if g2 > g)
              for g, ((rows, hg), same) in enumerate(zip(groups, filled))]
    return [Moment(block + forward + passes, stored), Moment(block + max(solves), stored)]


def _solve_bytes(weights: int, hessian: int, b: int, targets: bool, refit: bool = False) -> int:
    """One GPTQ.quantize of `weights` elements (a group's stacked rows) against an in×in fp32 `hessian`: the stacked
    copy in the block dtype; at the Cholesky H (in the sum's memory) and L beside the fp32 work copy W, later one
    inverse factor beside W, the codes and the result. With targets, first the least-squares start: H, D, H's damped
    copy and its factor beside W, then D's product with W and its solve (two transposed copies). With the scale
    refit, H + λI beside the inverse factor, the scan's start and the best codes, and either a round's scan (its copy
    of the start and its codes) or the fit's row chunks ((q − z) and one product, at most REFIT_CHUNK floats each)."""
    w4 = weights * 4
    solve = max(2 * hessian + w4, hessian + 3 * w4)
    if targets:
        solve = max(solve, 4 * hessian + w4, 3 * hessian + 4 * w4)
    if refit:
        solve = max(solve, 2 * hessian + 4 * w4, 2 * hessian + 3 * w4 + 2 * min(w4, 4 * REFIT_CHUNK))
    return weights * b + solve


def _rotate_moment(spec, stored: int, compute: int, widest: int, on_gpu: bool) -> Moment:
    """rotate_block: on CUDA in fp32 one Linear at a time with the next Linear's copy in flight and the output on the
    GPU; on a CPU the original, the prefetched next block, the output and one Linear in fp64 with its fused result."""
    if on_gpu:
        per_param = max(1, round(stored / spec.block_params()))
        return Moment(stored + 2 * widest * per_param + 2 * widest * 4 + spec.hidden_size ** 2 * 4, 2 * stored)
    return Moment(0, 2 * stored + compute + 2 * widest * 8)


def output_bytes(spec, work: Workload, b: int) -> int:
    """Tensor bytes a run writes: per block the compressed-tensors pack-quantized layout (int32 words of eight
    4-bit codes along the input, scales [out, groups] in the model dtype, zero points packed along the output) or
    16-bit weights, plus norms and biases, the fp64 rotations, and the embedding and head (always both: they differ
    once R1 is fused). Headers, config and tokenizer files come on top (check_room adds a margin)."""
    h, v, L = spec.hidden_size, spec.vocab_size, spec.num_layers
    if work.w_bits >= 16:
        block = spec.block_params() * b
    else:
        block = 0
        for name, shape in spec.block_shapes().items():
            if name.rsplit(".", 1)[0] not in spec.arch.quantized_names or not name.endswith(".weight"):
                block += math.prod(shape) * b                         # norms, biases, 16-bit routers
                continue
            rows, cols = shape
            groups = 1 if work.group_size <= 0 else -(-cols // work.group_size)
            if work.w_bits == 8:                                        # int-quantized: int8 weight, weight_scale
                block += rows * cols + rows * groups * b
                continue
            block += rows * -(-cols // 8) * 4 + rows * groups * b + 16  # weight_packed, weight_scale, weight_shape
            if work.w_asym:
                block += -(-rows // 8) * groups * 4                    # weight_zero_point
    rotations = 0 if work.method == "none" else (h * h + L * spec.num_kv_heads * spec.head_dim ** 2) * 8
    if work.r4_stored:
        block += spec.dims()[spec.arch.linear(spec.arch.r4).inp] ** 2 * 4   # <down_proj>.R4_input.weight, fp32
    return L * block + 2 * v * h * b + h * b + rotations


def check_room(plan: Plan, out, model_files_bytes: int = 0) -> None:
    """Refuse, before any work, a run this machine cannot finish: a host peak beyond RAM + swap (the OOM killer
    would end it hours in) or an output larger than the free space under --out (files a killed run left there count
    as free: --resume reuses them, --overwrite deletes them). The disk margin covers headers, config, tokenizer
    files (`model_files_bytes`) and the temp file of the block being written."""
    import psutil

    ram = psutil.virtual_memory().total + psutil.swap_memory().total
    if plan.peak_host_bytes > ram:
        stage = max(plan.stages, key=lambda name: plan.stages[name]["host_bytes"])
        advice = ("use a shorter --eval text (tokenized whole) or a smaller --calib corpus" if stage == "load" else
                  "lower --samples, --seqlen, --eval-windows or --r1-reservoir")
        raise UserError(f"the plan needs {plan.peak_host_bytes / GIB:.1f} GiB of host memory at its peak ({stage}); "
                        f"this machine has {ram / GIB:.1f} GiB (RAM + swap): {advice}")
    if out is None or not plan.output_bytes:
        return
    out = Path(out).expanduser().absolute()
    anchor = next(p for p in (out, *out.parents) if p.exists())
    present = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) if out.is_dir() else 0
    need = int(plan.output_bytes * 1.02) + model_files_bytes + (64 << 20) - present
    free = shutil.disk_usage(anchor).free
    if need > free:
        raise UserError(f"--out {out}: the output needs {need / GIB:.1f} GiB more and {anchor} has "
                        f"{free / GIB:.1f} GiB free")


def refit_over_budget(spec, index, work: Workload, dtype: torch.dtype, device: str, gpu_budget: int | None,
                      base_host_bytes: int) -> tuple[int, int] | None:
    """(smallest plan with GPTQ's scale refit, smallest without) when only the one without fits the GPU budget.

    The refit holds H + λI beside the inverse factor (a 70B down_proj's is 3.3 GB); a preset that turns it on for
    quality must not be what stops a run that fits without it."""
    if not work.refit or device != "cuda" or gpu_budget is None:
        return None
    need = predict(spec, index, work, dtype, device, 1, base_host_bytes).peak_gpu_bytes
    lean = predict(spec, index, replace(work, refit=False), dtype, device, 1, base_host_bytes).peak_gpu_bytes
    return (need, lean) if lean <= gpu_budget < need else None


def fit_micro_batch(spec, index, work: Workload, dtype: torch.dtype, device: str, gpu_budget: int | None,
                    base_host_bytes: int, requested: int | None = None, budget_name: str = "--gpu-mem") -> Plan:
    """The largest micro-batch whose predicted GPU peak fits the budget; refuse (with the minimum) when none does."""
    def at(mb: int) -> Plan:
        return predict(spec, index, work, dtype, device, mb, base_host_bytes)

    if requested is not None:
        mb = requested
    elif device == "cuda" and gpu_budget is not None:
        lo, hi = 1, max(1, work.share(work.samples) or work.share(work.eval_windows))
        while lo < hi:  # the prediction grows with the micro-batch: binary search the largest that fits
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if at(mid).peak_gpu_bytes <= gpu_budget else (lo, mid - 1)
        mb = lo
    else:
        mb = min(max(1, work.share(work.samples) or work.share(work.eval_windows)), micro_batch_for(work.seqlen, spec.hidden_size, spec.mlp_width, dtype))
    plan = at(mb)
    plan.min_gpu_bytes = at(1).peak_gpu_bytes
    plan.gpu_budget = gpu_budget
    if device == "cuda" and gpu_budget is not None and plan.peak_gpu_bytes > gpu_budget:
        advice = "raise --gpu-mem or lower --seqlen"
        if work.refit:   # (asked for, or the presets' and nothing fits even without it: refit_over_budget)
            lean = predict(spec, index, replace(work, refit=False), dtype, device, 1, base_host_bytes).peak_gpu_bytes
            if lean < plan.min_gpu_bytes:
                advice += f", or pass --refit-scales 0 (its smallest plan needs {lean / GIB:.2f} GiB)"
        raise UserError(f"nothing fits in {budget_name} {gpu_budget / GIB:.2f} GiB: micro-batch {mb} needs "
                        f"{plan.peak_gpu_bytes / GIB:.2f} GiB and the smallest plan (one sample per micro-batch) "
                        f"needs {plan.min_gpu_bytes / GIB:.2f} GiB; {advice}")
    return plan
