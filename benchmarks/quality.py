"""Perplexity of quantized SmolLM2-135M (or any model) on the project's quality protocol, per configuration and seed.

Each configuration and seed is one `streamquant run ... --eval` (calibrate on one text, evaluate another, same
seqlen) in its own process; the table is appended to RESULTS.md with the exact command.
    python benchmarks/quality.py --seeds 0 1 2 --jobs 2 --threads 1 --transformers \
        --rows "--scheme w4a16" "--scheme w4a16 --method dart --w-asym"
A row is the `streamquant run` options of one configuration, or the older shorthand
method/weights/w_bits/a_bits/kv_bits[/group_size] (e.g. `dart/gptq/4/16/16/64`). The defaults are the project's
quality protocol (SmolLM2-135M, calib valid.txt 16 × 512, seed 0, the first 8 windows of 512 of test.txt, fp32);
`--extra` adds options to every row. `--transformers` also writes each checkpoint and scores it through
transformers' own forward (`streamquant.load`: transformers with compressed-tensors' decompression), the protocol's
independent score for exportable (W4A16, W8A8, W4A8) outputs; a streamquant-format output (activation or KV quantizers,
`--o-online`) has none and shows "–".
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import append_results  # noqa: E402


def row_options(row: str) -> list[str]:
    """A row's `streamquant run` options: the options themselves, or the method/weights/bits shorthand."""
    if row.startswith("-"):
        return shlex.split(row)
    method, weights, w, a, kv, *group = row.split("/")
    return ["--method", method, "--weights", weights, "--w-bits", w, "--a-bits", a, "--kv-bits", kv,
            "--group-size", group[0] if group else "-1"]


def transformers_ppl(out: str, data: str, seqlen: int, windows: int) -> float:
    """PPL of a written checkpoint through transformers' forward, on the windows and definition of `streamquant
    eval` (exp of the mean over windows of the mean next-token NLL)."""
    import torch

    import streamquant
    from streamquant.data import eval_windows, load_tokenizer, tokenize

    model = streamquant.load(out, dtype=torch.float32)
    ids = eval_windows(tokenize(load_tokenizer(Path(out)), Path(data).read_text()), seqlen, windows)
    with torch.no_grad():
        return math.exp(sum(float(model(w[None], labels=w[None]).loss) for w in ids) / len(ids))


def measure(args, exe: Path, row: str, seed: int) -> dict:
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    cmd = [str(exe), "run", args.model, *row_options(row), "--calib", args.calib, "--samples", str(args.samples),
           "--seqlen", str(args.seqlen), "--seed", str(seed), "--eval", args.eval, "--eval-windows",
           str(args.eval_windows), "--dtype", "float32", *shlex.split(args.extra), "--quiet", "--json"]
    with tempfile.TemporaryDirectory(prefix="quality-") as tmp:
        out = str(Path(tmp) / "out")
        cmd += ["--out", out] if args.transformers else ["--no-write"]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise SystemExit(f"row {row!r} seed {seed} failed: {done.stderr.strip().splitlines()[-1:]}")
        res = json.loads(done.stdout.strip().splitlines()[-1])
        result = {"row": row, "seed": seed, "ppl": res["ppl"], "seconds": res["seconds"],
                  "stage_seconds": res["stage_seconds"],
                  "r1": {k: res["r1"].get(k) for k in ("init_loss", "final_loss", "steps")} if res["r1"] else {}}
        if args.transformers and res["format"] == "streamquant":
            # online R3/R4, a KV or an activation quantizer that no standard runtime expresses: nothing to score
            result["transformers_ppl"] = None
        elif args.transformers:
            score = subprocess.run([sys.executable, __file__, "--score", out, "--eval", args.eval, "--seqlen",
                                    str(args.seqlen), "--eval-windows", str(args.eval_windows)],
                                   capture_output=True, text=True, env=env)
            if score.returncode != 0:
                raise SystemExit(f"row {row!r} seed {seed}: transformers could not score it: "
                                 f"{score.stderr.strip().splitlines()[-1:]}")
            result["transformers_ppl"] = json.loads(score.stdout.strip().splitlines()[-1])["ppl"]
    print(json.dumps(result), file=sys.stderr)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib", default="../shared/data/wikitext-2/valid.txt")
    p.add_argument("--eval", default="../shared/data/wikitext-2/test.txt")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--seeds", "--seed", type=int, nargs="+", default=[0])
    p.add_argument("--rows", nargs="+")
    p.add_argument("--title", default="Quality")
    p.add_argument("--extra", default="", help="more `streamquant run` options for every row, space separated")
    p.add_argument("--transformers", action="store_true", help="also score each written checkpoint through "
                                                                 "transformers (streamquant.load)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of each run (0: leave it)")
    p.add_argument("--score", help=argparse.SUPPRESS)   # internal: score one checkpoint through transformers
    args = p.parse_args()
    if args.score:
        print(json.dumps({"ppl": transformers_ppl(args.score, args.eval, args.seqlen, args.eval_windows)}))
        return
    if not args.rows:
        p.error("--rows is required")
    exe = Path(sys.executable).with_name("streamquant")
    work = [(row, seed) for row in args.rows for seed in args.seeds]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(lambda job: measure(args, exe, *job), work))

    seeds = args.seeds
    head = "| run options | " + " | ".join(f"seed {s}" for s in seeds) + (" | mean |" if len(seeds) > 1 else " |")
    lines = [head, "|---|" + "---|" * (len(seeds) + (len(seeds) > 1))]

    def cell(rs: list[dict], key: str) -> list[str]:
        if any(r[key] is None for r in rs):   # transformers_ppl of a streamquant-format output
            return ["– (streamquant format)"] * (len(rs) + (len(rs) > 1))
        cells = [f"{r[key]:.2f}" for r in rs]
        return cells + ([f"{sum(r[key] for r in rs) / len(rs):.2f}"] if len(rs) > 1 else [])

    for row in args.rows:
        rs = [r for r in results if r["row"] == row]
        lines.append(f"| `{' '.join(row_options(row))}` (streamquant) | " + " | ".join(cell(rs, "ppl")) + " |")
        if args.transformers:
            lines.append(f"| same, through transformers | " + " | ".join(cell(rs, "transformers_ppl")) + " |")
    payload = {"model": args.model, "seqlen": args.seqlen, "samples": args.samples, "eval_windows": args.eval_windows,
               "threads": args.threads or None, "rows": results}
    append_results(f"{args.title}: {args.model}, calib {Path(args.calib).name}, eval {Path(args.eval).name} "
                   f"({args.eval_windows} windows of {args.seqlen}), seeds {' '.join(map(str, seeds))}",
                   "\n".join(lines), payload)
    print(json.dumps(payload))


if __name__ == "__main__":
    main()
