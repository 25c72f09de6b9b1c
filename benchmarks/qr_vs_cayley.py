"""QR-Orth (SGD with momentum on a latent Z, R = qr_orth(Z)) versus Cayley SGD on the Stiefel manifold.

DartQuant's claim (arXiv 2511.04063): QR-Orth costs ~4/3 n³ per step against ~6 n³ extra for Cayley SGD and
converges faster. For each hidden size this script starts both from the same random Hadamard, feeds them the same
minibatches for the same number of steps, and reports the median seconds per step (after warmup) and the final
Whip loss on all activations. Activations are synthetic LLM-like rows (Laplace + massive-activation channels,
RMS-normalised) unless ``--activations file.safetensors`` gives real ones (any tensor whose last dim is the size).

Prints one JSON object as the last stdout line and appends a markdown section to benchmarks/RESULTS.md.

    python benchmarks/qr_vs_cayley.py --sizes 576 4096 8192 --steps 50 --tokens 16384 --device auto
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from streamquant.kernels.hadamard import random_hadamard_matrix
from streamquant.rotate.dart import cayley_sgd_step, qr_orth, whip_loss

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
CPU_MAX_N = 4096  # above this a CPU run of QR/Cayley steps takes minutes per step


def llm_like(n_tokens: int, n: int, seed: int, n_outliers: int = 4) -> torch.Tensor:
    """Post-RMSNorm-like rows: Laplace (variance 1) plus a few massive-activation channels (20-50x scale, same-sign
    offset), each row normalised to RMS 1. fp32, CPU."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n_tokens, n, generator=g) - 0.5
    x = -torch.sign(u) * torch.log1p(-2 * u.abs()) / math.sqrt(2)
    channels = torch.randperm(n, generator=g)[:n_outliers]
    scale = 20 + 30 * torch.rand(n_outliers, generator=g)
    x[:, channels] = x[:, channels] * scale + scale
    return x / x.pow(2).mean(dim=-1, keepdim=True).sqrt()


def load_activations(path: str, n: int, max_tokens: int) -> torch.Tensor | None:
    """All tensors in the file whose last dim is n, flattened to rows and concatenated (first max_tokens rows)."""
    from safetensors import safe_open

    rows = []
    with safe_open(path, framework="pt") as f:
        for key in f.keys():
            shape = f.get_slice(key).get_shape()
            if shape and shape[-1] == n:
                rows.append(f.get_tensor(key).reshape(-1, n).float())
    return torch.cat(rows)[:max_tokens] if rows else None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def full_loss(x: torch.Tensor, r: torch.Tensor, chunk: int = 4096) -> float:
    """Whip loss (sum over the n channels, mean over tokens) of all rows, in fp32 chunks."""
    total = sum(torch.exp(-(x[i : i + chunk] @ r).abs()).sum().item() for i in range(0, x.shape[0], chunk))
    return total / x.shape[0]


def run_qr(x, init, batches, lr, momentum, device):
    z = init.clone().requires_grad_(True)
    opt = torch.optim.SGD([z], lr=lr, momentum=momentum)
    times = []
    for idx in batches:
        sync(device)
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        whip_loss(x[idx] @ qr_orth(z)).backward()
        opt.step()
        sync(device)
        times.append(time.perf_counter() - t)
    with torch.no_grad():
        return qr_orth(z.detach()), times


