"""Everything decided before any work: the run's options, the model, its spec and shard index, device and dtype,
the memory plan, the output format and online runtime, and the refusals of what cannot finish.

One `prepare(cfg)` serves `run`, `run --dry-run`, `plan` and `bench`, so they cannot disagree: `plan MODEL OPTS`
prints exactly the plan `run MODEL OPTS --dry-run` prints and `run MODEL OPTS` then follows. Only headers, config.json
and the tokenizer are read; nothing is written.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from streamquant import __version__
from streamquant.data import BYTES_PER_TOKEN, CALIB_PIECE_CHARS, load_tokenizer, text_bytes
from streamquant.device import (cap_gpu_memory, free_gpu_bytes, resolve_device, resolve_dtype, warm_up)
from streamquant.distributed import Solo
from streamquant.errors import UserError
from streamquant.formats import COMPRESSED_TENSORS, FORMATS, OutputFormat, exportable_activations, resolve_format
from streamquant.memory import current_host_bytes, return_freed_memory_to_os
from streamquant.plan import GIB, Plan, Workload, check_room, fit_micro_batch, refit_over_budget
from streamquant.qblock import Runtime
from streamquant.quant.quantizers import ActQuantConfig, WeightQuantConfig
from streamquant.rotate.dart import R1_CONFIG, R2_CONFIG, RotationTrainConfig
from streamquant.shards import ShardIndex
from streamquant.source import resolve_model
from streamquant.spec import ModelSpec, read_spec
from streamquant.writer import copied_files_bytes

METHODS = ("dart", "quarot", "none")
HESSIANS = ("sequential", "one-pass")
ASYM_TARGETS = ("input", "model")
# What the calibration passes (R2's rows, GPTQ's Hessians, the states carried to the next block) see of activations:
# quantized, as the runtime computes them, or full precision, as QuaRot's GPTQ sees them (its activation quantizers
# are switched on after GPTQ); the evaluation and the output quantize activations either way.
CALIB_ACTS = ("quantized", "full")


def asym_calib_applies(weights: str, w_bits: int, a_bits: int, targets: str) -> bool:
    """--asym-calib has something to do: GPTQ weights whose inputs differ from their targets, the inputs before an
    activation quantizer (`input`) or the full-precision model's (`model`: the quantized blocks before them differ)."""
    return weights == "gptq" and w_bits < 16 and (a_bits < 16 or targets == "model")


