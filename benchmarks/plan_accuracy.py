"""The planner's host-RAM prediction against a real run's peak RSS, per stage: `streamquant run ... --json` in a
fresh process (as a user runs it), then report.json's `memory` section as a table appended to RESULTS.md.

    python benchmarks/plan_accuracy.py -- smollm2-135m --out out/pa --w-bits 4 --a-bits 16 --weights gptq \\
        --group-size 64 --samples 16 --seqlen 512 --eval default
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import append_results  # noqa: E402

GIB = 1 << 30


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["--"]:
        args = args[1:]
    if "--out" in args:
        shutil.rmtree(args[args.index("--out") + 1], ignore_errors=True)
    exe = Path(sys.executable).with_name("streamquant")
    res = subprocess.run([str(exe), "run", *args, "--json"], capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit {res.returncode}")
    report = json.loads(res.stdout.strip().splitlines()[-1])
    measured, predicted = report["peak_host_bytes"], report["plan"]["peak_host_bytes"]
    rows = [f"| {stage} | {m['predicted_host_bytes'] / GIB:.3f} | {m['measured_host_bytes'] / GIB:.3f} |"
            for stage, m in report["memory"].items()]
    table = ("| stage | predicted host GiB | measured host GiB (RSS high-water so far) |\n|---|---|---|\n" +
             "\n".join(rows) + f"\n\nPeak: predicted {predicted / GIB:.3f} GiB, measured {measured / GIB:.3f} GiB "
             f"({predicted / measured - 1:+.1%}); micro-batch {report['micro_batch']}, {report['seconds']:.0f} s.")
    result = {"args": args, "predicted_peak_host_bytes": predicted, "measured_peak_host_bytes": measured,
              "error": predicted / measured - 1, "memory": report["memory"], "micro_batch": report["micro_batch"]}
    append_results(f"Planner host RAM vs measured: streamquant run {' '.join(args[:1])}", table, result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
