"""Seconds per block of a data-parallel run (torchrun, issue 15) against one process, with the same options;
appended to RESULTS.md with the exact command.

    python benchmarks/distributed.py --nproc 1,2 -- smollm2-135m --scheme w4a16 --samples 8 --seqlen 256 \\
        --calib ../shared/data/wikitext-2/valid.txt --eval ../shared/data/wikitext-2/test.txt --eval-windows 4

1 means the plain single-process command; N > 1 means `torchrun --standalone --nproc-per-node N streamquant run ...`.
On a CPU every configuration gets all cores (OMP_NUM_THREADS = cores / N per rank), so 2 ranks on 2 cores is only a
smoke test of the overheads (no more compute exists); on a machine with N GPUs each rank gets its own GPU and the
speed-up is the real one. A block's seconds are its stages (rotate, r2, quantize, forward, write) on rank 0, whose
waits in the collectives include the slowest rank's share.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).parent))
from _common import append_results  # noqa: E402

STAGES = ("rotate", "r2", "quantize", "forward", "write")


def one(nproc: int, run_args: list[str], cpu: bool) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"sq-dist{nproc}-")) / "out"
    exe = str(Path(sys.executable).with_name("streamquant"))
    if nproc == 1:
        cmd = [exe]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", exe]
    env = dict(os.environ, STREAMQUANT_PROGRESS="0")
    if cpu:
        env["OMP_NUM_THREADS"] = str(max(1, (psutil.cpu_count() or 1) // nproc))
    t0 = time.perf_counter()
    done = subprocess.run(cmd + ["run", *run_args, "--out", str(out), "--quiet", "--json"], capture_output=True,
                          text=True, env=env)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        print(done.stderr, file=sys.stderr)
        raise SystemExit(f"the {nproc}-process run failed")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    shutil.rmtree(out.parent, ignore_errors=True)
    per_block = [sum(b.get(k, 0.0) for k in STAGES) for b in report["blocks"]]
    return {"nproc": nproc, "wall_seconds": wall, "run_seconds": report["seconds"],
            "seconds_per_block": statistics.median(per_block), "ppl": report.get("ppl"),
            "stage_seconds": report["stage_seconds"], "device": report["device"],
            "threads_per_rank": env.get("OMP_NUM_THREADS")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", default="1,2", help="comma-separated process counts; 1 is the plain command")
    p.add_argument("--title", default="Issue 15: data-parallel seconds per block (torchrun)")
    p.add_argument("run_args", nargs=argparse.REMAINDER, help="after --: the arguments of `streamquant run`")
    args = p.parse_args()
    run_args = [a for a in args.run_args if a != "--"]
    import torch

    cpu = not torch.cuda.is_available() or any(a in ("cpu",) for a in run_args)
    rows = [one(int(n), run_args, cpu) for n in args.nproc.split(",")]
    base = rows[0]["seconds_per_block"]
    for r in rows:
        r["speedup_per_block"] = base / r["seconds_per_block"]
    table = "| processes | threads/rank | s/block (median) | speed-up | run s | wall s | PPL |\n|---|---|---|---|---|---|---|\n"
    table += "\n".join(f"| {r['nproc']} | {r['threads_per_rank'] or '-'} | {r['seconds_per_block']:.2f} | "
                       f"{r['speedup_per_block']:.2f}× | {r['run_seconds']:.1f} | {r['wall_seconds']:.1f} | "
                       f"{r['ppl'] if r['ppl'] is not None else '-'} |" for r in rows)
    payload = {"args": run_args, "runs": rows}
    append_results(f"{args.title}: streamquant run {' '.join(run_args)}", table, payload)
    print(json.dumps(payload))


if __name__ == "__main__":
    main()
