"""The 70B-shape proof: run the whole pipeline (capture, R1, R2, GPTQ, write) on blocks shaped like Llama-2-70B.

Writes a synthetic checkpoint with 70B block shapes (planted outlier channels), runs `streamquant run` in-process
under a psutil RSS sampler, and prints JSON: per-block seconds by stage, peak GPU per stage, peak host RSS, the
planner's prediction next to the measurement, and the extrapolation to 80 blocks (host RAM from the planner on an
80-block header-only copy; time = per-block seconds × 80). `--scale N` divides every dimension by N so the same
script runs on CPU in CI-sized time.
    python benchmarks/seventy_b.py --scale 1 --blocks 4 --samples 128 --seqlen 2048 --gpu-mem 23GiB   # on a GPU
    python benchmarks/seventy_b.py --scale 16 --blocks 3 --samples 16 --seqlen 256 --device cpu        # on a CPU
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import PeakRSS, append_results  # noqa: E402
from synthetic import scaled_shape, write_checkpoint  # noqa: E402

GIB = 1 << 30


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=int, default=1)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--gpu-mem", default="23GiB")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--weights", default="gptq")
    p.add_argument("--workdir", default=None, help="where the synthetic checkpoint and output go (default: a temp dir)")
    args = p.parse_args()

    from streamquant.pipeline import Pipeline, RunConfig
    from streamquant.plan import current_host_bytes, fit_micro_batch, resolve_dtype, resolve_device
    from streamquant.shards import ShardIndex
    from streamquant.spec import read_spec
    from streamquant.cli.app import parse_bytes

    work = Path(args.workdir or tempfile.mkdtemp(prefix="sq70b-"))
    shape = scaled_shape(args.scale, args.blocks)
    t0 = time.perf_counter()
    model = write_checkpoint(work / "model", shape)
    write_seconds = time.perf_counter() - t0
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    cfg = RunConfig(model=str(model), out=out, method="dart", weights=args.weights, w_bits=4, a_bits=4,
                    samples=args.samples, seqlen=args.seqlen, dtype=args.dtype, device=args.device,
                    gpu_mem=parse_bytes(args.gpu_mem) if resolve_device(args.device).type == "cuda" else None)
    from streamquant.writer import OutputWriter

    with PeakRSS() as rss:
        pipe = Pipeline(cfg, sink=OutputWriter(out))
        report = pipe.run()

    # extrapolate: the same shape with 80 blocks, headers only (sparse), planned the way `run` plans
    full = write_checkpoint(work / "model80", scaled_shape(args.scale, 80), sparse=True)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    spec80 = read_spec(full)
    plan80 = fit_micro_batch(spec80, ShardIndex(full, spec80), pipe.workload(), dtype, device.type,
                             cfg.gpu_mem, current_host_bytes(), None)
    per_block = [sum(v for k, v in b.items() if k in ("rotate", "r2", "quantize", "forward", "write")) for b in report["blocks"]]
    result = {
        "shape": shape, "scale": args.scale, "blocks": args.blocks, "samples": args.samples, "seqlen": args.seqlen,
        "device": report["device"], "dtype": report["dtype"], "micro_batch": report["micro_batch"],
        "checkpoint_write_seconds": write_seconds,
        "stage_seconds": report["stage_seconds"], "per_block": report["blocks"],
        "memory": report["memory"], "peak_host_rss_sampled": rss.peak, "peak_host_rss": report["peak_host_bytes"],
        "predicted_peak_host": report["plan"]["peak_host_bytes"], "predicted_peak_gpu": report["plan"]["peak_gpu_bytes"],
        "extrapolated_80_blocks": {
            "seconds": report["stage_seconds"].get("capture", 0) / args.blocks * 80 + report["stage_seconds"].get("r1", 0)
                       + statistics.median(per_block) * 80,
            "predicted_peak_host_bytes": plan80.peak_host_bytes, "predicted_peak_gpu_bytes": plan80.peak_gpu_bytes,
        },
    }
    measured = max(rss.peak, report["peak_host_bytes"])
    result["host_prediction_error"] = (report["plan"]["peak_host_bytes"] - measured) / measured
    rows = [f"| {stage} | {m['predicted_gpu_bytes'] / GIB:.2f} | {m['measured_gpu_bytes'] / GIB:.2f} | "
            f"{m['predicted_host_bytes'] / GIB:.2f} | {m['measured_host_bytes'] / GIB:.2f} |"
            for stage, m in report["memory"].items()]
    table = ("| stage | predicted GPU GiB | measured GPU GiB | predicted host GiB | measured host GiB (RSS high-water) |\n"
             "|---|---|---|---|---|\n" + "\n".join(rows) +
             f"\n\nPer block (median): {statistics.median(per_block):.2f} s; I/O hidden (median): "
             f"{statistics.median(b['io_hidden'] for b in report['blocks']):.2f}. Peak host RSS {measured / GIB:.2f} GiB, "
             f"predicted {report['plan']['peak_host_bytes'] / GIB:.2f} GiB ({result['host_prediction_error']:+.1%}). "
             f"Extrapolated to 80 blocks: {result['extrapolated_80_blocks']['seconds'] / 3600:.2f} h, host "
             f"{plan80.peak_host_bytes / GIB:.2f} GiB, GPU {plan80.peak_gpu_bytes / GIB:.2f} GiB (planner).")
    append_results(f"70B-shape pipeline, scale 1/{args.scale}, {args.blocks} blocks, {args.samples}×{args.seqlen}",
                   table, result)
    print(json.dumps(result))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
