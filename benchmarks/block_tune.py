"""Does block-output reconstruction after GPTQ help the best weight-only options? Issue 17's last untried lever.

AutoRound / OmniQuant tune rounding and scales per block by gradient descent on the block's output error. Here, after
GPTQ (the best W4A16 dart options: sequential Hessians, asymmetric calibration against the full-precision model,
three scale-refit rounds, asymmetric weights), each block's group scales are tuned by Adam on a log-scale offset
(`--lr-scales`), and optionally its codes by AutoRound's signed gradient on a rounding offset in [-1, 1]
(`--lr-codes`), to reproduce the block's full-precision output (unquantized rotated weights) on the block's
calibration inputs (the quantized model's states). A block keeps the result only if its calibration loss fell.

`--held K` tunes on the first N - K calibration windows and reports the block loss on the last K as well (an
overfitting check; the run's PPL then comes from scales tuned on fewer windows). Protocol: issue 17's (SmolLM2-135M,
16 × 512 windows of valid.txt, seed 0, the first 8 windows of 512 of test.txt, fp32).
    python benchmarks/block_tune.py --steps 20 --seed 0
    python benchmarks/block_tune.py --steps 40 --batch 2 --held 4
    python benchmarks/block_tune.py --steps 40 --batch 2 --lr-codes 0.04
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).parent))
from _common import append_results  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"


class _RoundSTE(torch.autograd.Function):
    """round() forward, identity backward (AutoRound's straight-through estimator)."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def tune_block(forward, codes: dict, qrange: tuple[int, int], group_size: int, windows: int, args,
               gen: torch.Generator) -> tuple[dict, dict]:
    """Tune the scales (and codes) of `codes` {linear: (q, scale, zero)} so that forward(weights, rows) — the
    quantized block's output minus its full-precision target, for calibration windows `rows` — shrinks.
    Returns the new codes (empty if the loss did not fall) and the losses."""
    from streamquant.quant.quantizers import _expand

    qmin, qmax = qrange
    train = windows - args.held
    state = {n: {"q": q.float(), "s": s.float(), "z": _expand(z.float(), group_size, q.shape[1]),
                 "V": torch.zeros(q.shape, requires_grad=True), "a": torch.zeros(s.shape, requires_grad=True)}
             for n, (q, s, z) in codes.items()}
    adam = torch.optim.Adam([st["a"] for st in state.values()], lr=args.lr_scales)

    def weights(hard: bool = False) -> dict[str, torch.Tensor]:
        out = {}
        for n, st in state.items():
            offset = torch.round(st["V"]) if hard else _RoundSTE.apply(st["V"])
            code = (st["q"] + offset).clamp(qmin, qmax)
            out[n] = (code - st["z"]) * _expand(st["s"] * torch.exp(st["a"]), group_size, code.shape[1])
        return out

    def mean_loss(rows: range) -> float:
        with torch.no_grad():
            w = weights(hard=True)
            return sum(float(forward(w, torch.tensor([r])).pow(2).mean()) for r in rows) / max(1, len(rows))

    losses = {"train_init": mean_loss(range(train)), "held_init": mean_loss(range(train, windows))}
    for step in range(args.steps):
        rows = torch.randperm(train, generator=gen)[:args.batch]
        with torch.enable_grad():
            loss = forward(weights(), rows).pow(2).mean()
            adam.zero_grad()
            for st in state.values():
                st["V"].grad = None
            loss.backward()
        with torch.no_grad():
            for st in state.values():   # signed gradient, linearly decayed step (AutoRound)
                st["V"].sub_(args.lr_codes * (1 - step / args.steps) * st["V"].grad.sign()).clamp_(-1, 1)
        adam.step()
    losses |= {"train_final": mean_loss(range(train)), "held_final": mean_loss(range(train, windows))}
    if not losses["train_final"] < losses["train_init"]:
        return {}, losses
    new = {}
    with torch.no_grad():
        for n, st in state.items():
            q, s, z = codes[n]
            code = (st["q"] + torch.round(st["V"])).clamp(qmin, qmax)
            new[n] = (code.to(q.dtype), (st["s"] * torch.exp(st["a"])).to(s.dtype), z)
    losses["codes_changed"] = sum(int((new[n][0] != codes[n][0]).sum()) for n in new) / sum(
        q.numel() for q, _, _ in codes.values())
    return new, losses


