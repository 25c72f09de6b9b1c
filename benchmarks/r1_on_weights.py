"""Could a weight-only scheme's R1 be learned on the weights it rotates? Group-64 INT4 RTN error of the linears
that read the residual stream, with R1 the identity, QuaRot's random Hadamard, or a Whip/QR-Orth fit on those
linears' own rows.

At W4A16 nothing quantizes activations, so R1's only work is on q/k/v/gate/up's input dimension (where their
quantization groups lie): a row w of W becomes w @ R1, exactly as an activation row does. This fits R1 with
`train_r1` (the pipeline's own fit) on every such row of the norm-fused model, each scaled to RMS 1 (the
Whip loss is scale-dependent), and reports each linear's relative error ‖Q(W R) − W R‖² / ‖W‖², averaged over the
linears (min-max asymmetric groups of 64, the best W4A16 options' grid).
    python benchmarks/r1_on_weights.py --model smollm2-135m --lrs 1e-3 1e-2
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


def residual_readers(model_dir: Path) -> list[torch.Tensor]:
    """The linears R1 rotates on their input side (Llama: q/k/v, gate/up) with their norm's σ fused in, block by
    block from the checkpoint's shards, in fp64."""
    from streamquant.rotate.fuse import fuse_norms
    from streamquant.shards import ShardIndex
    from streamquant.spec import read_spec

    spec = read_spec(model_dir)
    index = ShardIndex(model_dir, spec)
    names = [name for nm in spec.arch.norms for name in nm.readers]
    mats = []
    for i in range(spec.num_layers):
        block = fuse_norms({k: v.double() for k, v in index.load_block(i).items()}, spec.arch)
        mats += [block[f"{name}.weight"] for name in names]
    return mats


def rtn_error(w: torch.Tensor) -> float:
    """Relative squared error of streamquant's round-to-nearest, asymmetric 4-bit groups of 64 (input dimension)."""
    from streamquant.quant.quantizers import WeightQuantConfig, fake_quantize_weight

    err = fake_quantize_weight(w, WeightQuantConfig(bits=4, group_size=64, symmetric=False)) - w
    return float(err.pow(2).sum() / w.pow(2).sum())


def mean_error(mats: list[torch.Tensor], r: torch.Tensor) -> float:
    return sum(rtn_error(w @ r) for w in mats) / len(mats)


def main() -> None:
    from streamquant.kernels.hadamard import random_hadamard_matrix
    from streamquant.rotate.dart import R1_CONFIG, train_r1
    from streamquant.source import resolve_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 1e-2])
    args = p.parse_args()

    mats = residual_readers(resolve_model(args.model))
    n = mats[0].shape[1]
    hadamard = random_hadamard_matrix(n, args.seed)
    rows = torch.cat([w / w.pow(2).mean(1, keepdim=True).sqrt() for w in mats]).float()
    results = [{"r1": "identity", "rtn_error": mean_error(mats, torch.eye(n, dtype=torch.float64))},
               {"r1": "random Hadamard (QuaRot)", "rtn_error": mean_error(mats, hadamard)}]
    for lr in args.lrs:
        t0 = time.perf_counter()
        fit = train_r1(rows, n, replace(R1_CONFIG, lr=lr, seed=args.seed), args.seed)   # starts at `hadamard`
        results.append({"r1": f"Whip fit on the weight rows, lr {lr:g}", "rtn_error": mean_error(mats, fit.rotation),
                        "whip": [fit.init_loss, fit.final_loss], "steps": fit.steps,
                        "seconds": time.perf_counter() - t0})
    base = results[1]["rtn_error"]
    table = ["| R1 | relative RTN error (g64, 4-bit asym) | vs Hadamard | Whip (init → final) |", "|---|---|---|---|"]
    for r in results:
        whip = f"{r['whip'][0]:.1f} → {r['whip'][1]:.1f}" if "whip" in r else ""
        table.append(f"| {r['r1']} | {r['rtn_error']:.6f} | {r['rtn_error'] / base - 1:+.2%} | {whip} |")
    payload = {"model": args.model, "linears": len(mats), "rows": rows.shape[0], "results": results}
    append_results(f"R1 fitted on the weights it rotates (weight-only): {args.model}", "\n".join(table), payload)
    print(json.dumps(payload))


if __name__ == "__main__":
    main()
