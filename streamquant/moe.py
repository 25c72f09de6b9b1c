"""A sparse MoE MLP as an expert loop over per-expert Linears, under the checkpoint's own names.

transformers 5 keeps a block's experts as 3-D parameters (gate_up_proj [E, 2I, H], down_proj [E, H, I]) and runs
them fused, converting the per-expert 2-D tensors of on-disk checkpoints at load time. streamquant instead puts
this module in the decoder layer: a router Linear and one SwiGLU module per expert holding real Linears named as
on disk (`block_sparse_moe.experts.3.w2`), so that
- a block loads straight from the shards and is written back under the names compressed-tensors and vLLM expect;
- every expert's Linear can become a QLinear (R4, activation quantizer) like any dense Linear;
- a pre-hook on an expert's Linear sees exactly the tokens routed to that expert (GPTQ per expert).
The routing and mixing are transformers' (softmax in fp32 → top-k → optional renormalisation; weighted outputs
summed as its default grouped_mm experts sum them), so the layer computes what transformers' own does (test_stream
compares whole models in fp32, test_moe in bf16).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from streamquant.arch import MoeMap
from streamquant.spec import ModelSpec


class Expert(nn.Module):
    """One expert: down(act(gate(x)) * up(x)), its Linears under the checkpoint's names."""

    def __init__(self, moe: MoeMap, hidden: int, intermediate: int, act):
        super().__init__()
        self.names = (moe.gate, moe.up, moe.down)
        self.add_module(moe.gate, nn.Linear(hidden, intermediate, bias=False))
        self.add_module(moe.up, nn.Linear(hidden, intermediate, bias=False))
        self.add_module(moe.down, nn.Linear(intermediate, hidden, bias=False))
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act(gate(x)) * up(x))


class ExpertLoop(nn.Module):
    """Router → top-k experts per token → their outputs weighted by the routing probabilities."""

    def __init__(self, moe: MoeMap, spec: ModelSpec, act):
        super().__init__()
        self.router_name, self.top_k, self.normalize = moe.router, spec.experts_per_token, spec.normalize_routing
        self.cast = moe.weights_in_model_dtype
        self.add_module(moe.router, nn.Linear(spec.hidden_size, spec.num_experts, bias=False))
        self.experts = nn.ModuleList(Expert(moe, spec.hidden_size, spec.expert_intermediate_size, act)
                                     for _ in range(spec.num_experts))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k weights [tokens, k] and expert indices [tokens, k], as transformers' routers compute them."""
        logits = getattr(self, self.router_name)(x)
        weights, index = torch.topk(F.softmax(logits.float(), dim=-1), self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return (weights.to(logits.dtype) if self.cast else weights), index

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        weights, index = self.route(x)
        # summed in the dtype of the weighted outputs (fp32 for Mixtral's fp32 weights), cast once at the end: what
        # transformers' default (grouped_mm) experts do; in fp32 runs this is plain fp32 throughout
        out = torch.zeros(x.shape, dtype=torch.promote_types(x.dtype, weights.dtype), device=x.device)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(index == e)
            if token.numel() == 0:   # an expert no token chose does not run (its hooks see nothing)
                continue
            out.index_add_(0, token, expert(x[token]) * weights[token, slot, None])
        return out.to(x.dtype).reshape(shape)


def install_experts(layer: nn.Module, spec: ModelSpec) -> None:
    """Replace transformers' fused MoE module of a layer (built on the meta device) by the expert loop, registered
    under its checkpoint name; transformers' forward still reaches it by its own attribute name."""
    from transformers.activations import ACT2FN

    moe = spec.arch.moe
    loop = ExpertLoop(moe, spec, ACT2FN[spec.raw.get("hidden_act", "silu")])
    if moe.layer_attr != moe.module:
        delattr(layer, moe.layer_attr)
        layer.add_module(moe.module, loop)
        object.__setattr__(layer, moe.layer_attr, loop)   # an alias, not a second registration (no duplicate keys)
    else:
        setattr(layer, moe.layer_attr, loop)
