"""Perplexity of quantized SmolLM2-135M (or any model) across methods, bit widths and weight quantizers.

Each configuration is one `streamquant run ... --eval` (calibrate on one text, evaluate another, same seqlen), in its
own process; the table is appended to RESULTS.md with the exact command.
    python benchmarks/quality.py --model smollm2-135m --calib ../shared/data/wikitext-2/valid.txt \
        --eval ../shared/data/wikitext-2/test.txt --seqlen 512 --samples 16 --eval-windows 20 \
        --rows none/rtn/4/4/16 quarot/rtn/4/4/16 dart/rtn/4/4/16
A row is method/weights/w_bits/a_bits/kv_bits[/group_size]. The defaults are the project's quality protocol
(SmolLM2-135M, calib valid.txt 16 × 512, seed 0, the first 8 windows of 512 of test.txt, fp32); `--extra` passes
further run options (e.g. `--extra=--w-clip`).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import append_results  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib", default="../shared/data/wikitext-2/valid.txt")
    p.add_argument("--eval", default="../shared/data/wikitext-2/test.txt")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows", nargs="+", required=True)
    p.add_argument("--title", default="Quality")
    p.add_argument("--extra", default="", help="more `streamquant run` options, space separated")
    args = p.parse_args()
    exe = Path(sys.executable).with_name("streamquant")
    results = []
    for row in args.rows:
        method, weights, w, a, kv, *group = row.split("/")
        cmd = [str(exe), "run", args.model, "--method", method, "--weights", weights, "--w-bits", w, "--a-bits", a,
               "--kv-bits", kv, "--group-size", group[0] if group else "-1", "--calib", args.calib,
               "--samples", str(args.samples), "--seqlen", str(args.seqlen), "--seed", str(args.seed),
               "--eval", args.eval, "--eval-windows", str(args.eval_windows), "--dtype", "float32", *args.extra.split(), "--no-write", "--json"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr, file=sys.stderr)
            raise SystemExit(f"row {row} failed")
        out = json.loads(done.stdout.strip().splitlines()[-1])
        results.append({"row": row, "ppl": out["ppl"], "seconds": out["seconds"], "stage_seconds": out["stage_seconds"],
                        "r1": {k: out["r1"].get(k) for k in ("init_loss", "final_loss", "steps")} if out["r1"] else {}})
        print(json.dumps(results[-1]), file=sys.stderr)
    lines = ["| method | weights | W | A | KV | group | PPL | run s |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        method, weights, w, a, kv, *group = r["row"].split("/")
        lines.append(f"| {method} | {weights} | {w} | {a} | {kv} | {group[0] if group else -1} | {r['ppl']:.3f} | {r['seconds']:.0f} |")
    payload = {"model": args.model, "seqlen": args.seqlen, "samples": args.samples, "eval_windows": args.eval_windows,
               "rows": results}
    append_results(f"{args.title}: {args.model}, calib {Path(args.calib).name}, eval {Path(args.eval).name} "
                   f"({args.eval_windows} windows of {args.seqlen})", "\n".join(lines), payload)
    print(json.dumps(payload))


if __name__ == "__main__":
    main()
