"""The streaming engine: run all samples through one decoder block at a time.

Hidden states for every sample live in one host buffer [samples, seqlen, hidden]; a block's weights are built into
transformers' own decoder-layer class for the architecture, micro-batches move to the device, run, and come back.
Only the block being computed and the one being prefetched are ever materialised.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from streamquant.memory import release_host_memory
from streamquant.moe import install_experts
from streamquant.qblock import hf_config
from streamquant.shards import BlockPrefetcher, ShardIndex
from streamquant.spec import ModelSpec


def to_device_ahead(parts: Iterable[dict[str, torch.Tensor]],
                    device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """Yields each dict of tensors on `device`. On CUDA the copy of the next dict is issued on a side stream before
    the caller computes on the current one, so host->device transfers (true DMA from pinned memory) overlap compute
    and the device holds at most two parts, not a whole block. Elsewhere the tensors pass through unchanged."""
    if device.type != "cuda":
        yield from parts
        return
    side, main = torch.cuda.Stream(device), torch.cuda.current_stream(device)

    def issue(part: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.cuda.Event]:
        side.wait_stream(main)   # the side stream must not reuse memory the main stream is still reading
        with torch.cuda.stream(side):
            moved = {k: v.to(device, non_blocking=True) for k, v in part.items()}
            done = torch.cuda.Event()
            done.record(side)
        return moved, done

    queue = iter(parts)
    first = next(queue, None)
    pending = issue(first) if first is not None else None
    while pending is not None:
        moved, done = pending
        following = next(queue, None)
        pending = issue(following) if following is not None else None
        main.wait_event(done)
        for t in moved.values():
            t.record_stream(main)   # allocated on the side stream, consumed on main: keep it until main is done
        yield moved


def build_layer(config, spec: ModelSpec, index: int, weights: dict[str, torch.Tensor],
                dtype: torch.dtype, device: torch.device) -> nn.Module:
    """transformers' decoder layer for this architecture holding exactly `weights` (no random init, no copy kept)."""
    with torch.device("meta"):
        layer = spec.arch.hf_class("layer")(config, layer_idx=index)
        if spec.arch.moe is not None:
            install_experts(layer, spec)   # per-expert Linears under the checkpoint's names (streamquant.moe)
    state = {k: v.to(device=device, dtype=dtype, non_blocking=True) for k, v in weights.items()}
    layer.load_state_dict(state, strict=True, assign=True)
    layer.sq_window = spec.window(index)   # this layer's sliding window, for the engine's attention mask
    return layer.eval()


class StopForward(Exception):
    """Raised by a pre-hook once a pass has what it came for: the rest of the block is not computed."""


def _stop(module: nn.Module, args) -> None:
    raise StopForward


