"""Streaming perplexity: the measurement every later stage is judged by."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

from streamquant.errors import UserError
from streamquant.data import eval_windows_of_text, load_tokenizer, read_text
from streamquant.device import pin_host_memory, resolve_device, resolve_dtype
from streamquant.memory import peak_gpu_bytes, peak_host_bytes, return_freed_memory_to_os
from streamquant.plan import micro_batch_for
from streamquant.shards import ShardIndex
from streamquant.source import resolve_model
from streamquant.spec import read_spec
from streamquant.manifest import MANIFEST
from streamquant.stream import BlockSource, CheckpointSource, Engine, stream_nll


def open_model(model: str) -> tuple[Path, BlockSource]:
    """Resolve a model name to a directory and a streaming source for it (original or streamquant output)."""
    model_dir = resolve_model(model)
    if (model_dir / MANIFEST).exists():
        from streamquant.reader import OutputSource  # local: only streamquant outputs need the quantized runtime

        return model_dir, OutputSource(model_dir)
    spec = read_spec(model_dir)
    return model_dir, CheckpointSource(ShardIndex(model_dir, spec))


def perplexity(model: str, data: str, seqlen: int, windows: int | None, dtype: str = "auto", device: str = "auto",
               micro_batch: int | None = None, on_progress: Callable[[str, int, int], None] | None = None) -> dict:
    """PPL = exp(mean over windows of each window's mean next-token NLL), streamed one block at a time."""
    if seqlen < 2:
        raise UserError(f"--seqlen must be at least 2 (got {seqlen})")
    start = time.perf_counter()
    return_freed_memory_to_os()
    model_dir, source = open_model(model)
    spec = source.spec
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    ids = eval_windows_of_text(load_tokenizer(model_dir), read_text(data), seqlen, windows)
    mb = micro_batch or micro_batch_for(seqlen, spec.hidden_size, spec.mlp_width, dt)
    engine = Engine(spec, dev, dt, mb, pin=pin_host_memory(dev))
    tick = None if on_progress is None else (lambda i: on_progress("eval", i + 1, spec.num_layers))
    nll = stream_nll(source, engine, ids, tick)
    return {
        "model": str(model_dir),
        "ppl": math.exp(float(nll.mean())),
        "nll": float(nll.mean()),
        "windows": int(ids.shape[0]),
        "seqlen": seqlen,
        "dtype": str(dt).removeprefix("torch."),
        "device": str(dev),
        "micro_batch": mb,
        "seconds": time.perf_counter() - start,
        "peak_host_bytes": peak_host_bytes(),
        "peak_gpu_bytes": peak_gpu_bytes(dev),
    }
