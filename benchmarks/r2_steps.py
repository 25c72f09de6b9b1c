"""R2 training regimes on a real model's o_proj inputs: Whip loss reached (as a share of the Hadamard init's) and
seconds per layer.

o_proj's inputs do not depend on R1 (R1 cancels in v_proj and attention), so the rows R2 trains on are taken from
transformers' own fp32 forward of the unrotated model over the calibration windows the pipeline draws, sampled as
the pipeline samples them (--r2-tokens rows per layer). Each regime trains every sampled layer's R2 with
`train_r2`, exactly as `streamquant run --method dart` does.
    python benchmarks/r2_steps.py --model smollm2-135m --calib ../shared/data/wikitext-2/valid.txt \
        --samples 16 --seqlen 512 --layers 0 3 6 9 12 15 18 21 24 27
A regime is name=batches_per_epoch/lr[/scaled] (batches_per_epoch 0: batches of 128 rows, the step count grows with
the rows; scaled: lr is for 128 rows and grows with the batch, as R2_CONFIG's scale_lr); all take 5 epochs of a
fresh 10 % of the rows.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import append_results  # noqa: E402

DEFAULT_REGIMES = ["batches-of-128=0/1e-3", "default=8/1e-3/scaled", "4-per-epoch=4/1e-3", "8-per-epoch-lr1e-2=8/1e-2"]


def o_proj_rows(model_dir: Path, ids: torch.Tensor, layers: list[int], rows: int, seed: int) -> dict[int, torch.Tensor]:
    """`rows` random o_proj input rows per layer from one fp32 forward of the plain model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    taken: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    handles = [model.model.layers[i].self_attn.o_proj.register_forward_pre_hook(
        lambda mod, args, i=i: taken[i].append(args[0].reshape(-1, args[0].shape[-1]).clone())) for i in layers]
    with torch.no_grad():
        for s in range(ids.shape[0]):   # one window at a time: the activations of one
            model.model(ids[s:s + 1])
    for h in handles:
        h.remove()
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i in layers:
        x = torch.cat(taken[i])
        out[i] = x[torch.randperm(x.shape[0], generator=gen)[:rows].sort().values]
    return out


def main() -> None:
    from streamquant.data import calibration_windows, load_tokenizer, read_text, tokenize_in_pieces
    from streamquant.rotate.dart import R2_CONFIG, train_r2
    from streamquant.source import resolve_model
    from streamquant.spec import read_spec

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib", default="../shared/data/wikitext-2/valid.txt")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--r2-tokens", type=int, default=16384)
    p.add_argument("--layers", type=int, nargs="+", default=[0, 3, 6, 9, 12, 15, 18, 21, 24, 27])
    p.add_argument("--regimes", nargs="+", default=DEFAULT_REGIMES)
    p.add_argument("--title", default="R2 in fewer steps")
    args = p.parse_args()

    model_dir = resolve_model(args.model)
    spec = read_spec(model_dir)
    ids = calibration_windows(tokenize_in_pieces(load_tokenizer(model_dir), read_text(args.calib)), args.seqlen,
                              args.samples, args.seed)
    rows = o_proj_rows(model_dir, ids, args.layers, args.r2_tokens, args.seed)
    results = []
    for regime in args.regimes:
        name, setting = regime.split("=")
        batches, lr, *scaled = setting.split("/")
        cfg = replace(R2_CONFIG, batch_size=128, lr=float(lr), batches_per_epoch=int(batches) or None,
                      scale_lr=bool(scaled))
        init = final = seconds = 0.0
        steps = 0
        for i in args.layers:
            t0 = time.perf_counter()
            fits = train_r2(rows[i], spec.num_kv_heads, spec.head_dim, spec.heads_per_group, replace(cfg, seed=i), i)
            seconds += time.perf_counter() - t0
            init += sum(f.init_loss for f in fits)
            final += sum(f.final_loss for f in fits)
            steps = fits[0].steps
        results.append({"regime": name, "batches_per_epoch": int(batches), "lr": float(lr), "scale_lr": bool(scaled),
                        "steps": steps,
                        "whip_share_of_init": final / init, "seconds_per_layer": seconds / len(args.layers)})
        print(json.dumps(results[-1]), file=sys.stderr)
    lines = ["| regime | steps per layer | lr (per 128 rows if scaled) | Whip / Hadamard init's | s per layer |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['regime']} | {r['steps']} | {r['lr']:g}{' scaled' if r['scale_lr'] else ''} | "
              f"{r['whip_share_of_init']:.4f} | "
              f"{r['seconds_per_layer']:.3f} |" for r in results]
    payload = {"model": args.model, "samples": args.samples, "seqlen": args.seqlen, "seed": args.seed,
               "r2_tokens": args.r2_tokens, "layers": args.layers, "threads": torch.get_num_threads(), "rows": results}
    append_results(f"{args.title}: {args.model} o_proj inputs, layers {args.layers}", "\n".join(lines), payload)
    print(json.dumps(payload))


if __name__ == "__main__":
    main()
