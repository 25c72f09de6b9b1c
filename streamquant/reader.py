"""Reading a finished streamquant output back: block by block, as a BlockSource `streamquant eval OUT` streams.

I/O only: tensor names and dequantization come from `streamquant.formats`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from torch import nn

from streamquant.errors import UserError
from streamquant.formats import decode_block, weight_config
from streamquant.manifest import EMBED_FILE, HEAD_FILE, block_file, read_manifest
from streamquant.qblock import Runtime, install_runtime
from streamquant.shards import BlockPrefetcher
from streamquant.spec import ModelSpec, read_spec
from streamquant.stream import Engine


def read_block(out: Path, i: int, spec: ModelSpec, manifest: dict) -> dict[str, torch.Tensor]:
    """A finished block as dense (dequantized) weights, names relative to the block."""
    prefix = f"{spec.arch.layer_prefix}{i}."
    try:
        with safe_open(str(out / block_file(i)), framework="pt") as fh:
            raw = {k.removeprefix(prefix): fh.get_tensor(k) for k in fh.keys()}
        return decode_block(raw, spec, weight_config(manifest["run"]))
    except UserError:
        raise
    except Exception as exc:   # safetensors' own error types, or tensors that no longer fit the format
        raise UserError(f"{out / block_file(i)} is corrupt ({str(exc).splitlines()[0]}); "
                        f"`streamquant verify {out}` checks every file") from exc


class OutputSource:
    """A finished streamquant output as a BlockSource: `streamquant eval OUT` streams it block by block."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.manifest = read_manifest(self.out)
        if not self.manifest.get("complete"):
            done, total = len(self.manifest.get("blocks", [])), self.manifest.get("num_layers", "?")
            raise UserError(f"{self.out} is an incomplete streamquant output ({done} of {total} blocks written); "
                            f"finish it with `streamquant run ... --out {self.out} --resume`")
        self.spec: ModelSpec = read_spec(self.out)
        self.runtime = Runtime.from_json(self.manifest["runtime"])

    def embedding(self) -> torch.Tensor:
        with safe_open(str(self.out / EMBED_FILE), framework="pt") as fh:
            return fh.get_tensor(self.spec.arch.embed)

    def load_block(self, i: int, pin: bool = False) -> dict[str, torch.Tensor]:
        weights = read_block(self.out, i, self.spec, self.manifest)
        return {k: v.pin_memory() for k, v in weights.items()} if pin else weights

    def layers(self, engine: Engine) -> Iterator[tuple[int, nn.Module]]:
        with BlockPrefetcher(self, pin=engine.pin) as prefetcher:   # read and unpack block i+1 while i computes
            for i, weights in prefetcher.blocks():
                layer = install_runtime(engine.build_layer(i, weights), self.spec, self.runtime)
                del weights
                yield i, layer
                del layer

    def head(self) -> tuple[torch.Tensor, torch.Tensor]:
        arch = self.spec.arch
        with safe_open(str(self.out / HEAD_FILE), framework="pt") as fh:
            return fh.get_tensor(arch.final_norm), fh.get_tensor(arch.lm_head)
