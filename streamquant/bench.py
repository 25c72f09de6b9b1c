"""The 70B-shape proof (`streamquant bench`): the whole pipeline on blocks shaped like Llama-2-70B.

Writes a synthetic checkpoint with 70B block shapes and planted outlier channels (`streamquant.synthetic`), runs
capture → R1 → per block R2 → GPTQ → write in-process while a thread samples the RSS, and returns per-block seconds
by stage, peak GPU per stage, peak host RSS, the planner's prediction beside each measurement, and the extrapolation
to 80 blocks (host and GPU from the planner on an 80-block header-only copy; time = per-block seconds × 80).
`scale` divides every dimension so the same code runs on a CPU in minutes.
"""
from __future__ import annotations

import shutil
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import psutil

GIB = 1 << 30
BLOCK_STAGES = ("rotate", "r2", "quantize", "forward", "write")


class PeakRSS:
    """Samples this process's resident set size on a thread (the VmHWM high-water mark misses nothing, but
    cannot be reset; the sampler measures just the enclosed work)."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._proc = psutil.Process()

    def __enter__(self) -> "PeakRSS":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


@dataclass
class BenchConfig:
    scale: int = 1
    blocks: int = 4
    samples: int = 128
    seqlen: int = 2048
    gpu_mem: int | None = 23 * GIB
    device: str = "auto"
    dtype: str = "auto"
    weights: str = "gptq"
    hessians: str = "sequential"          # GPTQ: sequential (the w4a4 preset's) or one-pass
    w_clip: bool = False                  # the w4a4 preset's MSE clip search; off by default, so per-block seconds
                                          # compare with the entries before the preset took it (RESULTS.md)
    asym_calib: bool = False              # asymmetric GPTQ calibration; off by default, as w_clip
    asym_targets: str = "input"           # its targets: input (before the act quantizer) or model (a full-precision
                                          # stream)
    refit_scales: int = 0                 # GPTQ's least-squares scale refit, in this many rounds (0: off)
    r1_reservoir_bytes: int = 256 << 20   # R1 trains on this many bytes of sampled rows (QR steps scale with it)
    workdir: Path | None = None        # keep the synthetic checkpoint and output here (default: a temp dir, removed)


def seventy_b(cfg: BenchConfig, on_progress=None) -> dict:
    """Run the pipeline on a synthetic 70B-shaped checkpoint; measurements and planner predictions as one dict."""
    from streamquant.device import resolve_device, resolve_dtype
    from streamquant.errors import UserError
    from streamquant.pipeline import Pipeline
    from streamquant.preflight import RunConfig, prepare
    from streamquant.synthetic import scaled_shape, write_checkpoint
    from streamquant.writer import OutputWriter

    if cfg.scale < 1 or cfg.blocks < 1 or cfg.samples < 1 or cfg.seqlen < 2:
        raise UserError("--scale, --blocks and --samples must be at least 1 and --seqlen at least 2")
    device = resolve_device(cfg.device)
    resolve_dtype(cfg.dtype, device)
    work = Path(cfg.workdir) if cfg.workdir else Path(tempfile.mkdtemp(prefix="sq70b-"))
    model, out = work / "model", work / "out"
    try:
        run_cfg = RunConfig(model=str(model), out=out, method="dart", weights=cfg.weights, w_bits=4, a_bits=4,
                            hessians=cfg.hessians, w_clip=cfg.w_clip, asym_calib=cfg.asym_calib,
                            asym_targets=cfg.asym_targets, refit_scales=cfg.refit_scales,
                            samples=cfg.samples, seqlen=cfg.seqlen, dtype=cfg.dtype, device=cfg.device,
                            r1_reservoir_bytes=cfg.r1_reservoir_bytes,
                            gpu_mem=cfg.gpu_mem if device.type == "cuda" else None)
        run_cfg.check()  # bad options fail before minutes of checkpoint writing
        shape = scaled_shape(cfg.scale, cfg.blocks)
        t0 = time.perf_counter()
        write_checkpoint(model, shape)
        write_seconds = time.perf_counter() - t0
        shutil.rmtree(out, ignore_errors=True)
        with PeakRSS() as rss:
            report = Pipeline(prepare(run_cfg), on_progress, sink=OutputWriter(out)).run()

        # the same shape with 80 blocks, headers only (sparse), planned the way `run` plans
        full = write_checkpoint(work / "model80", scaled_shape(cfg.scale, 80), sparse=True)
        plan80 = prepare(replace(run_cfg, model=str(full)), plan_only=True).plan
    finally:
        if not cfg.workdir:
            shutil.rmtree(work, ignore_errors=True)

    per_block = [sum(v for k, v in b.items() if k in BLOCK_STAGES) for b in report["blocks"]]
    capture_per_block = report["stage_seconds"].get("capture", 0.0) / cfg.blocks
    measured_host = max(rss.peak, report["peak_host_bytes"])
    stage_gpu = {stage: {"allocated": p["gpu_bytes"], "reserved": p["gpu_reserved_bytes"]}
                 for stage, p in report["stage_peaks"].items()}
    return {
        "shape": shape, "scale": cfg.scale, "blocks": cfg.blocks, "samples": cfg.samples, "seqlen": cfg.seqlen,
        "device": report["device"], "dtype": report["dtype"], "micro_batch": report["micro_batch"],
        "weights": cfg.weights, "hessians": cfg.hessians, "w_clip": cfg.w_clip, "asym_calib": cfg.asym_calib, "asym_targets": cfg.asym_targets,
        "refit_scales": cfg.refit_scales,
        "gpu_budget_bytes": run_cfg.gpu_mem, "checkpoint_write_seconds": write_seconds,
        "stage_seconds": report["stage_seconds"], "per_block": report["blocks"],
        "per_block_seconds_median": statistics.median(per_block),
        "io_hidden_median": statistics.median(b["io_hidden"] for b in report["blocks"]),
        "stage_peak_gpu_bytes": stage_gpu, "memory": report["memory"],
        "peak_host_bytes": measured_host, "predicted_peak_host_bytes": report["plan"]["peak_host_bytes"],
        "host_prediction_error": (report["plan"]["peak_host_bytes"] - measured_host) / measured_host,
        "peak_gpu_bytes": max((p["gpu_reserved_bytes"] for p in report["stage_peaks"].values()), default=0),
        "predicted_peak_gpu_bytes": report["plan"]["peak_gpu_bytes"],
        "extrapolated_80_blocks": {
            "seconds": (capture_per_block + statistics.median(per_block)) * 80 + report["stage_seconds"].get("r1", 0.0),
            "predicted_peak_host_bytes": plan80.peak_host_bytes, "predicted_peak_gpu_bytes": plan80.peak_gpu_bytes,
            "micro_batch": plan80.micro_batch,
        },
    }


def markdown(result: dict) -> str:
    """The result as the table RESULTS.md keeps: predicted vs measured per stage, then the per-block breakdown."""
    rows = [f"| {stage} | {m['predicted_gpu_bytes'] / GIB:.2f} | {m['measured_gpu_bytes'] / GIB:.2f} | "
            f"{result['stage_peak_gpu_bytes'].get(stage, {}).get('reserved', 0) / GIB:.2f} | "
            f"{m['predicted_host_bytes'] / GIB:.2f} | {m['measured_host_bytes'] / GIB:.2f} |"
            for stage, m in result["memory"].items()]
    blocks = [f"| {b['block']} | " + " | ".join(f"{b.get(s, 0.0):.2f}" for s in BLOCK_STAGES) +
              f" | {b['io']:.2f} | {b['io_hidden']:.2f} |" for b in result["per_block"]]
    x = result["extrapolated_80_blocks"]
    return ("| stage | predicted GPU GiB | measured GPU GiB (allocated) | measured GPU GiB (reserved) | "
            "predicted host GiB | measured host GiB (RSS high-water) |\n|---|---|---|---|---|---|\n" + "\n".join(rows) +
            "\n\n| block | " + " | ".join(f"{s} s" for s in BLOCK_STAGES) + " | I/O s | I/O hidden |\n" +
            "|" + "---|" * (len(BLOCK_STAGES) + 3) + "\n" + "\n".join(blocks) +
            f"\n\nMicro-batch {result['micro_batch']}. Per block (median): {result['per_block_seconds_median']:.2f} s. "
            f"Peak host RSS {result['peak_host_bytes'] / GIB:.2f} GiB, predicted "
            f"{result['predicted_peak_host_bytes'] / GIB:.2f} GiB ({result['host_prediction_error']:+.1%}). "
            f"Extrapolated to 80 blocks: {x['seconds'] / 3600:.2f} h, host {x['predicted_peak_host_bytes'] / GIB:.2f} GiB, "
            f"GPU {x['predicted_peak_gpu_bytes'] / GIB:.2f} GiB (planner, micro-batch {x['micro_batch']}).")
