"""DartQuant on a stream of blocks, read top to bottom like the paper:

    capture  →  calibrate R1  →  per block: rotate (σ, R1, R4) → calibrate R2 → quantize (RTN | GPTQ) → write
                                                                  → run the quantized block → next block's inputs

Only one block's weights (plus the prefetched one) exist at any time. Calibration hidden states and the evaluation
hidden states travel through the *quantized* blocks, so the next block is calibrated on what the real quantized
model feeds it and the run can end with the quantized model's perplexity without reloading anything. With one-pass
GPTQ (`--hessians one-pass`) the calibration states travel through the *unquantized* blocks instead: one pass per
block fills every GPTQ group's Hessian and moves them on, where sequential GPTQ runs a pass per group and the
quantized block again (~2.2 block forwards). With `--asym-calib --asym-targets model` (sequential GPTQ) a third
stream, the full-precision model's states, travels through the *unquantized* blocks beside them (GPTAQ): GPTQ then
reproduces each linear's output in the unquantized model from the input the quantized model gives it.
Everything decided before the work (model, plan, format, runtime) arrives in a `Prepared` (streamquant.preflight);
finished blocks leave as `QuantizedBlock` values for the sink (streamquant.writer).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Callable, Iterator

import torch
from torch import nn

from streamquant.data import calibration_windows, eval_windows_of_text, read_text, tokenize_in_pieces
from streamquant.device import full_fp32_matmuls, pin_host_memory
from streamquant.errors import Stopped
from streamquant.kernels.hadamard import random_hadamard_matrix
from streamquant.memory import peak_gpu_bytes, peak_gpu_reserved_bytes, peak_host_bytes, release_host_memory
from streamquant.plan import capture_windows, reservoir_rows
from streamquant.preflight import Prepared
from streamquant.qblock import QLinear, Runtime, activations_unquantized, qlinears
from streamquant.quant.quantizers import ActQuantConfig
from streamquant.quant.gptq import GPTQ
from streamquant.quantized import Codes, QuantizedBlock
from streamquant.rotate.dart import train_r1, train_r2
from streamquant.rotate.fuse import fuse_embedding, fuse_head, r2_gram
from streamquant.rotate.model import build_rotated_layer, quantize_layer_rtn, rotate_block
from streamquant.shards import BlockPrefetcher
from streamquant.stream import Engine


# GPTQ needs a Hessian estimated from enough input rows; a MoE expert's group that saw fewer (it reads only the
# tokens routed to it, possibly none) is rounded to nearest instead, and report.json lists it per block under
# "rtn_fallback" with its token count ("gptq_tokens" has every group's).
GPTQ_MIN_TOKENS = 32

# --asym-calib's step toward the targets (GPTQ.quantize's target_step, GPTAQ's α). The full-precision model's
# targets (--asym-targets model): a quarter of the least-squares step, as GPTAQ's reference; SmolLM2-135M W4A16 dart
# seed 0 measured 30.43 with the whole step, 29.59 with half, 29.20 with a quarter, 29.81 with an eighth and 29.60
# without targets (benchmarks/RESULTS.md, issue 17). The inputs before the activation quantizer (--asym-targets
# input): the whole step (W4A4 seed 0: 37.57 against 40.87 with a quarter).
FP_STREAM_STEP = 0.25
INPUT_TARGET_STEP = 1.0


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


def _add_pair(gptq: GPTQ, pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    gptq.add_batch(*pair)


def _add_reference_pair(gptq: GPTQ, pending: list[torch.Tensor], x: torch.Tensor) -> None:
    gptq.add_batch(x, pending.pop())   # the reference ran this micro-batch just before (Engine.run_until's beside)


@dataclass
class Reference:
    """The full-precision model beside the quantized one (--asym-targets model): its calibration states
    at the current block's input, and while a block is quantized that block unquantized, without activation or KV
    quantizers (the online transforms stay: they are part of the rotated model's function)."""

    hidden: torch.Tensor
    layer: nn.Module | None = None
    to_move: bool = False      # `hidden` still has to become the current block's output (not after the last block)


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
    blocks: list[dict] = field(default_factory=list)     # per block: seconds by stage, I/O and how much was hidden
    block: dict | None = None
    on_stage: Callable[[str, float | None], None] | None = None   # (name, None) at start, (name, seconds) at end

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the enclosed work as `name` and record its peaks: host RSS high-water mark so far, GPU allocated
        since the last stage; then, outside a block, hand what it freed back to the OS before the next stage
        allocates."""
        if self.on_stage is not None:
            self.on_stage(name, None)
        t0 = time.perf_counter()
        yield
        seconds = time.perf_counter() - t0
        if self.on_stage is not None:
            self.on_stage(name, seconds)
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        if self.block is not None:
            self.block[name] = self.block.get(name, 0.0) + seconds
        peak = self.peaks.setdefault(name, {"host_bytes": 0, "gpu_bytes": 0, "gpu_reserved_bytes": 0})
        peak["host_bytes"] = max(peak["host_bytes"], peak_host_bytes())
        peak["gpu_bytes"] = max(peak["gpu_bytes"], peak_gpu_bytes(self.device))
        peak["gpu_reserved_bytes"] = max(peak["gpu_reserved_bytes"], peak_gpu_reserved_bytes(self.device))
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.block is None:   # a block's stages reuse each other's heap; the block's end trims it once
            release_host_memory()

    def end_block(self, prefetch: BlockPrefetcher, i: int, gptq_loss: dict[str, float]) -> None:
        """Close block i's record: compute seconds beside the shard read and the share of it hidden behind compute."""
        io, wait = prefetch.io_seconds.get(i, 0.0), prefetch.wait_seconds.get(i, 0.0)
        # The wait can exceed the read itself (thread hand-off on a busy machine): clamp to [0, 1].
        hidden_share = max(0.0, 1.0 - wait / io) if io > 0 else 1.0
        compute = sum(self.block.get(k, 0.0) for k in ("rotate", "r2", "quantize", "forward"))
        self.block |= {"compute": compute, "io": io, "io_wait": wait, "io_hidden": hidden_share}
        if gptq_loss:
            self.block["gptq_loss"] = gptq_loss
        self.blocks.append(self.block)
        self.block = None


class Pipeline:
    """One quantization run. `run()` is the loop of the module docstring; each stage method states its inputs and
    outputs."""

    def __init__(self, prepared: Prepared, on_progress: Callable[[str, int, int], None] | None = None, sink=None,
                 on_stage: Callable[[str, float | None], None] | None = None,
                 should_stop: Callable[[], bool] | None = None):
        self.prepared = prepared
        self.cfg, self.spec, self.index = prepared.cfg, prepared.spec, prepared.index
        self.arch, self.runtime, self.plan, self.device = prepared.spec.arch, prepared.runtime, prepared.plan, prepared.device
        self.progress = on_progress or (lambda stage, done, total: None)
        self.sink = sink                      # writer: receives rotations, finished blocks, head, report
        self.engine = Engine(self.spec, self.device, prepared.dtype, self.plan.micro_batch,
                             pin=pin_host_memory(self.device))
        self.stats = Stats(device=self.device, on_stage=on_stage)
        self.should_stop = should_stop or (lambda: False)   # polled between blocks (Ctrl-C stops at a safe point)
        self.dist = prepared.group   # torchrun ranks (streamquant.distributed); Solo, a no-op, for one process

    @full_fp32_matmuls()   # Hessians, QR, the Whip loss and rotations in true fp32 even if the caller enabled TF32
    def run(self) -> dict:
        start, stats = time.perf_counter(), self.stats
        with stats.stage("load"):
            calib, evals = self.load_data()   # before the output exists: bad data leaves no directory behind
            self.dist.agree(self.prepared.identity(), self.plan.micro_batch, calib, evals)
        r1, done = self.sink.begin(self.prepared.identity(), self.prepared.format) if self.sink else (None, 0)
        r1, done = self.dist.resume_state(r1, done)   # rank 0 alone writes, and reads back
        if r1 is None:  # a resumed run reuses the saved R1 (and skips the capture pass that fed it)
            reservoir = None
            if self.cfg.method == "dart":
                with stats.stage("capture"):
                    reservoir = self.capture(calib)
            with stats.stage("r1"):
                r1 = self.dist.same(self.calibrate_r1(reservoir))
                del reservoir
            if self.sink is not None:
                self.sink.write_r1(r1)
        with stats.stage("embed"):
            hidden, eval_hidden = self.embed(r1, self.dist.mine(calib), self.dist.mine(evals))
            reference = self.reference_stream(hidden)
        with stats.stage("replay"):
            self.replay(done, r1, hidden, eval_hidden, reference)
        self.quantize_blocks(r1, done, hidden, eval_hidden, reference)
        del reference
        with stats.stage("head"):
            norm_w, head_w = self.index.load_head()
            if r1 is not None:
                norm_w, head_w = fuse_head(norm_w, head_w, r1)
        return self.finish(norm_w, head_w, eval_hidden, evals, time.perf_counter() - start)

    def generator(self, purpose: int, layer: int) -> torch.Generator:
        """One generator per (purpose, layer): a resumed run draws exactly what an uninterrupted one drew."""
        return torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + purpose * 10_007 + layer)

    # ---- data ----
    def load_data(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Calibration windows (None when nothing needs data: RTN weights and no learned rotation) and evaluation
        windows (None without --eval)."""
        tok, cfg = self.prepared.tokenizer, self.cfg
        calib = evals = None
        if cfg.calibrates:
            calib = calibration_windows(tokenize_in_pieces(tok, read_text(cfg.calib)), cfg.seqlen, cfg.samples,
                                        cfg.seed)
        if cfg.eval:
            evals = eval_windows_of_text(tok, read_text(cfg.eval), cfg.seqlen, cfg.eval_windows)
        return calib, evals

    # ---- stage 1: capture ----
    def capture(self, calib: torch.Tensor) -> torch.Tensor:
        """Full-precision pass; returns a reservoir [rows, hidden] of normalised block inputs (one side per norm:
        attention and MLP), sampled uniformly over layers and tokens within the --r1-reservoir byte budget. It runs
        on the first of the (randomly drawn) calibration windows only, as many as filling the reservoir from a
        diverse set of tokens needs (plan.capture_windows)."""
        spec, engine, cfg = self.spec, self.engine, self.cfg
        sides = len(self.arch.capture_points)
        per_side = reservoir_rows(cfg.samples, cfg.seqlen, spec.hidden_size, spec.num_layers, sides,
                                  cfg.r1_reservoir_bytes)
        calib = calib[: capture_windows(cfg.samples, cfg.seqlen, per_side)]
        total = calib.numel()
        per_side = min(per_side, total)
        reservoir = torch.zeros(sides * spec.num_layers * per_side, spec.hidden_size, dtype=torch.float32)
        reservoir = reservoir.pin_memory() if engine.pin else reservoir
        mine = self.dist.shard(calib.shape[0])   # with several ranks, each captures its share of these windows
        lo, hi = mine.start * calib.shape[1], mine.stop * calib.shape[1]
        hidden = engine.embed(self.index.load_embedding(), calib[mine]) if hi > lo else None
        with BlockPrefetcher(self.index, pin=engine.pin) as prefetch:
            for i, weights in prefetch.blocks(spec.num_layers if hidden is None else 0):
                plain_weights = rotate_block(weights, spec, None, None, None, engine.device)  # norms fused only
                layer = build_rotated_layer(engine, i, plain_weights, Runtime())
                del weights, plain_weights
                hooks = Hooks()
                for side, name in enumerate(self.arch.capture_points):
                    start = (sides * i + side) * per_side
                    rows, part = self.dist.local_rows(_token_subset(total, per_side, self.generator(side, i)), lo, hi)
                    hooks.sample(layer.get_submodule(name), rows,
                                 reservoir[start: start + per_side][part])
                engine.run_block(layer, hidden)
                hooks.remove()
                del layer
                release_host_memory()
                self.progress("capture", i + 1, spec.num_layers)
        return self.dist.sum_(reservoir)   # every rank's rows in place: the reservoir one process would capture

    # ---- stage 2: R1 ----
    def calibrate_r1(self, reservoir: torch.Tensor | None) -> torch.Tensor | None:
        n = self.spec.hidden_size
        if self.cfg.method == "none":
            return None
        if self.cfg.method == "quarot":
            return random_hadamard_matrix(n, self.cfg.seed)
        result = train_r1(reservoir, n, replace(self.cfg.r1_train, seed=self.cfg.seed), self.cfg.seed,
                          device=self.device)
        self.stats.r1 = {"lr": self.cfg.r1_train.lr, "init_loss": result.init_loss, "final_loss": result.final_loss,
                         "steps": result.steps, "loss_per_epoch": result.loss_history, "seconds": result.seconds}
        return result.rotation

    def embed(self, r1: torch.Tensor | None, calib: torch.Tensor | None, evals: torch.Tensor | None
              ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The rotated embedding (written once) turns token ids into the first block's hidden states."""
        table = self.index.load_embedding()
        table = table if r1 is None else fuse_embedding(table, r1)
        hidden = self.engine.embed(table, calib) if calib is not None else None
        eval_hidden = self.engine.embed(table, evals) if evals is not None else None
        if self.sink is not None:
            self.sink.write_embedding(table)
        return hidden, eval_hidden

    def reference_stream(self, hidden: torch.Tensor | None) -> Reference | None:
        """The full-precision stream's first states, a copy of the calibration states (`fp_stream` runs only)."""
        if not self.fp_stream or hidden is None:
            return None
        states = self.engine.new_buffer(hidden.shape[0], hidden.shape[1])
        return Reference(states.copy_(hidden))

    def replay(self, done: int, r1: torch.Tensor | None, hidden: torch.Tensor | None,
               eval_hidden: torch.Tensor | None, reference: Reference | None) -> None:
        """Resume: the finished blocks run again from their *quantized* weights on disk; under one-pass GPTQ the
        calibration states run through the unquantized block instead, rotated again with the saved R2 (or without R2,
        where the R2 probe was the pass: `folds_r2`), as they did; the full-precision stream, where there is one,
        runs through it too."""
        for i in range(done):
            weights = self.dist.from_rank0(self.sink.block_weights(i) if self.sink is not None else None)
            layer = build_rotated_layer(self.engine, i, weights, self.runtime)
            if reference is not None:   # the full-precision stream: the unquantized block, no act/KV quantizers
                self.engine.run_block(build_rotated_layer(self.engine, i, self.unquantized_weights(i, r1),
                                                          self.reference_runtime), reference.hidden)
            if self.one_pass and hidden is not None:
                with activations_unquantized(build_rotated_layer(self.engine, i, self.unquantized_weights(i, r1),
                                                                 self.runtime), self.calib_full) as unquantized:
                    self.engine.run_block(unquantized, hidden)
                del unquantized
            for states in (None if self.one_pass else hidden, eval_hidden):
                if states is not None:
                    with activations_unquantized(layer, self.calib_full and states is hidden):
                        self.engine.run_block(layer, states)
            del layer
            release_host_memory()
            self.progress("replay", i + 1, done)

    def unquantized_weights(self, i: int, r1: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Finished block i's weights before quantization, as its run fused them: with the saved R2, or without R2
        where the R2 probe was the pass (`folds_r2`)."""
        original = self.index.load_block(i)
        if self.folds_r2:
            return self.probe_weights(original, r1)
        saved_r2 = self.dist.same(self.sink.block_r2(i) if self.sink is not None else None)
        return self.rotated_weights(original, r1, saved_r2)

    # ---- stage 3, per block ----
    def quantize_blocks(self, r1: torch.Tensor | None, done: int, hidden: torch.Tensor | None,
                        eval_hidden: torch.Tensor | None, reference: Reference | None) -> None:
        """Per block: rotate → R2 → quantize → run the quantized block on every sample → write."""
        stats, engine, wcfg = self.stats, self.engine, self.cfg.weight_cfg
        with BlockPrefetcher(self.index, pin=engine.pin) as prefetch:
            for i, original in prefetch.blocks(done):
                if self.dist.any(self.should_stop()):  # blocks < i are written and in the manifest: resumable
                    raise Stopped(i, self.spec.num_layers)
                stats.block = {"block": i, "forward_equivalents": 0.0}
                weights, r2, early = self.rotate(i, original, r1, hidden)
                del original
                last = i + 1 == self.spec.num_layers
                with stats.stage("quantize"):
                    layer = build_rotated_layer(engine, i, weights, self.runtime)
                    if reference is not None:   # the same tensors: GPTQ gives `layer` new weights, these stay
                        reference.layer = build_rotated_layer(engine, i, weights, self.reference_runtime)
                        reference.to_move = not last
                    del weights
                    with activations_unquantized(layer, self.calib_full):
                        if self.one_pass and not self.folds_r2:   # every Hessian from one pass of the unquantized
                            early |= self.one_pass_hessians(layer, hidden, early, last)   # block, which feeds the next
                        codes, losses = self.quantize_block(layer, hidden, early, reference)
                with stats.stage("forward"):
                    # the calibration states feed the next block's Hessians: after the last block nothing reads them,
                    # and one-pass GPTQ has moved them on already
                    calib_states = hidden if not (last or self.one_pass) else None
                    for states in (calib_states, eval_hidden):
                        if states is not None:
                            with activations_unquantized(layer, self.calib_full and states is calib_states):
                                engine.run_block(layer, states)
                    stats.block["forward_equivalents"] += 1.0 if calib_states is not None else 0.0
                    if reference is not None:
                        if reference.to_move:   # (the block's last Hessian pass did not move them on)
                            engine.run_block(reference.layer, reference.hidden)
                            stats.block["forward_equivalents"] += 1.0
                        reference.layer, reference.to_move = None, False
                with stats.stage("write"):
                    if self.sink is not None:
                        self.sink.write_block(QuantizedBlock.from_layer(i, layer, self.arch, codes, wcfg, r2))
                del layer
                release_host_memory()
                stats.end_block(prefetch, i, losses)
                self.progress("quantize", i + 1, self.spec.num_layers)

    def rotate(self, i: int, original: dict[str, torch.Tensor], r1: torch.Tensor | None, hidden: torch.Tensor | None
               ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, dict[int, GPTQ]]:
        """All rotations fused with one rounding. A learned R2 comes first, from a probe with R1 (and R4) in place;
        that pass also collects the Hessians of the GPTQ groups whose inputs R2 cannot change (all of them, and it
        moves the calibration states on, when R2 is folded into the one-pass pass: see `folds_r2`)."""
        if self.cfg.method != "dart":
            r2 = None
            if self.cfg.method == "quarot":
                seed = self.cfg.seed + 1000 * (i + 1)
                r2 = torch.stack([random_hadamard_matrix(self.spec.head_dim, seed + g)
                                  for g in range(self.spec.num_kv_heads)])
            with self.stats.stage("rotate"):
                return self.rotated_weights(original, r1, r2), r2, {}
        with self.stats.stage("rotate"):
            probe_weights = self.probe_weights(original, r1)
            probe = build_rotated_layer(self.engine, i, probe_weights, self.runtime)
        with activations_unquantized(probe, self.calib_full):
            r2, early = self.calibrate_r2(i, probe, hidden)
        del probe
        with self.stats.stage("rotate"):   # R2 turns only the linears it sits on; the others are the probe's
            weights = probe_weights | rotate_block(original, self.spec, r1, r2, self.runtime.r4_seed,
                                                   self.engine.device,
                                                   linears=(self.arch.r2_value, self.arch.r2_output),
                                                   o_seed=self.runtime.o_seed)
        return weights, r2, early

    def probe_weights(self, original: dict[str, torch.Tensor], r1: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The block R2 is learned on: σ, R1 and R4 (and o_proj's online Hadamard) fused, no R2 yet."""
        return rotate_block(original, self.spec, r1, None, self.runtime.r4_seed, self.engine.device,
                            o_seed=self.runtime.o_seed)

    def rotated_weights(self, original: dict[str, torch.Tensor], r1: torch.Tensor | None,
                        r2: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """A block's weights with σ, R1, R2 and R4 (and o_proj's online Hadamard) fused."""
        if self.cfg.method == "none":
            # the plain model, the baseline: σ stays in the norms (fused, it would be rounded with the weights it
            # scales: RTN g64 on SmolLM2 measured 54.4 PPL fused, 39.2 plain)
            return original
        return rotate_block(original, self.spec, r1, r2, self.runtime.r4_seed, self.engine.device,
                            o_seed=self.runtime.o_seed)

    def calibrate_r2(self, i: int, layer: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, dict[int, GPTQ]]:
        """R2 per KV head from this block's o_proj inputs. The pass that samples them stops at o_proj and, with GPTQ,
        feeds the Hessians of the groups that read the block input (q/k/v: R2 only acts on v's output); folded into
        the one-pass pass (`folds_r2`) it runs the whole block instead, fills every Hessian and moves the calibration
        states on, and o_proj's Hessian then takes R2 (`r2_gram`)."""
        spec, cfg, arch, fold = self.spec, self.cfg, self.arch, self.folds_r2
        seed = cfg.seed + 1000 * (i + 1)
        with self.stats.stage("quantize" if fold else "r2"):   # the folded pass is the one-pass Hessian pass
            windows = self.dist.shard(cfg.samples)   # this rank's windows of the calibration set (all, alone)
            rows = _token_subset(cfg.samples * hidden.shape[1], cfg.r2_tokens, self.generator(2, i))
            samples = torch.zeros(rows.numel(), spec.num_heads * spec.head_dim, dtype=torch.float32)
            local, part = self.dist.local_rows(rows, windows.start * hidden.shape[1], windows.stop * hidden.shape[1])
            hooks = Hooks()
            hooks.sample(layer.get_submodule(arch.r2_output), local, samples[part])
            if fold:
                early = self.one_pass_hessians(layer, hidden, {}, i + 1 == spec.num_layers, hooks)
            else:
                names = arch.linear_names   # the groups whose first linear runs no later than v_proj
                # (not with the full-precision stream: its pairs come from a pass of both streams, stage_hessians)
                early = self.hessians(layer, hooks, [g for g, grp in enumerate(arch.gptq_order)
                                                     if names.index(grp[0]) <= names.index(arch.r2_value)]
                                      ) if cfg.weights == "gptq" and cfg.weight_cfg and not self.fp_stream else {}
                self.pass_until(layer, hidden, arch.r2_output)
            hooks.remove()
        with self.stats.stage("r2"):
            results = train_r2(self.dist.sum_(samples), spec.num_kv_heads, spec.head_dim, spec.heads_per_group,
                               replace(cfg.r2_train, seed=seed), seed, device=self.device)
            self.stats.r2.append({"layer": i, "init_loss": sum(r.init_loss for r in results),
                                  "final_loss": sum(r.final_loss for r in results)})
            r2 = self.dist.same(torch.stack([r.rotation for r in results]))
            if fold:
                o_proj = next(g for g, group in enumerate(arch.gptq_order) if arch.r2_output in group)
                early[o_proj].rotate_inputs(partial(r2_gram, r2=r2, spec=spec))
        return r2, early

    @property
    def folds_r2(self) -> bool:
        """dart with one-pass GPTQ and nothing quantized in the calibration passes (no activation or KV quantizer,
        or --calib-acts full): R2 then changes o_proj's inputs (x -> x R2 per head) and nothing after o_proj's
        output, so one pass of the block without R2 samples R2's rows, fills every Hessian (o_proj's turned by R2
        afterwards: Bᵀ S B) and moves the states on. The separate R2 probe pass is saved (~0.16 block forwards).
        Not with o_proj's online Hadamard H_o: that Hessian is then of x H_o, which Bᵀ S B does not turn into R2's."""
        act_free = self.calib_full or (self.runtime.act.bits >= 16 and self.runtime.kv_bits >= 16)
        return self.cfg.method == "dart" and self.one_pass and act_free and self.runtime.o_seed is None

    @property
    def calib_full(self) -> bool:
        """--calib-acts full: R2's rows, GPTQ's Hessians and the calibration states come from full-precision
        activations (QuaRot's GPTQ); only the evaluation states and the output quantize them."""
        return self.cfg.calib_acts == "full"

    @property
    def fp_stream(self) -> bool:
        """--asym-calib --asym-targets model (GPTAQ; sequential GPTQ): GPTQ's targets are the inputs the full-precision
        model gives each linear, from a second calibration stream through the unquantized blocks (`Reference`), so
        GPTQ also undoes the error the quantized blocks upstream left in its inputs. (--asym-targets input: the
        inputs before the activation quantizer, from the one stream.)"""
        return self.cfg.asym_calib and self.cfg.asym_targets == "model"

    @property
    def reference_runtime(self) -> Runtime:
        """The full-precision stream's online behaviour: the transforms, no activation or KV quantizer."""
        return replace(self.runtime, act=ActQuantConfig(), kv_bits=16)

    @property
    def one_pass(self) -> bool:
        """GPTQ Hessians from the unquantized model (--hessians one-pass): one forward per block instead of ~2.2."""
        return self.cfg.hessians == "one-pass" and self.cfg.weights == "gptq" and self.cfg.weight_cfg is not None

    def one_pass_hessians(self, layer: nn.Module, hidden: torch.Tensor, early: dict[int, GPTQ], last: bool,
                          hooks: Hooks | None = None) -> dict[int, GPTQ]:
        """The Hessians of every GPTQ group not in `early` from one pass of the block while its weights are still
        unquantized (beside whatever else `hooks` samples); the pass moves `hidden` on to the next block's inputs
        (the last block's stops at its last group's input). The next block is then calibrated on the unquantized
        model's states, as if every block before it were exact."""
        hooks = Hooks() if hooks is None else hooks
        groups = self.hessians(layer, hooks, [g for g in range(len(self.arch.gptq_order)) if g not in early])
        if last:   # (experts run in a loop where any may see no token: no early stop)
            self.pass_until(layer, hidden, None if self.arch.routed else self.arch.gptq_order[-1][0])
        else:
            self.engine.run_block(layer, hidden)
            self.stats.block["forward_equivalents"] += 1.0
        hooks.remove()
        return groups

    def hessians(self, layer: nn.Module, hooks: Hooks, groups: list[int], reference: Reference | None = None
                 ) -> dict[int, GPTQ]:
        """GPTQ accumulators hooked on the inputs of these GPTQ groups; each sees exactly what its linears' matmuls
        see (after R4 and the act quantizer), and with --asym-calib also a target input whose output GPTQ then
        reproduces: the full-precision model's (`reference`, hooked too: the pass must run it beside) or else the
        input before the act quantizer."""
        order = self.arch.gptq_order
        out = {}
        for g in groups:
            first = layer.get_submodule(order[g][0])
            # a routed expert sees other tokens in the full-precision model: no rows to pair, plain GPTQ
            targets = self.cfg.asym_calib and not (reference is not None and order[g][0] in self.arch.routed)
            out[g] = GPTQ(first.in_features, device=self.device, targets=targets)
            if targets and reference is not None:   # (quantized input, the full-precision model's input) pairs
                pending: list[torch.Tensor] = []
                hooks.each_input(reference.layer.get_submodule(order[g][0]), pending.append,
                                 transform=QLinear.quantized_input)
                hooks.each_input(first, partial(_add_reference_pair, out[g], pending),
                                 transform=QLinear.quantized_input)
            elif targets:   # (quantized input, input before the activation quantizer) pairs
                hooks.each_input(first, partial(_add_pair, out[g]), transform=QLinear.input_and_target)
            else:
                hooks.each_input(first, out[g].add_batch, transform=QLinear.quantized_input)
        return out

    def quantize_block(self, layer: nn.Module, hidden: torch.Tensor | None, early: dict[int, GPTQ],
                       reference: Reference | None) -> tuple[Codes | None, dict[str, float]]:
        """Weights to the INT grid in place (the layer then computes with them): RTN, or GPTQ group by group in
        dependency order, each group's Hessian from a pass stopped at its input (unless the R2 pass collected it).
        Returns the integer codes for the writer and GPTQ's loss per linear."""
        wcfg = self.cfg.weight_cfg
        if wcfg is None:
            return None, {}
        if self.cfg.weights == "rtn":
            return quantize_layer_rtn(layer, self.arch, wcfg), {}
        linears, codes, losses = qlinears(layer, self.arch), {}, {}
        for g, group in enumerate(self.arch.gptq_order):
            # the linears of a group read the same input, so they share one Hessian (q/k/v: 3× less memory)
            if g not in early:
                early |= self.stage_hessians(layer, hidden, g, early, reference)
            gptq = early.pop(g)
            self.dist.reduce_hessian(gptq)   # Σ x xᵀ and row counts of every rank's windows
            t0 = time.perf_counter()
            self.stats.block.setdefault("gptq_tokens", {})[group[0]] = gptq.n_samples   # per expert in a MoE block
            if group[0] in self.arch.routed and gptq.n_samples < GPTQ_MIN_TOKENS:   # an expert few tokens reached
                # (the count is summed over ranks, so every rank falls back alike; RTN needs no broadcast)
                self.stats.block.setdefault("rtn_fallback", {}).update({name: gptq.n_samples for name in group})
                codes |= quantize_layer_rtn(layer, self.arch, wcfg, names=group)
                del gptq
                continue
            weights = [linears[name].weight.data for name in group]
            stacked = torch.cat(weights) if len(weights) > 1 else weights[0]   # one scan for the shared H
            # with several ranks, one owner per group solves (round-robin) and broadcasts the result
            solve = partial(gptq.quantize, stacked, wcfg, act_order=self.cfg.act_order, damp=self.cfg.damp,
                            free_hessian=True,
                            target_step=FP_STREAM_STEP if reference is not None else INPUT_TARGET_STEP,
                            refit_rounds=self.cfg.refit_scales)
            result = self.dist.solve(len(self.arch.gptq_order) * self.stats.block["block"] + g, solve)
            del gptq, stacked, solve
            for name, part in zip(group, result.split([w.shape[0] for w in weights])):
                linears[name].weight.data = part.weight.to(linears[name].weight.dtype)
                codes[name] = (part.q, part.scale, part.zero)
                losses[name] = part.loss
            self.stats.block["gptq_solve"] = self.stats.block.get("gptq_solve", 0.0) + time.perf_counter() - t0
        return codes, losses

    def stage_hessians(self, layer: nn.Module, hidden: torch.Tensor, g: int, early: dict[int, GPTQ],
                       reference: Reference | None) -> dict[int, GPTQ]:
        """The Hessians of group g and of the later groups of its stage (a MoE block's experts: their inputs do not
        depend on each other's weights) from one pass: stopped at g's input for a group alone, whole for a stage of
        experts, where any expert may see no token. Each Hessian equals the one a pass of its own would fill."""
        stage = self.arch.gptq_stage
        groups = [g2 for g2 in range(g, len(stage)) if stage[g2] == stage[g] and g2 not in early]
        hooks = Hooks()
        out = self.hessians(layer, hooks, groups, reference)
        # the block's last pass runs the full-precision block whole, which moves its states on (saves a forward)
        move = reference is not None and reference.to_move and groups[-1] == len(stage) - 1
        self.pass_until(layer, hidden, self.arch.gptq_order[g][0] if len(groups) == 1 else None, reference, move)
        hooks.remove()
        return out

    def pass_until(self, layer: nn.Module, hidden: torch.Tensor, stop_at: str | None,
                   reference: Reference | None = None, move: bool = False) -> None:
        """One calibration pass for the hooks' sake, stopped at `stop_at`'s input (None: the whole block), with the
        full-precision block beside it micro-batch by micro-batch where there is a `reference` (`move`: that one
        runs whole and its states become its output); its work is counted in units of one full block forward over
        all calibration samples."""
        def stop(block: nn.Module) -> nn.Module | None:
            return None if stop_at is None else block.get_submodule(stop_at)

        beside = None if reference is None else (reference.layer, reference.hidden,
                                                 None if move else stop(reference.layer), move)
        self.engine.run_until(layer, hidden, stop(layer), beside=beside)
        share = 1.0 if stop_at is None else self.arch.share_before(stop_at, self.spec.dims())
        self.stats.block["forward_equivalents"] += share + (0 if reference is None else 1.0 if move else share)
        if move:
            reference.to_move = False

    # ---- finalize ----
    def finish(self, norm_w: torch.Tensor, head_w: torch.Tensor, eval_hidden: torch.Tensor | None,
               evals: torch.Tensor | None, seconds: float) -> dict:
        """Evaluate (when asked), assemble the report, and let the sink finalize the output."""
        cfg, stats, p = self.cfg, self.stats, self.prepared
        result = {
            "model": str(p.model_dir), "method": cfg.method, "weights": cfg.weights, "w_bits": cfg.w_bits,
            "a_bits": cfg.a_bits, "kv_bits": cfg.kv_bits, "group_size": cfg.group_size, "w_symmetric": cfg.w_symmetric,
            "act_order": cfg.act_order, "w_clip": cfg.w_clip, "hessians": cfg.hessians, "calib_acts": cfg.calib_acts,
            "asym_calib": cfg.asym_calib, "asym_targets": cfg.asym_targets, "refit_scales": cfg.refit_scales,
            "r4_online": cfg.r4_online, "samples": cfg.samples,
            "seqlen": cfg.seqlen, "seed": cfg.seed, "device": str(self.device), "format": p.format.name,
            "dtype": str(p.dtype).removeprefix("torch."), "micro_batch": self.engine.micro_batch,
        }
        if eval_hidden is not None:
            with stats.stage("eval"):
                nll = self.engine.head_nll(norm_w, head_w, eval_hidden, self.dist.mine(evals), self.spec.rms_norm_eps)
                nll = self.dist.assemble_windows(nll, evals.shape[0])
            result |= {"ppl": math.exp(float(nll.mean())), "eval_windows": int(evals.shape[0])}
        result |= {"plan": self.plan.to_json(), "memory": self.predicted_vs_measured(),
                   "stage_seconds": dict(stats.seconds), "stage_peaks": stats.peaks, "blocks": stats.blocks,
                   "seconds": seconds, "peak_host_bytes": peak_host_bytes(), "peak_gpu_bytes": peak_gpu_bytes(self.device),
                   "r1": stats.r1, "r2": stats.r2, **self.dist.report()}
        if self.sink is not None:
            self.sink.finish(norm_w, head_w, result, p.model_dir)
        return result

    def predicted_vs_measured(self) -> dict[str, dict[str, int]]:
        """The planner's stage peaks beside the measured ones (the quantize pass's sub-stages count as 'quantize')."""
        measured_as = {"load": ["load"], "capture": ["capture"], "head": ["head"], "r1": ["r1"], "embed": ["embed"],
                       "eval": ["eval"], "quantize": ["replay", "rotate", "r2", "quantize", "forward", "write"]}
        out = {}
        for stage, pred in self.plan.stages.items():
            seen = [self.stats.peaks[s] for s in measured_as[stage] if s in self.stats.peaks]
            out[stage] = {"predicted_gpu_bytes": pred["gpu_bytes"], "predicted_host_bytes": pred["host_bytes"],
                          "measured_gpu_bytes": max((p["gpu_bytes"] for p in seen), default=0),
                          "measured_host_bytes": max((p["host_bytes"] for p in seen), default=0)}
        return out
