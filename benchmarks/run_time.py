"""Wall time and peak RSS of one whole `streamquant run` process (/usr/bin/time -v), with the run's own per-stage
seconds and per-block forward-equivalents from report.json; appended to RESULTS.md with the exact command.

    python benchmarks/run_time.py --title "README run" -- smollm2-135m --scheme w4a16 --samples 16 --seqlen 512 \\
        --calib ../shared/data/wikitext-2/valid.txt --eval ../shared/data/wikitext-2/test.txt --eval-windows 8
Measure on an otherwise idle machine: the numbers are only as quiet as the machine.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import append_results  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--title", default="Whole-process run time")
    p.add_argument("run_args", nargs=argparse.REMAINDER, help="after --: the arguments of `streamquant run`")
    args = p.parse_args()
    run_args = [a for a in args.run_args if a != "--"]
    out = Path(tempfile.mkdtemp(prefix="sq-time-")) / "out"
    exe = Path(sys.executable).with_name("streamquant")
    cmd = ["/usr/bin/time", "-v", str(exe), "run", *run_args, "--out", str(out), "--quiet", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stderr, file=sys.stderr)
        raise SystemExit("run failed")
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", done.stderr)
    seconds = int(wall.group(1) or 0) * 3600 + int(wall.group(2)) * 60 + float(wall.group(3))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1)) * 1024
    report = json.loads(done.stdout.strip().splitlines()[-1])
    shutil.rmtree(out.parent, ignore_errors=True)
    fwd = [b.get("forward_equivalents", 0.0) for b in report["blocks"]]
    payload = {"args": run_args, "wall_seconds": seconds, "max_rss_bytes": rss, "ppl": report.get("ppl"),
               "stage_seconds": report["stage_seconds"], "forward_equivalents_per_block": statistics.median(fwd),
               "gptq_solve_seconds": sum(b.get("gptq_solve", 0.0) for b in report["blocks"])}
    stages = ", ".join(f"{k} {v:.1f}" for k, v in report["stage_seconds"].items() if v >= 0.05)
    table = ("| wall s | max RSS GiB | PPL | forward-equivalents / block | stage seconds |\n|---|---|---|---|---|\n"
             f"| {seconds:.1f} | {rss / 2**30:.2f} | {payload['ppl'] or '-'} | {payload['forward_equivalents_per_block']:.2f} "
             f"| {stages} |")
    append_results(f"{args.title}: streamquant run {' '.join(run_args)}", table, payload)
    print(json.dumps(payload))


if __name__ == "__main__":
    main()
