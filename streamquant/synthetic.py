"""Synthetic Llama checkpoints with real model shapes (Llama-2-70B by default), for memory/time benchmarks.

Weights are random but not innocent: a few residual channels are planted as outliers (large embedding columns and
o_proj/down_proj rows feeding them), so activations have the heavy-tailed, massive-channel look of a real LLM and
rotations have something to do. `sparse=True` writes only valid safetensors headers and leaves the data as a hole
in the file (nothing is allocated on disk), which is all the planner may read.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

from streamquant.arch import ARCHS, HEAD_DIM, HIDDEN, INTERMEDIATE, KV, Q

ARCH = ARCHS["llama"]

LLAMA2_70B = dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                  head_dim=128, vocab_size=32000, num_hidden_layers=80, rms_norm_eps=1e-5)


def scaled_shape(scale: int, layers: int) -> dict:
    """Every dimension divided by `scale` (head_dim kept, heads at least 1), `layers` decoder blocks."""
    s = dict(LLAMA2_70B)
    s["num_attention_heads"] = max(1, s["num_attention_heads"] // scale)
    s["num_key_value_heads"] = max(1, min(s["num_attention_heads"], s["num_key_value_heads"] // scale))
    s["hidden_size"] = s["num_attention_heads"] * s["head_dim"]
    s["intermediate_size"] = s["intermediate_size"] // scale
    s["vocab_size"] = s["vocab_size"] // scale
    s["num_hidden_layers"] = layers
    return s


def _config(shape: dict) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "max_position_embeddings": 4096, "rope_theta": 10000.0, "tie_word_embeddings": False,
            "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float16", **shape}


def _tensor_shapes(shape: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint, in the order the architecture map lists a block's tensors."""
    h, v, hd = shape["hidden_size"], shape["vocab_size"], shape["head_dim"]
    dims = {HIDDEN: h, INTERMEDIATE: shape["intermediate_size"], Q: shape["num_attention_heads"] * hd,
            KV: shape["num_key_value_heads"] * hd, HEAD_DIM: hd}
    out = {ARCH.embed: (v, h), ARCH.final_norm: (h,), ARCH.lm_head: (v, h)}
    for k in range(shape["num_hidden_layers"]):
        out |= {f"{ARCH.layer_prefix}{k}.{name}": s for name, s in ARCH.block_shapes(dims, ()).items()}
    return out


def _sparse_shard(path: Path, tensors: dict[str, tuple[int, ...]]) -> None:
    header, offset = {}, 0
    for name, shp in tensors.items():
        n = 2
        for d in shp:
            n *= d
        header[name] = {"dtype": "F16", "shape": list(shp), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fh.truncate(8 + len(raw) + offset)  # a hole: the file has its full size but no data blocks


def write_checkpoint(out: Path, shape: dict, seed: int = 0, sparse: bool = False, outliers: int = 4) -> Path:
    """A sharded fp16 checkpoint (one shard per block plus embedding/head shards) and a small BPE tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(_config(shape), indent=2))
    shapes = _tensor_shapes(shape)
    groups: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, shp in shapes.items():
        key = name.split(".")[2] if name.startswith(ARCH.layer_prefix) else ("embed" if name == ARCH.embed else "head")
        groups.setdefault(key, {})[name] = shp
    weight_map = {}
    gen = torch.Generator().manual_seed(seed)
    h = shape["hidden_size"]
    hot = torch.randperm(h, generator=gen)[:outliers]
    for key, tensors in groups.items():
        file = f"model-{key}.safetensors"
        weight_map |= {n: file for n in tensors}
        if sparse:
            _sparse_shard(out / file, tensors)
            continue
        data = {}
        for name, shp in tensors.items():
            if len(shp) == 1:
                t = 1 + 0.1 * torch.randn(shp, generator=gen)
            else:
                t = torch.randn(shp, generator=gen) / shp[1] ** 0.5
                if name == ARCH.embed:
                    t = 0.05 * t * shp[1] ** 0.5
                    t[:, hot] *= 40.0                     # massive activations in a few residual channels
                if name.endswith(tuple(f"{w}.weight" for w in ARCH.residual_writers)):
                    t[hot] *= 8.0
            data[name] = t.half()
        save_file(data, str(out / file), metadata={"format": "pt"})
        del data
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    from streamquant.data import read_text

    save_bpe_tokenizer(out, min(shape["vocab_size"], 4096), read_text("default"))
    return out


def save_bpe_tokenizer(out: Path, vocab: int, text: str) -> None:
    """A real byte-level BPE tokenizer trained on `text`, saved the way Hub models ship theirs (ids < vocab)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text.splitlines(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(out)