def tuned_pipeline(args):
    from streamquant.pipeline import Pipeline
    from streamquant.qblock import qlinears
    from streamquant.quant.quantizers import code_range, dequantize_weight

    class TunedPipeline(Pipeline):
        """The pipeline with each block's GPTQ result tuned to the block's full-precision output."""
        blocks: list = []

        def quantize_block(self, layer, hidden, early, reference):
            linears = qlinears(layer, self.arch)
            full = {n: lin.weight.data.clone() for n, lin in linears.items()}
            codes, losses = super().quantize_block(layer, hidden, early, reference)
            if not codes:
                return codes, losses
            engine, wcfg, i = self.engine, self.cfg.weight_cfg, self.stats.block["block"]
            seqlen = hidden.shape[1]
            pos = tuple(p.clone() for p in engine.position_embeddings(seqlen))   # (cached in inference mode)
            mask = engine.layer_mask(layer, seqlen)
            dtype = next(iter(full.values())).dtype

            def run(weights: dict[str, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
                x = hidden[rows].to(engine.device)   # indexing by a tensor already copies
                params = {f"{n}.weight": w.to(dtype) for n, w in weights.items()}
                y = functional_call(layer, params, (x,), {"attention_mask": mask, "position_embeddings": pos})
                with torch.no_grad():
                    t = functional_call(layer, {f"{n}.weight": w for n, w in full.items()}, (x,),
                                        {"attention_mask": mask, "position_embeddings": pos})
                return (y[0] if isinstance(y, tuple) else y).float() - (t[0] if isinstance(t, tuple) else t).float()

            t0 = time.perf_counter()
            gen = torch.Generator().manual_seed(self.cfg.seed + 7 * i)
            new, block_losses = tune_block(run, codes, code_range(wcfg.bits, wcfg.symmetric), wcfg.group_size,
                                           hidden.shape[0], args, gen)
            for n, (q, s, z) in new.items():
                codes[n] = (q, s, z)
                linears[n].weight.data = dequantize_weight(q, s, z, wcfg.group_size).to(dtype)
            self.blocks.append({"block": i, "kept": bool(new), "seconds": round(time.perf_counter() - t0, 1),
                                **{k: round(v, 6) for k, v in block_losses.items()}})
            print(json.dumps(self.blocks[-1]), file=sys.stderr, flush=True)
            return codes, losses

    return TunedPipeline


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=4, help="calibration windows per step")
    p.add_argument("--lr-scales", type=float, default=1e-3)
    p.add_argument("--lr-codes", type=float, default=0.0, help="AutoRound's signed step on the rounding offset")
    p.add_argument("--held", type=int, default=0, help="calibration windows kept out of the tuning")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, default=DATA)
    args = p.parse_args()

    from streamquant.preflight import RunConfig, prepare
    from streamquant.schemes import PRESET_KEYS, build_config

    base = RunConfig(model="smollm2-135m", calib=str(args.data / "valid.txt"), samples=16, seqlen=512,
                     seed=args.seed, dtype="float32", eval=str(args.data / "test.txt"), eval_windows=8)
    given = {k: None for k in PRESET_KEYS} | dict(method="dart", hessians="sequential", asym_calib=True,
                                                   refit_scales=3, w_symmetric=False)
    cfg, _ = build_config(base, "w4a16", given)
    pipeline = tuned_pipeline(args)
    start = time.perf_counter()
    report = pipeline(prepare(cfg)).run()
    blocks = pipeline.blocks
    summary = {
        "bench": "block_tune", "seed": args.seed, "steps": args.steps, "batch": args.batch,
        "lr_scales": args.lr_scales, "lr_codes": args.lr_codes, "held": args.held,
        "ppl": round(report["ppl"], 3), "seconds": round(time.perf_counter() - start, 1),
        "blocks_kept": sum(b["kept"] for b in blocks),
        "train_loss_change": round(sum(b["train_final"] / b["train_init"] - 1 for b in blocks) / len(blocks), 4),
        "held_loss_change": (round(sum(b["held_final"] / b["held_init"] - 1 for b in blocks) / len(blocks), 4)
                             if args.held else None),
    }
    print(json.dumps(summary))
    record(args, summary, blocks)


def record(args, summary: dict, blocks: list[dict]) -> None:
    """Append the run to RESULTS.md: one table row, and each block's calibration (and held-out) loss before → after."""
    held = f"{summary['held_loss_change']:+.1%}" if args.held else "—"
    table = ("| seed | steps | batch | lr scales | lr codes | held-out windows | blocks kept | calib block loss | "
             "held-out block loss | PPL | s |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
             f"| {args.seed} | {args.steps} | {args.batch} | {args.lr_scales:g} | {args.lr_codes:g} | {args.held} | "
             f"{summary['blocks_kept']}/{len(blocks)} | {summary['train_loss_change']:+.1%} | {held} | "
             f"{summary['ppl']:.2f} | {summary['seconds']:.0f} |")
    per_block = [f"{b['block']}: calib {b['train_init']:.4g} -> {b['train_final']:.4g}"
                 + (f", held-out {b['held_init']:.4g} -> {b['held_final']:.4g}" if args.held else "")
                 + ("" if b["kept"] else " (dropped)") for b in blocks]
    append_results("Block-output tuning after GPTQ (best W4A16 dart options)", table,
                   summary | {"blocks": per_block})


if __name__ == "__main__":
    main()