@dataclass
class RunConfig:
    model: str
    out: Path | None = None
    method: str = "dart"
    w_bits: int = 4
    a_bits: int = 4
    kv_bits: int = 16
    weights: str = "rtn"              # rtn | gptq
    group_size: int = -1
    w_symmetric: bool = True
    act_order: bool = False
    w_clip: bool = False              # MSE-searched weight clipping (QuaRot w_clip)
    damp: float = 0.01                # GPTQ dampening, relative to mean(diag H)
    refit_scales: int = 0             # GPTQ: rounds of the least-squares refit of the scales to the codes (0: off)
    hessians: str = "sequential"      # GPTQ inputs: sequential (through the quantized weights before) | one-pass
    calib_acts: str = "quantized"     # what calibration passes see of activations: quantized (as the runtime) | full
    a_clip: float = 0.9
    a_symmetric: bool = False         # symmetric per-token activations (what compressed-tensors/vLLM int8 express)
    r4_online: bool = False           # compressed-tensors formats: R4 online (transform_config), its inverse fused
    o_online: bool = False            # an online Hadamard on o_proj's input, across heads (streamquant format)
    asym_calib: bool = False          # GPTQ reproduces the linear's output on target inputs from its real ones
    asym_targets: str = "input"       # ... before the activation quantizer, or the full-precision model's (`model`)
    calib: str = "default"
    samples: int = 128
    seqlen: int = 2048
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"
    micro_batch: int | None = None
    r1_reservoir_bytes: int = 256 << 20
    r2_tokens: int = 16384
    r1_train: RotationTrainConfig = field(default_factory=lambda: replace(R1_CONFIG))
    r2_train: RotationTrainConfig = field(default_factory=lambda: replace(R2_CONFIG))
    eval: str | None = None
    eval_windows: int | None = None
    format: str = "auto"              # auto | pack-quantized | int-quantized | streamquant
    gpu_mem: int | None = None        # bytes; the planner fits the micro-batch to it and CUDA is capped to it

    def check(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"--method must be one of {', '.join(METHODS)} (got {self.method!r})")
        if self.weights not in ("rtn", "gptq"):
            raise UserError(f"--weights must be rtn or gptq (got {self.weights!r})")
        for name, bits in (("--w-bits", self.w_bits), ("--a-bits", self.a_bits), ("--kv-bits", self.kv_bits)):
            if not (2 <= bits <= 8 or bits == 16):
                raise UserError(f"{name} must be between 2 and 8, or 16 for off (got {bits})")
        if self.group_size != -1 and self.group_size < 1:
            raise UserError(f"--group-size must be -1 (per channel) or a positive divisor of the linears' inputs "
                            f"(got {self.group_size})")
        if self.r1_train.epochs < 0 or self.r2_train.epochs < 0:
            raise UserError(f"--r1-epochs and --r2-epochs must be >= 0 (got {self.r1_train.epochs}, "
                            f"{self.r2_train.epochs})")
        if (self.r1_train.batches_per_epoch or 1) < 1:
            raise UserError(f"--r1-steps-per-epoch must be >= 0 (got {self.r1_train.batches_per_epoch})")
        if not self.r1_train.lr > 0:
            raise UserError(f"--r1-lr must be > 0 (got {self.r1_train.lr})")
        if self.hessians not in HESSIANS:
            raise UserError(f"--hessians must be one of {', '.join(HESSIANS)} (got {self.hessians!r})")
        if self.calib_acts not in CALIB_ACTS:
            raise UserError(f"--calib-acts must be one of {', '.join(CALIB_ACTS)} (got {self.calib_acts!r})")
        if not self.damp >= 0:
            raise UserError(f"--damp must be >= 0 (got {self.damp})")
        if self.refit_scales < 0:
            raise UserError(f"--refit-scales must be >= 0 (got {self.refit_scales})")
        if self.refit_scales and not (self.weights == "gptq" and self.w_bits < 16):
            raise UserError("--refit-scales needs GPTQ weights (--weights gptq, --w-bits below 16): it refits the "
                            "scales GPTQ's scan chose codes for, under GPTQ's Hessian")
        if not 0 < self.a_clip <= 1:
            raise UserError(f"--a-clip must be in (0, 1] (got {self.a_clip})")
        if self.format not in FORMATS:
            raise UserError(f"--format must be one of {', '.join(FORMATS)} (got {self.format!r})")
        if self.r4_online and self.method == "none":
            raise UserError("--r4-online needs a rotation (--method dart or quarot): R4's inverse is fused with them")
        if self.o_online and self.method == "none":
            raise UserError("--o-online needs a rotation (--method dart or quarot); --method none is the plain model")
        if self.asym_targets not in ASYM_TARGETS:
            raise UserError(f"--asym-targets must be one of {', '.join(ASYM_TARGETS)} (got {self.asym_targets!r})")
        if self.asym_calib and not asym_calib_applies(self.weights, self.w_bits, self.a_bits, self.asym_targets):
            raise UserError("--asym-calib needs GPTQ weights (--weights gptq, --w-bits below 16), and with "
                            "--asym-targets input quantized activations (--a-bits below 16): it makes GPTQ undo "
                            "their error (--asym-targets model: the full-precision model's, weight-only too)")
        if self.asym_calib and self.asym_targets == "model" and self.hessians != "sequential":
            raise UserError("--asym-targets model needs --hessians sequential: the full-precision stream's targets "
                            "pair with inputs through the quantized blocks (one-pass inputs are unquantized already)")
        if self.asym_calib and self.calib_acts == "full":
            raise UserError("--asym-calib and --calib-acts full exclude each other: GPTQ either reproduces the output "
                            "on the unquantized input from the quantized one (--asym-calib) or sees unquantized inputs")
        fmt = self.resolved_format
        if fmt in COMPRESSED_TENSORS:
            self._check_compressed_tensors(fmt)
        if self.out is not None and fmt == "streamquant" and self.w_bits not in (4, 16):
            raise UserError(f"the streamquant format packs 4-bit weights (or keeps 16-bit); --w-bits 8 is written as "
                            f"--format int-quantized (with --a-bits 16, or 8 --a-symmetric --a-clip 1); "
                            f"--w-bits {self.w_bits} can be evaluated without --out")

    def _check_compressed_tensors(self, fmt: str) -> None:
        """A compressed-tensors export must describe exactly what the run computes: refuse what it cannot say."""
        if self.kv_bits < 16:
            raise UserError(f"--format {fmt} has no KV-cache quantization with online R3: use --format streamquant "
                            f"(or auto) for --kv-bits {self.kv_bits}")
        if self.a_bits < 16 and not exportable_activations(self.act_cfg):
            raise UserError(f"--format {fmt} quantizes activations only as int8, symmetric, dynamic per token, "
                            f"unclipped: pass --a-bits 8 --a-symmetric --a-clip 1 (or --a-bits 16), or use "
                            f"--format streamquant for --a-bits {self.a_bits} --a-clip {self.a_clip}"
                            f"{'' if self.a_symmetric else ' asymmetric'}")
        want = 4 if fmt == "pack-quantized" else 8
        if self.w_bits not in (want, 16):   # 16: linears stay dense (as --format pack-quantized always allowed)
            raise UserError(f"--format {fmt} holds {want}-bit weights (got --w-bits {self.w_bits}); "
                            f"{'int-quantized' if self.w_bits == 8 else 'pack-quantized'} holds "
                            f"{8 if want == 4 else 4}-bit weights")
        if self.o_online:
            raise UserError(f"--format {fmt} carries no online Hadamard on o_proj's input: use --format streamquant "
                            f"(or auto) with --o-online, or --no-o-online")
        if fmt == "int-quantized" and not self.w_symmetric:
            raise UserError("--format int-quantized holds symmetric 8-bit weights (no --w-asym)")

    @property
    def act_cfg(self) -> ActQuantConfig:
        return ActQuantConfig(bits=self.a_bits, clip_ratio=self.a_clip, symmetric=self.a_symmetric)

    @property
    def resolved_format(self) -> str:
        return resolve_format(self.format, self.w_bits, self.a_bits, self.kv_bits,
                              exportable_activations(self.act_cfg), self.o_online)

    @property
    def weight_cfg(self) -> WeightQuantConfig | None:
        return None if self.w_bits >= 16 else WeightQuantConfig(self.w_bits, self.group_size, self.w_symmetric,
                                                                mse_clip=self.w_clip)

    @property
    def calibrates(self) -> bool:
        """Whether anything needs calibration data: a learned rotation (dart) or GPTQ. RTN weights with random or
        no rotations are data-free (activation quantizers are dynamic)."""
        return self.method == "dart" or (self.weights == "gptq" and self.weight_cfg is not None)

    def workload(self) -> Workload:
        """What the run will do, as far as memory is concerned."""
        # calibration text is tokenized a piece at a time, evaluation text whole (its ids must match others')
        calib_bytes = text_bytes(self.calib) if self.calibrates else 0
        texts = [min(calib_bytes, CALIB_PIECE_CHARS)] + ([text_bytes(self.eval)] if self.eval else [])
        windows = 0
        if self.eval:  # all windows unless limited: estimated from the text size (~3.5 bytes per token) before tokenizing
            windows = self.eval_windows or int(texts[-1] / BYTES_PER_TOKEN // self.seqlen)
        return Workload(samples=self.samples if self.calibrates else 0, seqlen=self.seqlen, eval_windows=windows, method=self.method,
                        weights=self.weights, w_bits=self.w_bits, a_bits=self.a_bits,
                        r1_reservoir_bytes=self.r1_reservoir_bytes, r2_tokens=self.r2_tokens, text_bytes=max(texts),
                        held_text_bytes=int(calib_bytes * (1 + 8 / BYTES_PER_TOKEN)),
                        group_size=self.group_size, w_asym=not self.w_symmetric,
                        one_pass_hessians=self.hessians == "one-pass", asym_calib=self.asym_calib,
                        refit=self.refit_scales > 0,
                        fp_stream=self.asym_calib and self.asym_targets == "model",
                        r4_stored=self.r4_online and self.method != "none"
                        and self.resolved_format in COMPRESSED_TENSORS)


@dataclass
class Prepared:
    """A run ready to start: what it runs on, how, and in how much memory."""

    cfg: RunConfig
    model_dir: Path
    spec: ModelSpec
    index: ShardIndex
    device: torch.device
    dtype: torch.dtype
    tokenizer: object
    plan: Plan
    format: OutputFormat
    runtime: Runtime
    group: Solo = field(default_factory=Solo)   # torchrun ranks (streamquant.distributed); Solo alone
    notes: list[str] = field(default_factory=list)   # what prepare changed of the options, in words for the log

    def identity(self) -> dict:
        """What an output records of its run: a resume must match it (device and micro-batch may change)."""
        run = {k: v for k, v in asdict(self.cfg).items() if k not in ("out", "device", "micro_batch")}
        run["model"] = str(self.model_dir)
        return {"streamquant_version": __version__, "torch_version": torch.__version__,
                "run": json.loads(json.dumps(run, default=str)), "format": self.format.name,
                "runtime": self.runtime.to_json(), "num_layers": self.spec.num_layers}


def prepare(cfg: RunConfig, plan_only: bool = False, group: Solo | None = None, optional_refit: bool = False
            ) -> Prepared:
    """Resolve, plan and refuse before any work. `plan_only` (plan, --dry-run) plans without running: `--device
    cuda` is planned on a machine without a GPU, `--device auto` means CUDA when `--gpu-mem` is given, and a host or
    disk shortfall of this machine is not refused (the plan says what the run needs; `run` refuses it).
    Under torchrun (`group`) every rank runs this: it plans its own share of the windows on its own device
    (cuda:LOCAL_RANK), and the ranks take the smallest micro-batch any of them planned. `optional_refit`: the
    scale refit is a preset's choice, not the user's, so it is turned off (and said) where only that fits the GPU."""
    group = group or Solo()
    cfg.check()
    model_dir = resolve_model(cfg.model)
    spec = read_spec(model_dir)
    if cfg.weight_cfg is not None:
        check_group_size(spec, cfg.weight_cfg)   # before any work, not at block 0 after capture and R1
    index = ShardIndex(model_dir, spec)
    device = _planned_device(cfg) if plan_only else resolve_device(cfg.device, group.local_rank)
    dtype = resolve_dtype(cfg.dtype, device)
    return_freed_memory_to_os()
    tokenizer = load_tokenizer(model_dir)
    spec.arch.hf_class("layer")   # the baseline RSS includes tokenizer, model code and device runtime
    if device.type != "cuda" or torch.cuda.is_available():
        warm_up(device)
    notes = []
    free = free_gpu_bytes(device) if torch.cuda.is_available() else None
    budget, budget_name = (cfg.gpu_mem, "--gpu-mem") if cfg.gpu_mem is not None else (free, "the GPU's free memory")
    # on the whole workload, not this rank's share; off for every torchrun rank where one rank has no room for it
    over = optional_refit and refit_over_budget(spec, index, cfg.workload(), dtype, device.type, budget,
                                                current_host_bytes())
    if optional_refit and group.any(over):
        cfg = replace(cfg, refit_scales=0)
        notes.append(f"GPTQ's scale refit is off: its smallest plan needs {over[0] / GIB:.2f} GiB, over "
                     f"{budget_name} {budget / GIB:.2f} GiB (without it {over[1] / GIB:.2f} GiB)" if over else
                     "GPTQ's scale refit is off: another rank's GPU has no room for it")
    work = group.fit_workload(cfg.workload())
    plan = fit_micro_batch(spec, index, work, dtype, device.type, cfg.gpu_mem, current_host_bytes(), cfg.micro_batch)
    if cfg.gpu_mem is None and free is not None and plan.peak_gpu_bytes > free:
        # no budget given, and the default micro-batch would not fit the GPU: fit it to what is free (and refuse
        # now, with the minimum, when even one sample per micro-batch does not fit, instead of an OOM hours in)
        plan = fit_micro_batch(spec, index, work, dtype, device.type, free, current_host_bytes(), cfg.micro_batch,
                               budget_name="the GPU's free memory,")
    smallest = group.min_int(plan.micro_batch)   # all ranks batch their forwards alike
    if smallest != plan.micro_batch:
        plan = fit_micro_batch(spec, index, work, dtype, device.type, cfg.gpu_mem, current_host_bytes(), smallest)
    if not plan_only:
        check_room(plan, cfg.out, copied_files_bytes(model_dir))
        if cfg.gpu_mem is not None:
            cap_gpu_memory(device, cfg.gpu_mem)
    rotated = cfg.method != "none"
    fmt_name = cfg.resolved_format
    online = fmt_name == "streamquant"   # compressed-tensors exports: R1/R2 only, unless R4 online is asked for
    runtime = Runtime(
        r3_seed=cfg.seed + 3 if rotated and online and cfg.kv_bits < 16 else None,  # R3 matters for KV quant only
        r4_seed=cfg.seed + 4 if rotated and (online or cfg.r4_online) else None,
        act=cfg.act_cfg,     # compressed-tensors formats: exactly the quantizer the export describes (checked)
        kv_bits=cfg.kv_bits,
        r4_stored=rotated and cfg.r4_online and fmt_name in COMPRESSED_TENSORS,
        o_seed=cfg.seed + 5 if rotated and cfg.o_online else None,
    )
    if spec.arch.moe is not None and fmt_name in COMPRESSED_TENSORS and (
            fmt_name != "pack-quantized" or runtime.act.enabled or runtime.r4_stored):
        # transformers dequantizes compressed experts into its fused 3-D weights: only packed weights survive that
        raise UserError(f"--format {fmt_name}: a {spec.model_type} (MoE) export holds 4-bit weights only (W4A16, no "
                        f"--r4-online, no activation quantization); use --format streamquant for the rest")
    fmt = OutputFormat(fmt_name, spec, cfg.weight_cfg, runtime, dtype)
    return Prepared(cfg, model_dir, spec, index, device, dtype, tokenizer, plan, fmt, runtime, group, notes)


def _planned_device(cfg: RunConfig) -> torch.device:
    """The device a plan is for, which need not be this machine's."""
    if cfg.device == "auto":
        return torch.device("cuda" if cfg.gpu_mem is not None or torch.cuda.is_available() else "cpu")
    try:
        return torch.device(cfg.device)
    except RuntimeError as exc:
        raise UserError(f"unknown device {cfg.device!r} (use auto, cpu, cuda or cuda:N)") from exc


def check_group_size(spec: ModelSpec, wcfg: WeightQuantConfig) -> None:
    """Every quantized linear's input dimension must split into whole groups."""
    if wcfg.group_size == -1:
        return
    dims = spec.dims()
    inputs = {lin.inp for lin in spec.arch.linears}
    bad = [f"{name}={dims[name]}" for name in sorted(inputs) if dims[name] % wcfg.group_size]
    if bad:
        raise UserError(f"--group-size {wcfg.group_size} does not divide the input dimension of every linear "
                        f"({', '.join(bad)}); choose a divisor or -1 (per channel)")
