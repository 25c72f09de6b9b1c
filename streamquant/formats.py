"""Output formats: which tensors a finished output holds under which names, and what its config.json says.

- `pack-quantized` (weight-only runs: R1/R2 fused, no online transform): compressed-tensors' layout and
  `quantization_config`, so transformers (with compressed-tensors) and vLLM load it directly.
- `streamquant` (activation or KV quantization: online R3/R4 and per-token quantizers at run time): the same packed
  tensors, and a `streamquant` section in config.json describing the runtime instead, since a loader that ignored
  it would compute wrong outputs; `streamquant eval` runs it.
Naming only: the tensors arrive as values (`streamquant.quantized`), and `streamquant.writer` stores what this
module names.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from streamquant.qblock import Runtime
from streamquant.quant.pack import compressed_tensors_weight_args, from_compressed_tensors, to_compressed_tensors
from streamquant.quant.quantizers import WeightQuantConfig, dequantize_weight
from streamquant.quantized import QuantizedBlock
from streamquant.spec import ModelSpec

FORMATS = ("auto", "pack-quantized", "streamquant")


def resolve_format(name: str, w_bits: int, a_bits: int, kv_bits: int) -> str:
    """W4A16 → compressed-tensors pack-quantized (runtimes load it); anything with online parts → our own."""
    if name != "auto":
        return name
    return "pack-quantized" if a_bits >= 16 and kv_bits >= 16 and w_bits < 16 else "streamquant"


@dataclass(frozen=True)
class OutputFormat:
    name: str                              # "pack-quantized" | "streamquant"
    spec: ModelSpec
    weights: WeightQuantConfig | None      # None: linears stay 16-bit
    runtime: Runtime
    dtype: torch.dtype

    def block_tensors(self, block: QuantizedBlock) -> dict[str, torch.Tensor]:
        """One block under its checkpoint names: dense tensors as they are, quantized linears packed."""
        prefix = f"{self.spec.arch.layer_prefix}{block.index}."
        tensors = {prefix + name: t for name, t in block.dense.items()}
        for name, lin in block.linears.items():
            for key, t in to_compressed_tensors(lin.codes, lin.scale, lin.zero, lin.config, lin.shape).items():
                tensors[f"{prefix}{name}.{key}"] = t
        return tensors

    def embedding_tensors(self, table: torch.Tensor) -> dict[str, torch.Tensor]:
        return {self.spec.arch.embed: table}

    def head_tensors(self, norm_weight: torch.Tensor, head_weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """Always both the final norm and lm_head: the embedding keeps E·R1 while lm_head got σ and R1."""
        return {self.spec.arch.final_norm: norm_weight, self.spec.arch.lm_head: head_weight}

    def config(self) -> dict:
        """config.json of the output: the source's, untied, with the quantization description of this format."""
        cfg = {k: v for k, v in self.spec.raw.items() if k != "quantization_config"}
        cfg["tie_word_embeddings"] = False  # the embedding keeps E·R1, lm_head got σ and R1: they differ now
        cfg["torch_dtype"] = str(self.dtype).removeprefix("torch.")
        wcfg = self.weights
        if self.name == "pack-quantized" and wcfg is not None:
            cfg["quantization_config"] = {
                "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
                "config_groups": {"group_0": {"targets": ["Linear"], "weights": compressed_tensors_weight_args(wcfg),
                                              "input_activations": None, "output_activations": None,
                                              "format": "pack-quantized"}},
                "ignore": ["lm_head"], "kv_cache_scheme": None,
            }
        else:
            cfg["streamquant"] = {"format": self.name, "runtime": self.runtime.to_json(),
                                  "weights": None if wcfg is None else asdict(wcfg)}
        return cfg


def weight_config(run: dict) -> WeightQuantConfig | None:
    """The weight quantizer an output was written with, from the run options its manifest records."""
    if run["w_bits"] >= 16:
        return None
    return WeightQuantConfig(run["w_bits"], run["group_size"], run["w_symmetric"])


def decode_block(raw: dict[str, torch.Tensor], spec: ModelSpec, wcfg: WeightQuantConfig | None
                 ) -> dict[str, torch.Tensor]:
    """A stored block (names relative to the block) back to dense weights: packed linears are dequantized."""
    raw = dict(raw)
    weights: dict[str, torch.Tensor] = {}
    for name in spec.arch.linear_names:
        if f"{name}.weight_packed" in raw:
            parts = {k.removeprefix(f"{name}."): raw.pop(k) for k in list(raw) if k.startswith(f"{name}.weight_")}
            q, scale, zero = from_compressed_tensors(parts, wcfg)
            weights[f"{name}.weight"] = dequantize_weight(q, scale, zero, wcfg.group_size)
    return weights | raw
