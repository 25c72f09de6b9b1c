"""A checkpoint seen through its rotations: per block fuse σ → R1 → R2 → R4, with R3/R4 applied online."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from streamquant.arch import ArchMap
from streamquant.kernels.hadamard import OnlineHadamard
from streamquant.device import full_fp32_matmuls, rotation_dtype
from streamquant.qblock import Runtime, install_runtime, qlinears
from streamquant.quant.quantizers import WeightQuantConfig, dequantize_weight, quantize_weight
from streamquant.rotate.fuse import fuse_embedding, fuse_head, fuse_norms, fuse_online_input, fuse_r1, fuse_r2
from streamquant.shards import BlockPrefetcher, ShardIndex
from streamquant.spec import ModelSpec
from streamquant.stream import Engine, to_device_ahead

Codes = dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]   # linear -> (int codes, scale, zero)


@dataclass
class Rotations:
    r1: torch.Tensor | None                 # [hidden, hidden] float64; None = identity
    r2: list[torch.Tensor] | None           # per layer [kv_heads, head_dim, head_dim] float64; None = identity
    runtime: Runtime                        # online R3/R4 and activation/KV quantizers


def rotate_block(weights: dict[str, torch.Tensor], spec: ModelSpec, r1: torch.Tensor | None,
                 r2: torch.Tensor | None, r4_seed: int | None, device: torch.device | None = None,
                 dtype: torch.dtype | None = None, linears: tuple[str, ...] | None = None,
                 o_seed: int | None = None) -> dict[str, torch.Tensor]:
    """Exact (function-preserving) rewrite of one block's weights, one Linear at a time and cast back once, so the
    working set is one matrix (1.9 GB in fp64 for a 70B down_proj), not the block (6.9 GB). `linears` limits the
    rewrite to those (the norms and pass-through tensors come along).

    The result lands on `device` (default: the CPU) in the stored dtypes, computed in `dtype` (default: the
    policy's rotation_dtype for that device); on CUDA each Linear's copy overlaps the previous one's fusion.
    `o_seed`: o_proj's online Hadamard (Runtime.o_seed), fused after R2."""
    arch = spec.arch
    device = torch.device("cpu") if device is None else device
    dtype = rotation_dtype(device) if dtype is None else dtype
    norms = {name: weights[f"{name}.weight"].to(device=device, dtype=dtype) for name in arch.norm_names}
    out = {f"{name}.weight": torch.ones_like(t, dtype=weights[f"{name}.weight"].dtype) for name, t in norms.items()}
    out |= {name: weights[name] for name, _ in arch.passthrough}
    r1 = None if r1 is None else r1.to(device=device, dtype=dtype)
    r2 = None if r2 is None else r2.to(device=device, dtype=dtype)
    r4 = OnlineHadamard(spec.dims()[arch.linear(arch.r4).inp], r4_seed) if r4_seed is not None else None
    ho = OnlineHadamard(spec.dims()[arch.linear(arch.r2_output).inp], o_seed) if o_seed is not None else None
    parts = ({k: v for k, v in weights.items() if k.startswith(linear + ".")} for linear in arch.linear_names
             if linears is None or linear in linears)
    with full_fp32_matmuls():
        for part in to_device_ahead(parts, device):
            w = fuse_norms({k: v.to(dtype) for k, v in part.items()} | {f"{n}.weight": t for n, t in norms.items()},
                           arch)
            if r1 is not None:
                w = fuse_r1(w, r1, arch)
            if r2 is not None:
                w = fuse_r2(w, r2, spec)
            if r4 is not None:
                w = fuse_online_input(w, r4, arch.r4_names)
            if ho is not None:
                w = fuse_online_input(w, ho, (arch.r2_output,))
            out |= {k: w[k].to(weights[k].dtype).contiguous() for k in part}
    return out


def build_rotated_layer(engine: Engine, index: int, weights: dict[str, torch.Tensor], runtime: Runtime) -> nn.Module:
    """transformers' layer holding rotated weights, with the online transforms and quantizers installed."""
    return install_runtime(engine.build_layer(index, weights), engine.spec, runtime)


def quantize_layer_rtn(layer: nn.Module, arch: ArchMap, cfg: WeightQuantConfig,
                       names: tuple[str, ...] | None = None) -> Codes:
    """Round-to-nearest on every quantized Linear of a built rotated layer (or only `names`; the layer then
    computes with the dequantized weights); returns the integer codes, scales and zeros for the writer."""
    codes: Codes = {}
    for name, ql in qlinears(layer, arch).items():
        if names is not None and name not in names:
            continue
        q, scale, zero = quantize_weight(ql.weight.data, cfg)
        codes[name] = (q, scale, zero)
        ql.weight.data = dequantize_weight(q, scale, zero, cfg.group_size).to(ql.weight.dtype)
    return codes


class RotatedSource:
    """Streams an original checkpoint as its rotated (optionally RTN-quantized) equivalent, block by block."""

    def __init__(self, index: ShardIndex, rotations: Rotations, weight_cfg: WeightQuantConfig | None = None):
        self.index, self.spec, self.rot, self.weight_cfg = index, index.spec, rotations, weight_cfg

    def embedding(self) -> torch.Tensor:
        table = self.index.load_embedding()
        return table if self.rot.r1 is None else fuse_embedding(table, self.rot.r1)

    def layers(self, engine: Engine) -> Iterator[tuple[int, nn.Module]]:
        with BlockPrefetcher(self.index, pin=engine.pin) as prefetcher:
            for i, weights in prefetcher.blocks():
                r2 = None if self.rot.r2 is None else self.rot.r2[i]
                layer = build_rotated_layer(engine, i, rotate_block(weights, self.spec, self.rot.r1, r2,
                                                                    self.rot.runtime.r4_seed, engine.device,
                                                                    o_seed=self.rot.runtime.o_seed),
                                            self.rot.runtime)
                del weights
                if self.weight_cfg is not None:
                    quantize_layer_rtn(layer, self.spec.arch, self.weight_cfg)
                yield i, layer
                del layer

    def head(self) -> tuple[torch.Tensor, torch.Tensor]:
        norm_w, head_w = self.index.load_head()
        r1 = self.rot.r1 if self.rot.r1 is not None else torch.eye(self.spec.hidden_size, dtype=torch.float64)
        return fuse_head(norm_w, head_w, r1)
