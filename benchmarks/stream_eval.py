"""Streaming eval vs transformers' full-model eval on the same windows: wall time, peak host RSS, PPL.

Each side runs in its own fresh process so one's memory does not hide in the other's peak.
    python benchmarks/stream_eval.py --model smollm2-135m --data ../shared/data/wikitext-2/test.txt --seqlen 512 --windows 8
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import PeakRSS, append_results  # noqa: E402


def run_side(side: str, args) -> dict:
    import torch

    from streamquant.data import eval_windows, load_tokenizer, read_text, tokenize
    from streamquant.source import resolve_model

    model_dir = resolve_model(args.model)
    ids = eval_windows(tokenize(load_tokenizer(model_dir), read_text(args.data)), args.seqlen, args.windows)
    with PeakRSS() as rss:
        start = time.perf_counter()
        if side == "stream":
            from streamquant.evaluate import perplexity

            ppl = perplexity(args.model, args.data, args.seqlen, args.windows, "float32", "cpu")["ppl"]
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
            with torch.no_grad():
                ppl = math.exp(sum(float(model(w[None], labels=w[None]).loss) for w in ids) / len(ids))
        seconds = time.perf_counter() - start
    return {"side": side, "ppl": ppl, "seconds": seconds, "peak_rss_bytes": rss.peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default="../shared/data/wikitext-2/test.txt")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--side", choices=["stream", "full"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        print(json.dumps(run_side(args.side, args)))
        return
    base = [sys.executable, __file__, "--model", args.model, "--data", args.data, "--seqlen", str(args.seqlen),
            "--windows", str(args.windows)]
    sides = {}
    for side in ("stream", "full"):
        out = subprocess.run(base + ["--side", side], capture_output=True, text=True, check=True).stdout
        sides[side] = json.loads(out.strip().splitlines()[-1])
    result = {"model": args.model, "seqlen": args.seqlen, "windows": args.windows, **sides,
              "ppl_rel_diff": abs(sides["stream"]["ppl"] - sides["full"]["ppl"]) / sides["full"]["ppl"]}
    rows = "\n".join(f"| {s} | {v['ppl']:.4f} | {v['seconds']:.1f} | {v['peak_rss_bytes'] / 2**20:.0f} |"
                     for s, v in sides.items())
    table = f"| eval | PPL | wall s | peak RSS MiB |\n|---|---|---|---|\n{rows}"
    append_results(f"Streaming vs full-model eval: {args.model}, seqlen {args.seqlen}, {args.windows} windows", table, result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
