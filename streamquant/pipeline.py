"""DartQuant on a stream of blocks, read top to bottom like the paper:

    capture  →  calibrate R1  →  per block: rotate (σ, R1, R4) → calibrate R2 → quantize (RTN | GPTQ) → write
                                                                  → run the quantized block → next block's inputs

Only one block's weights (plus the prefetched one) exist at any time. Calibration hidden states and the evaluation
hidden states travel through the *quantized* blocks, so the next block is calibrated on what the real quantized
model feeds it and the run can end with the quantized model's perplexity without reloading anything.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from streamquant.data import (BYTES_PER_TOKEN, CALIB_PIECE_CHARS, calibration_windows, eval_windows, load_tokenizer,
                              read_text, text_bytes, tokenize, tokenize_in_pieces)
from streamquant.errors import UserError
from streamquant.kernels.hadamard import random_hadamard_matrix
from streamquant.plan import (Workload, cap_gpu_memory, check_room, current_host_bytes, fit_micro_batch,
                              free_gpu_bytes, full_fp32_matmuls, peak_gpu_bytes, peak_gpu_reserved_bytes,
                              peak_host_bytes, pin_host_memory, release_host_memory, resolve_device, resolve_dtype,
                              return_freed_memory_to_os, warm_up)
from streamquant.qblock import QLinear, Runtime, qlinears
from streamquant.quant.gptq import GPTQ
from streamquant.quant.quantizers import ActQuantConfig, WeightQuantConfig
from streamquant.rotate.dart import R1_CONFIG, R2_CONFIG, RotationTrainConfig, train_r1, train_r2
from streamquant.rotate.fuse import fuse_embedding, fuse_head
from streamquant.rotate.model import build_rotated_layer, quantize_layer_rtn, rotate_block
from streamquant.shards import BlockPrefetcher, ShardIndex
from streamquant.source import resolve_model
from streamquant.spec import ModelSpec, read_spec
from streamquant.stream import Engine, layer_class
from streamquant.writer import copied_files_bytes

METHODS = ("dart", "quarot", "none")
# GPTQ order inside a block: each group sees inputs produced by the already-quantized groups before it.
GPTQ_ORDER = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
              ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


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
    a_clip: float = 0.9
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
    format: str = "auto"              # auto | pack-quantized | streamquant
    gpu_mem: int | None = None        # bytes; the planner fits the micro-batch to it and CUDA is capped to it

    def check(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"--method must be one of {', '.join(METHODS)} (got {self.method!r})")
        if self.weights not in ("rtn", "gptq"):
            raise UserError(f"--weights must be rtn or gptq (got {self.weights!r})")
        for name, bits in (("--w-bits", self.w_bits), ("--a-bits", self.a_bits), ("--kv-bits", self.kv_bits)):
            if not (2 <= bits <= 8 or bits == 16):
                raise UserError(f"{name} must be between 2 and 8, or 16 for off (got {bits})")
        if not self.damp >= 0:
            raise UserError(f"--damp must be >= 0 (got {self.damp})")
        if not 0 < self.a_clip <= 1:
            raise UserError(f"--a-clip must be in (0, 1] (got {self.a_clip})")
        if self.format not in ("auto", "pack-quantized", "streamquant"):
            raise UserError(f"--format must be auto, pack-quantized or streamquant (got {self.format!r})")
        if self.format == "pack-quantized" and (self.a_bits < 16 or self.kv_bits < 16):
            raise UserError("--format pack-quantized holds weight-only (W4A16) models; activation or KV quantization "
                            "needs online transforms: use --format streamquant (or auto)")
        if self.out is not None and self.w_bits not in (4, 16):
            raise UserError(f"the checkpoint writer packs 4-bit weights (or keeps 16-bit); --w-bits {self.w_bits} "
                            f"can be evaluated without --out")

    @property
    def resolved_format(self) -> str:
        """W4A16 → compressed-tensors pack-quantized (runtimes load it); anything with online parts → our own."""
        if self.format != "auto":
            return self.format
        return "pack-quantized" if self.a_bits >= 16 and self.kv_bits >= 16 and self.w_bits < 16 else "streamquant"

    @property
    def weight_cfg(self) -> WeightQuantConfig | None:
        return None if self.w_bits >= 16 else WeightQuantConfig(self.w_bits, self.group_size, self.w_symmetric,
                                                                mse_clip=self.w_clip)


class Hooks:
    """Forward pre-hooks that copy a sampled subset of a module's input rows into a host buffer."""

    def __init__(self):
        self.handles: list = []

    def sample(self, module: nn.Module, rows: torch.Tensor, out: torch.Tensor, transform=None) -> None:
        """rows: sorted flat token indices over the whole calibration buffer; filled in micro-batch order."""
        state = {"offset": 0, "filled": 0}

        def hook(mod, args):
            x = args[0]
            x = x if transform is None else transform(mod, x)
            flat = x.reshape(-1, x.shape[-1])
            lo, hi = state["offset"], state["offset"] + flat.shape[0]
            start = int(torch.searchsorted(rows, lo))
            stop = int(torch.searchsorted(rows, hi))
            if stop > start:
                out[state["filled"]: state["filled"] + stop - start] = flat[rows[start:stop] - lo].to(out.dtype).cpu()
            state["offset"], state["filled"] = hi, state["filled"] + stop - start

        self.handles.append(module.register_forward_pre_hook(hook))

    def each_input(self, module: nn.Module, fn: Callable[[torch.Tensor], None], transform=None) -> None:
        def hook(mod, args):
            fn(args[0] if transform is None else transform(mod, args[0]))

        self.handles.append(module.register_forward_pre_hook(hook))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _token_subset(total: int, count: int, gen: torch.Generator) -> torch.Tensor:
    count = min(total, count)
    return torch.randperm(total, generator=gen)[:count].sort().values


