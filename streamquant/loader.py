"""`streamquant.load(path)`: an export as a transformers model that computes what the run computed.

transformers (with compressed-tensors) loads `pack-quantized` and `int-quantized` weights and their dynamic
activation quantizers, but it drops a `transform_config` without a word (transformers 5.x builds its
`CompressedTensorsConfig` without it) and then computes wrong outputs: R4's inverse is fused into down_proj, the
online R4 that cancels it is missing. `load` loads the model with transformers, then attaches every online transform
with compressed-tensors' own `HadamardTransform` and forward hook (the code vLLM's layout mirrors), using the
transform weights stored in the checkpoint, and refuses a load in which any tensor is missing or left unused.
It also loads zero points (`--w-asym`), which plain transformers refuses: see `packed_zero_point_shapes`.
Requires `compressed-tensors` (`pip install 'streamquant[export]'`).
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from torch import nn

from streamquant.errors import UserError

__all__ = ["load", "ONLINE_LOCATIONS"]

ONLINE_LOCATIONS = ("input",)      # what this loader attaches (all that streamquant exports write)


def load(path: str | Path, **from_pretrained: object) -> nn.Module:
    """Load a streamquant export (`pack-quantized`/`int-quantized`, with or without R4 online) with transformers
    and attach its online transforms. Keyword arguments go to `AutoModelForCausalLM.from_pretrained` (e.g.
    `dtype=torch.float32`). Raises UserError for the private `streamquant` format (evaluate it with
    `streamquant eval`) and for any checkpoint tensor that is missing or lands nowhere."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    if "streamquant" in config:
        raise UserError(f"{path} is in the streamquant format (online R3/R4, KV or asymmetric activation "
                        f"quantizers that no standard runtime expresses): evaluate it with `streamquant eval {path}`")
    tcfg = (config.get("quantization_config") or {}).get("transform_config") or None
    with packed_zero_point_shapes():
        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **from_pretrained)
    consumed = attach_transforms(model, tcfg, path) if tcfg else set()
    problems = {"missing": sorted(info.get("missing_keys", ())),
                "unexpected": sorted(set(info.get("unexpected_keys", ())) - consumed),
                "mismatched": sorted(str(k) for k in info.get("mismatched_keys", ()))}
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        raise UserError(f"{path} does not load cleanly: " + "; ".join(f"{k} {v[:3]}{' …' if len(v) > 3 else ''}"
                                                                      for k, v in problems.items()))
    model.streamquant_transforms = sorted(consumed)   # what was attached, for a caller to check
    return model.eval()


@contextmanager
def packed_zero_point_shapes() -> Iterator[None]:
    """While it is open, compressed-tensors' `pack-quantized` compressor gives an empty (meta) module a packed zero
    point of the shape its checkpoints store.

    transformers builds the model on the meta device and compresses it before loading. compressed-tensors (0.20.1,
    the newest) packs zero points along the output dimension when it writes a checkpoint (`[ceil(out·bits/32),
    groups]` int32) but leaves a meta module's zero point unpacked (`[out, groups]`). Every asymmetric checkpoint,
    ours and llm-compressor's, is then refused as a size mismatch. Decompression already unpacks the stored shape,
    so only the empty shape needs fixing; a release that fixes this gives shapes this leaves alone."""
    from compressed_tensors.compressors.pack_quantized.base import PACK_ZP_STRATS, PackedQuantizationCompressor

    original = PackedQuantizationCompressor.__dict__["compress"]

    def compress(cls, state_dict, scheme):
        out = original.__func__(cls, state_dict, scheme)
        zero_point, weights = out.get("weight_zero_point"), scheme.weights
        if (zero_point is not None and zero_point.device.type == "meta" and not weights.symmetric
                and weights.strategy in PACK_ZP_STRATS and zero_point.shape[0] == out["weight_packed"].shape[0]):
            rows = math.ceil(zero_point.shape[0] * weights.num_bits / 32)
            out["weight_zero_point"] = torch.empty((rows, *zero_point.shape[1:]), dtype=torch.int32, device="meta")
        return out

    PackedQuantizationCompressor.compress = classmethod(compress)
    try:
        yield
    finally:
        PackedQuantizationCompressor.compress = original


def attach_transforms(model: nn.Module, tcfg: dict, path: Path) -> set[str]:
    """Attach the online transforms of `transform_config` with their stored weights; return the checkpoint keys
    they used. Offline ones (`weight_input`, `weight_output`) are refused: streamquant fuses them before writing,
    so listing them would rotate twice."""
    from compressed_tensors.transform import HadamardFactory, TransformConfig
    from compressed_tensors.transform.factory.hadamard import HadamardTransform
    from compressed_tensors.utils import match_named_modules

    config = TransformConfig.model_validate(tcfg)
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    used: set[str] = set()
    for group, scheme in config.config_groups.items():
        if scheme.type not in ("hadamard", "random-hadamard") or scheme.randomize or scheme.head_dim is not None:
            raise UserError(f"transform group {group!r}: only dense (random-)hadamard transforms without "
                            f"randomize/head_dim are supported (got type {scheme.type!r})")
        stored: dict[int, torch.Tensor] = {}
        for args in scheme.apply:
            if args.location not in ONLINE_LOCATIONS:
                raise UserError(f"transform group {group!r}: location {args.location!r} is not an online input "
                                f"transform (streamquant fuses offline transforms before writing)")
            for name, module in match_named_modules(model, args.targets, args.ignore):
                key = f"{name}.{group}_{args.location}.weight"
                if key not in weight_map:
                    raise UserError(f"{path}: transform weight {key} is missing")
                with safe_open(str(path / weight_map[key]), framework="pt") as fh:
                    stored[id(module)] = fh.get_tensor(key)
                used.add(key)

        class StoredHadamardFactory(HadamardFactory):
            """compressed-tensors' factory, but each transform gets its module's stored weight instead of a
            generated one (its generator would draw other signs, and it builds no size without a known block)."""

            def create_transform(self, module: nn.Module, args) -> HadamardTransform:
                weight = nn.Parameter(stored[id(module)].to(self.scheme.precision), requires_grad=False)
                return HadamardTransform(weight, None, self.scheme, args, type(module))

        StoredHadamardFactory(group, scheme).apply_to_model(model, use_tqdm=False)
    return used