def run_cayley(x, init, batches, lr, momentum, device):
    r, buf = init.clone(), None
    times = []
    for idx in batches:
        sync(device)
        t = time.perf_counter()
        rg = r.requires_grad_(True)
        whip_loss(x[idx] @ rg).backward()
        with torch.no_grad():
            r, buf = cayley_sgd_step(rg.detach(), rg.grad, buf, lr=lr, momentum=momentum)
        sync(device)
        times.append(time.perf_counter() - t)
    return r, times


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {cpu}, {torch.get_num_threads()} torch threads"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[576, 4096, 8192])
    p.add_argument("--steps", type=int, default=50, help="optimizer steps per method (warmup included)")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing")
    p.add_argument("--tokens", type=int, default=16384, help="activation rows per size")
    p.add_argument("--batch", type=int, default=256, help="rows per step")
    p.add_argument("--qr-lr", type=float, default=1e-3)
    p.add_argument("--cayley-lr", type=float, default=1e-3)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--allow-slow", action="store_true", help=f"run sizes > {CPU_MAX_N} on CPU too")
    p.add_argument("--activations", default=None, help=".safetensors with real activations [..., n]")
    p.add_argument("--results", default=str(RESULTS), help="markdown file to append to")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.warmup >= args.steps:
        p.error("--warmup must be smaller than --steps")

    out: dict[str, dict] = {}
    for n in args.sizes:
        if device.type == "cpu" and n > CPU_MAX_N and not args.allow_slow:
            out[str(n)] = {"skipped": f"n={n} on CPU: n×n QR/Cayley steps take minutes; use CUDA or --allow-slow"}
            print(f"[n={n}] skipped: {out[str(n)]['skipped']}", file=sys.stderr)
            continue
        if args.activations:
            x = load_activations(args.activations, n, args.tokens)
            if x is None:
                out[str(n)] = {"skipped": f"no tensor with last dim {n} in {args.activations}"}
                continue
            source = "real"
        else:
            x, source = llm_like(args.tokens, n, args.seed), "synthetic"
        x = x.to(device)
        init = random_hadamard_matrix(n, args.seed).to(device=device, dtype=torch.float32)
        g = torch.Generator().manual_seed(args.seed)
        batches = [torch.randint(0, x.shape[0], (args.batch,), generator=g).to(device) for _ in range(args.steps)]

        init_loss = full_loss(x, init)
        r_qr, t_qr = run_qr(x, init, batches, args.qr_lr, args.momentum, device)
        r_cay, t_cay = run_cayley(x, init, batches, args.cayley_lr, args.momentum, device)
        eye = torch.eye(n, device=device, dtype=torch.float64)
        res = {
            "data": source,
            "tokens": x.shape[0],
            "init_loss": init_loss,
            "qr_loss": full_loss(x, r_qr),
            "cayley_loss": full_loss(x, r_cay),
            "qr_sec_per_step": statistics.median(t_qr[args.warmup :]),
            "cayley_sec_per_step": statistics.median(t_cay[args.warmup :]),
            "cayley_orth_err": (r_cay.double().T @ r_cay.double() - eye).abs().max().item(),
        }
        out[str(n)] = res
        print(f"[n={n}] " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()),
              file=sys.stderr)
        del x, batches, r_qr, r_cay
        if device.type == "cuda":
            torch.cuda.empty_cache()

    append_markdown(Path(args.results), args, device, out, argv)
    print(json.dumps(out))
    return out


def append_markdown(path: Path, args, device: torch.device, out: dict, argv: list[str] | None) -> None:
    """Append (never overwrite) one section: command line, device, a table."""
    given = sys.argv[1:] if argv is None else argv
    cmd = "python benchmarks/qr_vs_cayley.py " + " ".join(shlex.quote(a) for a in given)
    lines = [
        f"\n## qr_vs_cayley — {time.strftime('%Y-%m-%d %H:%M:%S')}\n",
        f"- command: `{cmd}`",
        f"- device: {device_name(device)}; torch {torch.__version__}",
        f"- {args.steps} steps each ({args.warmup} warmup not timed), batch {args.batch} rows, SGD momentum "
        f"{args.momentum}, lr QR-Orth {args.qr_lr} / Cayley {args.cayley_lr}, same random-Hadamard init and batches; "
        "whip loss = mean over tokens of Σ exp(-|y_i|) over all rows\n",
        "| n | data | tokens | QR s/step | Cayley s/step | Cayley/QR time | init loss | QR loss | Cayley loss "
        "| Cayley ‖RᵀR−I‖∞ |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, r in out.items():
        if "skipped" in r:
            lines.append(f"| {n} | skipped: {r['skipped']} | | | | | | | | |")
            continue
        lines.append(
            f"| {n} | {r['data']} | {r['tokens']} | {r['qr_sec_per_step']:.4g} | {r['cayley_sec_per_step']:.4g} | "
            f"{r['cayley_sec_per_step'] / r['qr_sec_per_step']:.2f}× | {r['init_loss']:.2f} | {r['qr_loss']:.2f} | "
            f"{r['cayley_loss']:.2f} | {r['cayley_orth_err']:.1e} |"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", encoding="utf-8") as f:
        if new:
            f.write("# Benchmark results\n\nAppended by the scripts in benchmarks/; newest sections last.\n")
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