@dataclass
class Stats:
    device: torch.device = torch.device("cpu")
    seconds: dict[str, float] = field(default_factory=dict)
    peaks: dict[str, dict[str, int]] = field(default_factory=dict)
    r1: dict = field(default_factory=dict)
    r2: list[dict] = field(default_factory=list)
    gptq_loss: list[dict] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    blocks: list[dict] = field(default_factory=list)     # per block: seconds by stage, I/O and how much was hidden
    block: dict | None = None

    def time(self, stage: str, t0: float) -> None:
        """Add the stage's seconds and its peaks: host RSS high-water mark so far, GPU allocated since the last stage."""
        seconds = time.perf_counter() - t0
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
        if self.block is not None:
            self.block[stage] = self.block.get(stage, 0.0) + seconds
        peak = self.peaks.setdefault(stage, {"host_bytes": 0, "gpu_bytes": 0, "gpu_reserved_bytes": 0})
        peak["host_bytes"] = max(peak["host_bytes"], peak_host_bytes())
        peak["gpu_bytes"] = max(peak["gpu_bytes"], peak_gpu_bytes(self.device))
        peak["gpu_reserved_bytes"] = max(peak["gpu_reserved_bytes"], peak_gpu_reserved_bytes(self.device))
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        release_host_memory()  # what this stage freed goes back to the OS before the next stage allocates


