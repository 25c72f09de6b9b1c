"""Safetensors shards read lazily (fast: tiny tensors written here, no model, no subprocess)."""
from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch
from safetensors.torch import save_file

from streamquant.errors import UserError
from streamquant.shards import BlockPrefetcher, ShardIndex, read_header
from streamquant.spec import read_spec

CONFIG = dict(model_type="llama", hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=2,
              num_key_value_heads=1, head_dim=8, vocab_size=32)


def checkpoint(tmp_path, split_at: int = 14) -> tuple[dict[str, torch.Tensor], object]:
    """A 3-block checkpoint in two shards cut inside block 1, with an index, as save_pretrained writes them."""
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    spec = read_spec(tmp_path)
    gen = torch.Generator().manual_seed(0)
    tensors = {"model.embed_tokens.weight": torch.randn(32, 16, generator=gen),
               "model.norm.weight": torch.randn(16, generator=gen), "lm_head.weight": torch.randn(32, 16, generator=gen)}
    for i in range(3):
        tensors |= {f"model.layers.{i}.{k}": torch.randn(s, generator=gen) for k, s in spec.block_shapes().items()}
    names = list(tensors)
    shards = {"model-1.safetensors": names[:split_at], "model-2.safetensors": names[split_at:]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(tmp_path / file))
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    return tensors, spec


def test_blocks_are_read_exactly_across_shards(tmp_path):
    tensors, spec = checkpoint(tmp_path)
    index = ShardIndex(tmp_path, spec)
    assert len({e.file for e in index.blocks[1].values()}) == 2          # block 1 straddles the two files
    for i in range(3):
        block = index.load_block(i)
        assert sorted(block) == sorted(spec.block_shapes())
        assert all(torch.equal(block[k], tensors[f"model.layers.{i}.{k}"]) for k in block)
    assert index.block_bytes(0) == sum(t.numel() * 4 for k, t in tensors.items() if k.startswith("model.layers.0."))
    norm, head = index.load_head()
    assert torch.equal(norm, tensors["model.norm.weight"]) and torch.equal(head, tensors["lm_head.weight"])


def test_prefetch_iterator_yields_in_order_and_keeps_nothing(tmp_path):
    """The caller holds block i; the iterator itself must hold no reference, or blocks would pile up."""
    tensors, spec = checkpoint(tmp_path)
    seen, alive = [], []
    with BlockPrefetcher(ShardIndex(tmp_path, spec)) as prefetch:
        for i, weights in prefetch.blocks(start=1):
            seen.append(i)
            assert torch.equal(weights["mlp.up_proj.weight"], tensors[f"model.layers.{i}.mlp.up_proj.weight"])
            ref = weakref.ref(weights["mlp.up_proj.weight"])
            del weights
            gc.collect()
            alive.append(ref() is not None)
        assert prefetch.io_seconds.keys() >= {1, 2}
    assert seen == [1, 2] and not any(alive)


def test_header_that_disagrees_with_config_is_named(tmp_path):
    tensors, spec = checkpoint(tmp_path)
    cfg = dict(CONFIG, intermediate_size=20)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight has shape \[24, 16\], config.json implies \[20, 16\]"):
        ShardIndex(tmp_path, read_spec(tmp_path))


def test_truncated_shard_is_named_before_any_read(tmp_path):
    checkpoint(tmp_path)
    path = tmp_path / "model-2.safetensors"
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(UserError, match="model-2.safetensors is truncated"):
        read_header(path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_all_finite_agrees_with_isfinite(dtype):
    """The min/max check against torch.isfinite on every kind of bad value, at the start, middle and end."""
    from streamquant.shards import all_finite

    base = torch.randn(1000, 37, generator=torch.Generator().manual_seed(0)).to(dtype)
    assert all_finite(base) and all_finite(base[:0]) and all_finite(torch.arange(5))
    for bad in (float("nan"), float("inf"), float("-inf")):
        for at in (0, 18_500, base.numel() - 1):
            t = base.clone().reshape(-1)
            t[at] = bad
            assert all_finite(t.view(1000, 37)) == bool(torch.isfinite(t).all()) == False   # noqa: E712


class _ThreadCountReader:
    """A BlockReader that records how many OpenMP threads torch gives the thread reading each block."""

    def __init__(self, spec):
        self.spec, self.threads = spec, []

    def load_block(self, i: int, pin: bool = False) -> dict[str, torch.Tensor]:
        x = torch.randn(1 << 20)
        torch.aminmax(x)   # a parallel op, as the real read's NaN check
        self.threads.append(torch.get_num_threads())
        return {"x": x}


def test_read_ahead_thread_runs_serially_and_leaves_the_main_threads_alone(tmp_path):
    """The read-ahead thread's ops run on itself (a second OpenMP team on a busy CPU throttles every team's
    spin-wait: R2's small QRs ran 8× slower beside it), while the main thread keeps its thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)   # something to keep, even on a 1-core runner
    try:
        reader = _ThreadCountReader(checkpoint(tmp_path)[1])
        with BlockPrefetcher(reader) as prefetch:
            for _ in prefetch.blocks():
                pass
        assert reader.threads == [1] * reader.spec.num_layers
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
