"""The 70B-shape proof as a benchmark: `streamquant.bench.seventy_b`, printed as JSON and appended to RESULTS.md.

    python benchmarks/seventy_b.py --scale 1 --blocks 4 --samples 128 --seqlen 2048 --gpu-mem 23GiB   # on a GPU
    python benchmarks/seventy_b.py --scale 4 --blocks 2 --samples 16 --seqlen 1024 --device cpu --r1-reservoir 32MiB  # CPU
(`streamquant bench` runs the same thing without touching RESULTS.md.)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import append_results  # noqa: E402


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
    p.add_argument("--hessians", default="sequential", help="GPTQ Hessians: sequential or one-pass")
    p.add_argument("--w-clip", action="store_true", help="the w4a4 preset's MSE weight clip search")
    p.add_argument("--asym-calib", action="store_true", help="asymmetric GPTQ calibration")
    p.add_argument("--asym-targets", default="input", help="its targets: input or model (a full-precision stream)")
    p.add_argument("--refit-scales", type=int, default=0, help="GPTQ's least-squares scale refit, in N rounds")
    p.add_argument("--r1-reservoir", default="256MiB")
    p.add_argument("--workdir", default=None, help="where the synthetic checkpoint and output go (default: a temp dir)")
    args = p.parse_args()

    from streamquant.bench import BenchConfig, markdown, seventy_b
    from streamquant.cli.app import parse_bytes

    result = seventy_b(BenchConfig(scale=args.scale, blocks=args.blocks, samples=args.samples, seqlen=args.seqlen,
                                   gpu_mem=parse_bytes(args.gpu_mem), device=args.device, dtype=args.dtype,
                                   weights=args.weights, hessians=args.hessians, w_clip=args.w_clip, asym_calib=args.asym_calib, asym_targets=args.asym_targets, refit_scales=args.refit_scales, r1_reservoir_bytes=parse_bytes(args.r1_reservoir), workdir=Path(args.workdir) if args.workdir else None))
    append_results(f"70B-shape pipeline, scale 1/{args.scale}, {args.blocks} blocks, {args.samples}×{args.seqlen}, "
                   f"{args.hessians} Hessians{', MSE clip' if args.w_clip else ''}{', asymmetric calibration' if args.asym_calib else ''}{f', scale refit x{args.refit_scales}' if args.refit_scales else ''}, {result['device']}", markdown(result),
                   result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
