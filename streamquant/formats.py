"""Output formats: which tensors a finished output holds under which names, and what its config.json says.

- `pack-quantized` (weight-only runs: R1/R2 fused, no online transform): compressed-tensors' layout and
  `quantization_config`, so transformers (with compressed-tensors) and vLLM load it directly.
  With `--r4-online` it also carries R4 as a compressed-tensors `transform_config` (one `random-hadamard` group
  `R4`, online `input` on down_proj; its inverse is already fused) and the dense transform weight per down_proj;
  with symmetric per-token int8 activations (`--a-bits 8 --a-symmetric --a-clip 1`) it is W4A8.
- `int-quantized` (W8A8): symmetric 8-bit weights (`weight` int8 + `weight_scale`), dynamic symmetric per-token
  int8 activations, optional R4 as above.
- `streamquant` (what no standard format expresses: R3, KV quantization, asymmetric or clipped activations): the
  same packed tensors, and a `streamquant` section in config.json describing the runtime instead, since a loader
  that ignored it would compute wrong outputs; `streamquant eval` runs it.
Naming only: the tensors arrive as values (`streamquant.quantized`), and `streamquant.writer` stores what this
module names.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch

from streamquant.kernels.hadamard import OnlineHadamard
from streamquant.qblock import Runtime
from streamquant.quant.pack import (compressed_tensors_input_args, compressed_tensors_weight_args,
                                    from_compressed_tensors, from_int_quantized, to_compressed_tensors,
                                    to_int_quantized, to_transform_weight)
from streamquant.quant.quantizers import ActQuantConfig, WeightQuantConfig, dequantize_weight
from streamquant.quantized import QuantizedBlock
from streamquant.spec import ModelSpec

FORMATS = ("auto", "pack-quantized", "int-quantized", "streamquant")
COMPRESSED_TENSORS = ("pack-quantized", "int-quantized")   # formats transformers (+ compressed-tensors) and vLLM read
R4_GROUP = "R4"                    # transform_config group name; the stored weight is <down_proj>.R4_input.weight
RUNTIMES_NOTE = ("transform_config holds online transforms: vLLM (tensor parallel size 1) and streamquant.load(path) "
                 "apply them; transformers' from_pretrained ignores transform_config and computes wrong outputs")


def exportable_activations(act: ActQuantConfig) -> bool:
    """Whether compressed-tensors expresses this activation quantizer: off, or int8 dynamic symmetric per token
    with no clip (see quant.pack.compressed_tensors_input_args)."""
    return not act.enabled or (act.bits == 8 and act.symmetric and act.clip_ratio == 1.0)


def resolve_format(name: str, w_bits: int, a_bits: int, kv_bits: int, a_exportable: bool = False,
                   o_online: bool = False) -> str:
    """W4A16 → compressed-tensors pack-quantized (runtimes load it); W8 or W4 with exportable int8 activations →
    int-quantized / pack-quantized; anything else with online parts (o_proj's Hadamard included) → our own."""
    if name != "auto":
        return name
    if kv_bits < 16 or w_bits >= 16 or o_online:
        return "streamquant"
    if a_bits >= 16 and w_bits == 4:
        return "pack-quantized"
    if a_exportable and w_bits in (4, 8):
        return "pack-quantized" if w_bits == 4 else "int-quantized"
    return "streamquant"


@dataclass(frozen=True)
class OutputFormat:
    name: str                              # "pack-quantized" | "int-quantized" | "streamquant"
    spec: ModelSpec
    weights: WeightQuantConfig | None      # None: linears stay 16-bit
    runtime: Runtime
    dtype: torch.dtype

    def block_tensors(self, block: QuantizedBlock) -> dict[str, torch.Tensor]:
        """One block under its checkpoint names: dense tensors as they are, quantized linears packed."""
        prefix = f"{self.spec.arch.layer_prefix}{block.index}."
        tensors = {prefix + name: t for name, t in block.dense.items()}
        for name, lin in block.linears.items():
            if self.name == "int-quantized":
                parts = to_int_quantized(lin.codes, lin.scale, lin.zero, lin.config)
            else:
                parts = to_compressed_tensors(lin.codes, lin.scale, lin.zero, lin.config, lin.shape)
            for key, t in parts.items():
                tensors[f"{prefix}{name}.{key}"] = t
        if self.stores_r4:
            tensors[f"{prefix}{r4_weight_name(self.spec)}"] = to_transform_weight(self.r4.matrix())
        return tensors

    @property
    def stores_r4(self) -> bool:
        """compressed-tensors formats carry an online R4 as a transform weight; ours re-creates it from the seed."""
        return self.name in COMPRESSED_TENSORS and self.runtime.r4_stored

    @property
    def r4(self) -> OnlineHadamard:
        """The R4 the run applies online (the same object type and seed as qblock.install_runtime)."""
        return OnlineHadamard(self.spec.dims()[self.spec.arch.linear(self.spec.arch.r4).inp], self.runtime.r4_seed)

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
        if self.name in COMPRESSED_TENSORS and wcfg is not None:
            act = self.runtime.act
            inputs = compressed_tensors_input_args(act.bits) if act.enabled else None
            cfg["quantization_config"] = {
                "quant_method": "compressed-tensors", "format": self.name, "quantization_status": "compressed",
                "config_groups": {"group_0": {"targets": ["Linear"], "weights": compressed_tensors_weight_args(wcfg),
                                              "input_activations": inputs, "output_activations": None,
                                              "format": self.name}},
                # 16-bit linears (a MoE router: `block_sparse_moe.gate`, as quantized Mixtral exports name it)
                "ignore": ["lm_head", *(f"re:.*{re.escape(n)}$" for n in self.spec.arch.unquantized)],
                "kv_cache_scheme": None,
            }
            if self.stores_r4:
                cfg["quantization_config"]["transform_config"] = r4_transform_config(self.spec)
                cfg["streamquant_online_transforms"] = {"R4": f"online input Hadamard on {self.spec.arch.r4} "
                                                              f"(seed {self.runtime.r4_seed})", "runtimes": RUNTIMES_NOTE}
        else:
            cfg["streamquant"] = {"format": self.name, "runtime": self.runtime.to_json(),
                                  "weights": None if wcfg is None else asdict(wcfg)}
        return cfg


def r4_weight_name(spec: ModelSpec) -> str:
    """Where compressed-tensors (and vLLM) keep the R4 transform weight, relative to the block: the transform is the
    submodule `<group>_<location>` of its Linear."""
    return f"{spec.arch.r4}.{R4_GROUP}_input.weight"


def r4_transform_config(spec: ModelSpec) -> dict:
    """compressed-tensors `transform_config` with R4 only: R1/R2 (and R4's inverse, `weight_input`) are fused into
    the weights already, so listing them would make a loader rotate twice. `random-hadamard`, not `hadamard`:
    vLLM applies `hadamard` with its own Sylvester kernel (powers of two, no signs), `random-hadamard` as the dense
    stored weight, which is the exact matrix of the run for any size (SmolLM2's 1536 = 12·128 included)."""
    return {"config_groups": {R4_GROUP: {
        "type": "random-hadamard",
        "apply": [{"targets": [f"re:.*{re.escape(spec.arch.r4)}$"], "location": "input", "inverse": False,
                   "ignore": []}],
        "randomize": False, "requires_grad": False, "head_dim": None, "precision": "float32"}}}


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
        elif wcfg is not None and raw.get(f"{name}.weight", torch.empty(0)).dtype == torch.int8:
            parts = {k.removeprefix(f"{name}."): raw.pop(k) for k in (f"{name}.weight", f"{name}.weight_scale")}
            q, scale, zero = from_int_quantized(parts)
            weights[f"{name}.weight"] = dequantize_weight(q, scale, zero, wcfg.group_size)
        raw.pop(f"{name}.{R4_GROUP}_input.weight", None)   # the runtime re-creates R4 from its seed (test_exports)
    return weights | raw