@dataclass
class Engine:
    """Micro-batched execution of blocks over a host buffer of hidden states."""

    spec: ModelSpec
    device: torch.device
    dtype: torch.dtype
    micro_batch: int
    pin: bool = False
    config: object = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.config is None:
            self.config = hf_config(self.spec)
        self._rotary = self.spec.arch.hf_class("rotary")(config=self.config).to(self.device)
        self._pos_cache: dict[int, tuple] = {}

    def build_layer(self, index: int, weights: dict[str, torch.Tensor]) -> nn.Module:
        return build_layer(self.config, self.spec, index, weights, self.dtype, self.device)

    def position_embeddings(self, seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
        if seqlen not in self._pos_cache:
            pos = torch.arange(seqlen, device=self.device)[None]
            probe = torch.empty(1, seqlen, 1, device=self.device, dtype=self.dtype)
            self._pos_cache[seqlen] = self._rotary(probe, pos)
        return self._pos_cache[seqlen]

    def layer_mask(self, layer: nn.Module, seqlen: int) -> torch.Tensor | None:
        """The mask of this layer: its own sliding window where the architecture windows layers one by one."""
        return self.attention_mask(seqlen, getattr(layer, "sq_window", self.spec.sliding_window))

    def attention_mask(self, seqlen: int, window: int | None) -> torch.Tensor | None:
        """None lets SDPA use its causal kernel; a sliding window shorter than the sequence needs an explicit mask."""
        if not window or seqlen <= window:
            return None
        i = torch.arange(seqlen, device=self.device)
        allowed = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
        mask = torch.zeros(seqlen, seqlen, device=self.device, dtype=self.dtype)
        return mask.masked_fill(~allowed, torch.finfo(self.dtype).min)[None, None]

    def new_buffer(self, samples: int, seqlen: int) -> torch.Tensor:
        buf = torch.empty(samples, seqlen, self.spec.hidden_size, dtype=self.dtype)
        return buf.pin_memory() if self.pin else buf

    def micro_batches(self, samples: int) -> Iterator[slice]:
        for start in range(0, samples, self.micro_batch):
            yield slice(start, min(samples, start + self.micro_batch))

    @torch.inference_mode()
    def embed(self, table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.new_buffer(*ids.shape)
        for sl in self.micro_batches(ids.shape[0]):
            hidden[sl] = F.embedding(ids[sl], table).to(self.dtype)
        return hidden

    @torch.inference_mode()
    def run_block(self, layer: nn.Module, hidden: torch.Tensor) -> None:
        """hidden <- layer(hidden), in place, micro-batch by micro-batch."""
        seqlen = hidden.shape[1]
        pos, mask = self.position_embeddings(seqlen), self.layer_mask(layer, seqlen)
        for sl in self.micro_batches(hidden.shape[0]):
            x = hidden[sl].to(self.device, non_blocking=True)
            y = layer(x, attention_mask=mask, position_embeddings=pos)
            hidden[sl].copy_(y[0] if isinstance(y, tuple) else y)

    @torch.inference_mode()
    def run_until(self, layer: nn.Module, hidden: torch.Tensor, stop_at: nn.Module | None = None, *,
                  beside: tuple[nn.Module, torch.Tensor, nn.Module | None, bool] | None = None) -> None:
        """Run the block over every sample for its hooks' sake, leaving `hidden` untouched; with `stop_at`, each
        micro-batch stops as soon as that module is about to run (hooks registered on it before still fire).
        `beside` (another block, its states, its stop module, whether to move its states) runs each micro-batch
        first, so that hooks on `layer` can pair every input with the other block's of the same rows (GPTAQ's
        targets) one micro-batch at a time; moving, it runs whole and its states become its output, in place (as
        run_block does)."""
        runs = ([beside] if beside is not None else []) + [(layer, hidden, stop_at, False)]
        seqlen = hidden.shape[1]
        pos, mask = self.position_embeddings(seqlen), self.layer_mask(layer, seqlen)
        handles = [stop.register_forward_pre_hook(_stop) for _, _, stop, _ in runs if stop is not None]
        try:
            for sl in self.micro_batches(hidden.shape[0]):
                for block, states, _, move in runs:
                    try:
                        y = block(states[sl].to(self.device, non_blocking=True), attention_mask=mask,
                                  position_embeddings=pos)
                    except StopForward:
                        continue
                    if move:
                        states[sl].copy_(y[0] if isinstance(y, tuple) else y)
        finally:
            for handle in handles:
                handle.remove()

    @torch.inference_mode()
    def head_nll(self, norm_weight: torch.Tensor, head_weight: torch.Tensor, hidden: torch.Tensor,
                 ids: torch.Tensor, norm_eps: float) -> torch.Tensor:
        """Mean next-token NLL of each sample (fp32 log-softmax; logits never kept for more than one sample)."""
        norm_w = norm_weight.to(self.device, self.dtype)
        head_w = head_weight.to(self.device, self.dtype)
        out = torch.empty(hidden.shape[0], dtype=torch.float64)
        for s in range(hidden.shape[0]):
            logits = self._logits(hidden[s:s + 1].to(self.device), norm_w, head_w, norm_eps)
            target = ids[s:s + 1, 1:].to(self.device)
            out[s] = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target.flatten()).double().cpu()
        return out

    @torch.inference_mode()
    def head_logits(self, norm_weight: torch.Tensor, head_weight: torch.Tensor, hidden: torch.Tensor,
                    norm_eps: float) -> torch.Tensor:
        norm_w, head_w = norm_weight.to(self.device, self.dtype), head_weight.to(self.device, self.dtype)
        return torch.cat([self._logits(hidden[sl].to(self.device), norm_w, head_w, norm_eps).float().cpu()
                          for sl in self.micro_batches(hidden.shape[0])])

    @staticmethod
    def _logits(x: torch.Tensor, norm_w: torch.Tensor, head_w: torch.Tensor, eps: float) -> torch.Tensor:
        """RMSNorm exactly as the Llama family computes it (in fp32), then lm_head."""
        x32 = x.float()
        x = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
        return F.linear(norm_w * x, head_w)


class BlockSource(Protocol):
    """Anything that can hand the engine an embedding table, block i as a module, and the head."""

    spec: ModelSpec

    def embedding(self) -> torch.Tensor: ...
    def layers(self, engine: Engine) -> Iterator[tuple[int, nn.Module]]: ...
    def head(self) -> tuple[torch.Tensor, torch.Tensor]: ...


class CheckpointSource:
    """An unmodified safetensors checkpoint, streamed block by block with the next block prefetched."""

    def __init__(self, index: ShardIndex):
        self.index = index
        self.spec = index.spec

    def embedding(self) -> torch.Tensor:
        return self.index.load_embedding()

    def layers(self, engine: Engine) -> Iterator[tuple[int, nn.Module]]:
        with BlockPrefetcher(self.index, pin=engine.pin) as prefetcher:
            for i, weights in prefetcher.blocks():
                layer = engine.build_layer(i, weights)
                del weights
                yield i, layer
                del layer

    def head(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.index.load_head()


def stream_hidden(source: BlockSource, engine: Engine, ids: torch.Tensor,
                  on_block: Callable[[int], None] | None = None) -> torch.Tensor:
    """Embedding -> blocks 0..L-1, returning the host buffer of final hidden states (before the final norm)."""
    table = source.embedding()
    hidden = engine.embed(table, ids)
    del table
    for i, layer in source.layers(engine):
        engine.run_block(layer, hidden)
        del layer
        release_host_memory()
        if on_block is not None:
            on_block(i)
    return hidden


def stream_nll(source: BlockSource, engine: Engine, ids: torch.Tensor,
               on_block: Callable[[int], None] | None = None) -> torch.Tensor:
    """Per-window mean next-token NLL from a streamed forward."""
    hidden = stream_hidden(source, engine, ids, on_block)
    norm_w, head_w = source.head()
    return engine.head_nll(norm_w, head_w, hidden, ids, source.spec.rms_norm_eps)


def stream_logits(source: BlockSource, engine: Engine, ids: torch.Tensor) -> torch.Tensor:
    hidden = stream_hidden(source, engine, ids)
    norm_w, head_w = source.head()
    return engine.head_logits(norm_w, head_w, hidden, source.spec.rms_norm_eps)