class Pipeline:
    """One quantization run. `run()` wires the stages; each stage method states its inputs and outputs."""

    def __init__(self, cfg: RunConfig, on_progress: Callable[[str, int, int], None] | None = None, sink=None):
        cfg.check()
        self.cfg = cfg
        self.progress = on_progress or (lambda stage, done, total: None)
        self.sink = sink                      # writer: receives rotations, finished blocks, head, report
        self.model_dir = resolve_model(cfg.model)
        self.spec: ModelSpec = read_spec(self.model_dir)
        if cfg.weight_cfg is not None:
            self._check_groups(cfg.weight_cfg)   # before any work, not at block 0 after capture and R1
        self.index = ShardIndex(self.model_dir, self.spec)
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        return_freed_memory_to_os()
        self.tokenizer = load_tokenizer(self.model_dir)
        layer_class(self.spec.model_type)   # the baseline RSS includes tokenizer, model code and device runtime
        warm_up(self.device)
        work = self.workload()
        self.plan = fit_micro_batch(self.spec, self.index, work, self.dtype, self.device.type, cfg.gpu_mem,
                                    current_host_bytes(), cfg.micro_batch)
        free = free_gpu_bytes(self.device)
        if cfg.gpu_mem is None and free is not None and self.plan.peak_gpu_bytes > free:
            # no budget given, and the default micro-batch would not fit the GPU: fit it to what is free (and refuse
            # now, with the minimum, when even one sample per micro-batch does not fit, instead of an OOM hours in)
            self.plan = fit_micro_batch(self.spec, self.index, work, self.dtype, self.device.type, free,
                                        current_host_bytes(), cfg.micro_batch, budget_name="the GPU's free memory,")
        check_room(self.plan, cfg.out, copied_files_bytes(self.model_dir))
        if cfg.gpu_mem is not None:
            cap_gpu_memory(self.device, cfg.gpu_mem)
        self.engine = Engine(self.spec, self.device, self.dtype, self.plan.micro_batch, pin=pin_host_memory(self.device))
        rotated = cfg.method != "none"
        self.format = cfg.resolved_format
        online = self.format == "streamquant"   # pack-quantized runtimes apply no online transform: R1/R2 only
        self.runtime = Runtime(
            r3_seed=cfg.seed + 3 if rotated and online and cfg.kv_bits < 16 else None,  # R3 matters for KV quant only
            r4_seed=cfg.seed + 4 if rotated and online else None,
            act=ActQuantConfig(bits=cfg.a_bits, clip_ratio=cfg.a_clip),
            kv_bits=cfg.kv_bits,
        )
        self.stats = Stats(device=self.device)

    def workload(self) -> Workload:
        cfg = self.cfg
        # calibration text is tokenized a piece at a time, evaluation text whole (its ids must match others')
        calib_bytes = text_bytes(cfg.calib)
        texts = [min(calib_bytes, CALIB_PIECE_CHARS)] + ([text_bytes(cfg.eval)] if cfg.eval else [])
        windows = 0
        if cfg.eval:  # all windows unless limited: estimated from the text size (~3.5 bytes per token) before tokenizing
            windows = cfg.eval_windows or int(texts[-1] / BYTES_PER_TOKEN // cfg.seqlen)
        return Workload(samples=cfg.samples, seqlen=cfg.seqlen, eval_windows=windows, method=cfg.method,
                        weights=cfg.weights, w_bits=cfg.w_bits, a_bits=cfg.a_bits,
                        r1_reservoir_bytes=cfg.r1_reservoir_bytes, r2_tokens=cfg.r2_tokens, write=cfg.out is not None,
                        text_bytes=max(texts), held_text_bytes=int(calib_bytes * (1 + 8 / BYTES_PER_TOKEN)),
                        group_size=cfg.group_size, w_asym=not cfg.w_symmetric)

    def generator(self, purpose: int, layer: int) -> torch.Generator:
        """One generator per (purpose, layer): a resumed run draws exactly what an uninterrupted one drew."""
        return torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + purpose * 10_007 + layer)

    # ---- data ----
    def load_data(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        tok = self.tokenizer
        calib = calibration_windows(tokenize_in_pieces(tok, read_text(self.cfg.calib)), self.cfg.seqlen,
                                    self.cfg.samples, self.cfg.seed)
        evals = None
        if self.cfg.eval:
            evals = eval_windows(tokenize(tok, read_text(self.cfg.eval)), self.cfg.seqlen, self.cfg.eval_windows)
        return calib, evals

    # ---- stage 1: capture ----
    def capture(self, calib: torch.Tensor) -> torch.Tensor:
        """Full-precision pass; returns a reservoir [rows, hidden] of normalised block inputs (attention and MLP
        sides), sampled uniformly over layers and tokens within the --r1-reservoir byte budget."""
        spec, engine = self.spec, self.engine
        total = calib.numel()
        per_side = max(1, self.cfg.r1_reservoir_bytes // (4 * spec.hidden_size) // (2 * spec.num_layers))
        per_side = min(per_side, total)
        reservoir = torch.empty(2 * spec.num_layers * per_side, spec.hidden_size, dtype=torch.float32)
        reservoir = reservoir.pin_memory() if engine.pin else reservoir
        hidden = engine.embed(self.index.load_embedding(), calib)
        plain = Runtime()
        with BlockPrefetcher(self.index, pin=engine.pin) as prefetch:
            for i in range(spec.num_layers):
                weights = prefetch.get(i)
                prefetch.prefetch(i + 1)
                plain_weights = rotate_block(weights, spec, None, None, None, engine.device)  # norms fused only
                layer = build_rotated_layer(engine, i, plain_weights, plain)
                del weights, plain_weights
                hooks = Hooks()
                for side, module in enumerate((layer.self_attn.q_proj, layer.mlp.up_proj)):
                    start = (2 * i + side) * per_side
                    hooks.sample(module, _token_subset(total, per_side, self.generator(side, i)),
                                 reservoir[start: start + per_side])
                engine.run_block(layer, hidden)
                hooks.remove()
                del layer
                release_host_memory()
                self.progress("capture", i + 1, spec.num_layers)
        return reservoir

    # ---- stage 2: R1 ----
    def calibrate_r1(self, reservoir: torch.Tensor | None) -> torch.Tensor | None:
        n = self.spec.hidden_size
        if self.cfg.method == "none":
            return None
        if self.cfg.method == "quarot":
            return random_hadamard_matrix(n, self.cfg.seed)
        result = train_r1(reservoir, n, replace(self.cfg.r1_train, seed=self.cfg.seed), self.cfg.seed,
                          device=self.device, log=self.stats.log.append)
        self.stats.r1 = {"init_loss": result.init_loss, "final_loss": result.final_loss, "steps": result.steps,
                         "loss_per_epoch": result.loss_history, "seconds": result.seconds}
        return result.rotation

    # ---- stage 3, per block ----
    def calibrate_r2(self, i: int, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor | None:
        """R2 per KV head from this block's o_proj inputs (one pass over the calibration buffer)."""
        spec, cfg = self.spec, self.cfg
        if cfg.method == "none":
            return None
        seed = cfg.seed + 1000 * (i + 1)
        if cfg.method == "quarot":
            return torch.stack([random_hadamard_matrix(spec.head_dim, seed + g) for g in range(spec.num_kv_heads)])
        rows = _token_subset(hidden.shape[0] * hidden.shape[1], cfg.r2_tokens, self.generator(2, i))
        samples = torch.empty(rows.numel(), spec.num_heads * spec.head_dim, dtype=torch.float32)
        hooks = Hooks()
        hooks.sample(layer.self_attn.o_proj, rows, samples)
        self._forward_only(layer, hidden)
        hooks.remove()
        results = train_r2(samples, spec.num_kv_heads, spec.head_dim, spec.heads_per_group,
                           replace(cfg.r2_train, seed=seed), seed, device=self.device)
        self.stats.r2.append({"layer": i, "init_loss": sum(r.init_loss for r in results),
                              "final_loss": sum(r.final_loss for r in results)})
        return torch.stack([r.rotation for r in results])

    def quantize_block(self, i: int, layer: nn.Module, hidden: torch.Tensor) -> None:
        """Weights to the INT grid in place: RTN, or GPTQ group by group in dependency order."""
        wcfg = self.cfg.weight_cfg
        if wcfg is None:
            return
        if self.cfg.weights == "rtn":
            quantize_layer_rtn(layer, wcfg)
            return
        linears = qlinears(layer)
        for group in GPTQ_ORDER:
            # the linears of a group read the same input, so they share one Hessian (q/k/v: 3× less memory)
            gptq = GPTQ(linears[group[0]].in_features, device=self.device)
            hooks = Hooks()
            hooks.each_input(linears[group[0]], gptq.add_batch, transform=QLinear.quantized_input)
            self._forward_only(layer, hidden)
            hooks.remove()
            for k, name in enumerate(group):
                result = gptq.quantize(linears[name].weight.data, wcfg, act_order=self.cfg.act_order,
                                       damp=self.cfg.damp, free_hessian=k == len(group) - 1)
                linears[name].weight.data = result.weight.to(linears[name].weight.dtype)
                linears[name].codes = (result.q, result.scale, result.zero)
                self.stats.gptq_loss.append({"layer": i, "linear": name, "loss": float(result.loss)})
            del gptq

    def _check_groups(self, wcfg: WeightQuantConfig) -> None:
        if wcfg.group_size == -1:
            return
        dims = {"hidden_size": self.spec.hidden_size, "num_heads*head_dim": self.spec.num_heads * self.spec.head_dim,
                "intermediate_size": self.spec.intermediate_size}
        bad = [f"{k}={v}" for k, v in dims.items() if v % wcfg.group_size]
        if bad:
            raise UserError(f"--group-size {wcfg.group_size} does not divide the input dimension of every linear "
                            f"({', '.join(bad)}); choose a divisor or -1 (per channel)")

    def _forward_only(self, layer: nn.Module, hidden: torch.Tensor) -> None:
        """Run the block for its hooks' sake, leaving the hidden states untouched."""
        for sl in self.engine.micro_batches(hidden.shape[0]):
            scratch = hidden[sl].clone()
            self.engine.run_block(layer, scratch)

    def predicted_vs_measured(self) -> dict[str, dict[str, int]]:
        """The planner's stage peaks beside the measured ones (the quantize pass's sub-stages count as 'quantize')."""
        measured_as = {"load": ["load"], "capture": ["capture"], "head": ["head"], "r1": ["r1"], "embed": ["embed"], "eval": ["eval"],
                       "quantize": ["replay", "rotate", "r2", "quantize", "forward", "write"]}
        out = {}
        for stage, pred in self.plan.stages.items():
            seen = [self.stats.peaks[s] for s in measured_as[stage] if s in self.stats.peaks]
            out[stage] = {"predicted_gpu_bytes": pred["gpu_bytes"], "predicted_host_bytes": pred["host_bytes"],
                          "measured_gpu_bytes": max((p["gpu_bytes"] for p in seen), default=0),
                          "measured_host_bytes": max((p["host_bytes"] for p in seen), default=0)}
        return out

    # ---- the run ----
    @full_fp32_matmuls()   # Hessians, QR, the Whip loss and rotations in true fp32 even if the caller enabled TF32
    def run(self) -> dict:
        spec, engine, stats, cfg = self.spec, self.engine, self.stats, self.cfg
        start = time.perf_counter()
        t0 = time.perf_counter()
        calib, evals = self.load_data()   # before the output exists: bad data leaves no directory behind
        stats.time("load", t0)
        r1, done = self.sink.begin(self) if self.sink is not None else (None, 0)

        if r1 is None:  # a resumed run reuses the saved R1 (and skips the capture pass that fed it)
            t0 = time.perf_counter()
            reservoir = self.capture(calib) if cfg.method == "dart" else None
            stats.time("capture", t0)

            t0 = time.perf_counter()
            r1 = self.calibrate_r1(reservoir)
            del reservoir
            stats.time("r1", t0)
            if self.sink is not None:
                self.sink.write_r1(r1)

        t0 = time.perf_counter()
        table = self.index.load_embedding()
        table = table if r1 is None else fuse_embedding(table, r1)
        hidden = engine.embed(table, calib)
        eval_hidden = engine.embed(table, evals) if evals is not None else None
        if self.sink is not None:
            self.sink.write_embedding(table)
        del table
        stats.time("embed", t0)

        t0 = time.perf_counter()
        for i in range(done):  # resume: finished blocks are replayed from their *quantized* weights on disk
            layer = build_rotated_layer(engine, i, self.sink.block_weights(i), self.runtime)
            engine.run_block(layer, hidden)
            if eval_hidden is not None:
                engine.run_block(layer, eval_hidden)
            del layer
            release_host_memory()
            self.progress("replay", i + 1, done)
        stats.time("replay", t0)

        with BlockPrefetcher(self.index, pin=engine.pin) as prefetch:
            for i in range(done, spec.num_layers):
                stats.block = {"block": i}
                t0 = time.perf_counter()
                original = prefetch.get(i)
                prefetch.prefetch(i + 1)
                r2 = None
                if cfg.method != "none":  # R2 is learned on this block's o_proj inputs with R1 (and R4) in place
                    probe = build_rotated_layer(
                        engine, i, rotate_block(original, spec, r1, None, self.runtime.r4_seed, engine.device),
                        self.runtime)
                    stats.time("rotate", t0)
                    t0 = time.perf_counter()
                    r2 = self.calibrate_r2(i, probe, hidden)
                    del probe
                    stats.time("r2", t0)
                    t0 = time.perf_counter()
                # all rotations, one rounding
                weights = rotate_block(original, spec, r1, r2, self.runtime.r4_seed, engine.device)
                del original
                stats.time("rotate", t0)

                t0 = time.perf_counter()
                layer = build_rotated_layer(engine, i, weights, self.runtime)
                del weights
                self.quantize_block(i, layer, hidden)
                stats.time("quantize", t0)

                t0 = time.perf_counter()
                engine.run_block(layer, hidden)
                if eval_hidden is not None:
                    engine.run_block(layer, eval_hidden)
                stats.time("forward", t0)

                t0 = time.perf_counter()
                if self.sink is not None:
                    self.sink.write_block(i, layer, r2, cfg.weight_cfg)
                stats.time("write", t0)
                del layer
                release_host_memory()
                io, wait = prefetch.io_seconds.get(i, 0.0), prefetch.wait_seconds.get(i, 0.0)
                # The wait can exceed the read itself (thread hand-off on a busy machine): clamp to [0, 1].
                hidden_share = max(0.0, 1.0 - wait / io) if io > 0 else 1.0
                compute = sum(stats.block.get(k, 0.0) for k in ("rotate", "r2", "quantize", "forward"))
                stats.block |= {"compute": compute, "io": io, "io_wait": wait, "io_hidden": hidden_share}
                stats.blocks.append(stats.block)
                stats.block = None
                self.progress("quantize", i + 1, spec.num_layers)

        t0 = time.perf_counter()
        norm_w, head_w = self.index.load_head()
        if r1 is not None:
            norm_w, head_w = fuse_head(norm_w, head_w, r1)
        stats.time("head", t0)
        result = {
            "model": str(self.model_dir), "method": cfg.method, "weights": cfg.weights, "w_bits": cfg.w_bits,
            "a_bits": cfg.a_bits, "kv_bits": cfg.kv_bits, "group_size": cfg.group_size, "samples": cfg.samples,
            "seqlen": cfg.seqlen, "seed": cfg.seed, "device": str(self.device), "format": self.format,
            "dtype": str(self.dtype).removeprefix("torch."), "micro_batch": engine.micro_batch,
        }
        if eval_hidden is not None:
            t0 = time.perf_counter()
            nll = engine.head_nll(norm_w, head_w, eval_hidden, evals, spec.rms_norm_eps)
            result |= {"ppl": math.exp(float(nll.mean())), "eval_windows": int(evals.shape[0])}
            stats.time("eval", t0)
        result |= {"plan": self.plan.to_json(), "memory": self.predicted_vs_measured(),
                   "stage_seconds": dict(stats.seconds), "stage_peaks": stats.peaks, "blocks": stats.blocks, "seconds": time.perf_counter() - start,
                   "peak_host_bytes": peak_host_bytes(), "peak_gpu_bytes": peak_gpu_bytes(self.device),
                   "r1": stats.r1, "r2": stats.r2}
        if self.sink is not None:
            self.sink.finish(self, norm_w, head_w, result)
        return result


def run(cfg: RunConfig, on_progress=None, sink=None) -> dict:
    return Pipeline(cfg, on_progress, sink).run()
