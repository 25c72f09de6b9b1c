"""Architectures as data: for each supported `model_type`, where a decoder block's parts are and what DartQuant does
to each of them.

Everything that differs between architectures is an entry here — the transformers classes, which linears read the
residual stream (R1 on their input side, σ of the norm before them fused in) and which write it (R1 on their output
side), where R2 and R4 sit, the order GPTQ quantizes the linears in, bias rules, tensors that pass through untouched
and the tensor names around the blocks. Spec, shards, fusion, the online runtime, the capture and R2 hooks, GPTQ, the
planner, the writer and the synthetic checkpoints all read from this map; no other module branches on model_type.
Adding an architecture is one entry here plus its test fixture.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field

# Symbolic sizes a shape is written in; `ModelSpec.dims()` gives their values for one checkpoint.
HIDDEN, INTERMEDIATE, Q, KV, HEAD_DIM = "hidden", "intermediate", "q", "kv", "head_dim"
QKV, GATE_UP = "qkv", "gate_up"   # fused linears' outputs: q, k and v rows stacked; gate and up rows stacked


@dataclass(frozen=True)
class LinearMap:
    """One Linear of a block: its name relative to the block and its weight's [out, in] in symbolic sizes."""

    name: str
    out: str
    inp: str


@dataclass(frozen=True)
class NormMap:
    """A norm and the linears that read its output: σ is fused into them and R1 sits on their input side."""

    norm: str
    readers: tuple[str, ...]


@dataclass(frozen=True)
class BiasRule:
    """Linears that carry a bias when config.json's `flag` is true (`flag` None: always)."""

    flag: str | None
    linears: tuple[str, ...]


@dataclass(frozen=True)
class ArchMap:
    model_type: str
    modeling_module: str                  # transformers module holding the classes below
    layer_class: str                      # transformers' decoder layer: blocks are built into it
    rotary_class: str                     # its rotary embedding (positions for the block forwards)
    linears: tuple[LinearMap, ...]        # in the order a block computes them
    norms: tuple[NormMap, ...]            # each block norm and the residual readers after it (R1 input side)
    residual_writers: tuple[str, ...]     # linears whose output is added to the residual stream (R1 output side)
    r2_value: str                         # R2 on its output (the value rows, see r2_value_rows), per KV head ...
    r2_output: str                        # ... and on this one's input, per query head (cancels inside attention)
    r4: str                               # online Hadamard on its input, transpose fused into its weight
    gptq_order: tuple[tuple[str, ...], ...]  # groups sharing one input (one Hessian), in dependency order
    attention: str = "self_attn"          # the module whose attention gets R3 and the KV quantizer online
    biases: tuple[BiasRule, ...] = ()
    passthrough: tuple[tuple[str, tuple[str, ...]], ...] = ()   # other block tensors, kept as they are
    r2_value_rows: tuple[str, ...] = ()   # sizes of r2_value's output rows before its KV value rows: a fused qkv
                                          # linear (Phi-3) holds q and k rows first; () = all rows are values
    sliding_window_by_default: bool = False   # `sliding_window` applies unless `use_sliding_window` is false
    window_by_layer_types: bool = False   # the window applies only to layers config.json's `layer_types` marks
                                          # "sliding_attention" (else: to every layer)
    layer_prefix: str = "model.layers."
    embed: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    lm_head: str = "lm_head.weight"
    linear_names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "linear_names", tuple(lin.name for lin in self.linears))
        readers = [name for nm in self.norms for name in nm.readers]
        for name in (*readers, *self.residual_writers, self.r2_value, self.r2_output, self.r4,
                     *(n for group in self.gptq_order for n in group)):
            if name not in self.linear_names:
                raise ValueError(f"{self.model_type}: {name} is not one of its linears")
        if sorted(n for group in self.gptq_order for n in group) != sorted(self.linear_names):
            raise ValueError(f"{self.model_type}: gptq_order must name every linear once")

    @property
    def norm_names(self) -> tuple[str, ...]:
        return tuple(nm.norm for nm in self.norms)

    @property
    def residual_readers(self) -> tuple[str, ...]:
        return tuple(name for nm in self.norms for name in nm.readers)

    @property
    def capture_points(self) -> tuple[str, ...]:
        """One reader per norm: its input is the normalised residual R1 is calibrated on (attention and MLP side)."""
        return tuple(nm.readers[0] for nm in self.norms)

    def attention_linears(self) -> tuple[str, ...]:
        return tuple(n for n in self.linear_names if n.startswith(self.attention + "."))

    def linear(self, name: str) -> LinearMap:
        return self.linears[self.linear_names.index(name)]

    def biased(self, config: dict) -> tuple[str, ...]:
        """The linears that carry a bias in a checkpoint with this config.json, in block order."""
        on = {n for rule in self.biases if rule.flag is None or config.get(rule.flag) for n in rule.linears}
        return tuple(n for n in self.linear_names if n in on)

    def block_shapes(self, dims: dict[str, int], biased: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
        """Every tensor of one block (names relative to the block prefix) and its shape."""
        shapes: dict[str, tuple[int, ...]] = {}
        for lin in self.linears:
            shapes[f"{lin.name}.weight"] = (dims[lin.out], dims[lin.inp])
            if lin.name in biased:
                shapes[f"{lin.name}.bias"] = (dims[lin.out],)
        for norm in self.norm_names:
            shapes[f"{norm}.weight"] = (dims[HIDDEN],)
        for name, shape in self.passthrough:
            shapes[name] = tuple(dims[d] for d in shape)
        return shapes

    def share_before(self, name: str, dims: dict[str, int]) -> float:
        """The fraction of a block's linear work (multiply-adds per token) done before `name` runs: what a pass
        stopped at `name`'s input costs, in units of one full block forward (attention scores not counted)."""
        work = [dims[lin.out] * dims[lin.inp] for lin in self.linears]
        return sum(work[: self.linear_names.index(name)]) / sum(work)

    def hf_class(self, which: str) -> type:
        """transformers' class `which` ('layer' or 'rotary'); imports the modeling module on first use."""
        module = importlib.import_module(self.modeling_module)
        return getattr(module, self.layer_class if which == "layer" else self.rotary_class)


_ATTN = (LinearMap("self_attn.q_proj", Q, HIDDEN), LinearMap("self_attn.k_proj", KV, HIDDEN),
         LinearMap("self_attn.v_proj", KV, HIDDEN), LinearMap("self_attn.o_proj", HIDDEN, Q))
_MLP = (LinearMap("mlp.gate_proj", INTERMEDIATE, HIDDEN), LinearMap("mlp.up_proj", INTERMEDIATE, HIDDEN),
        LinearMap("mlp.down_proj", HIDDEN, INTERMEDIATE))


def _llama_like(model_type: str, module: str, prefix: str, **overrides) -> ArchMap:
    """The Llama block: pre-RMSNorm attention (q/k/v → o) and SwiGLU MLP (gate/up → down)."""
    return ArchMap(
        model_type=model_type, modeling_module=f"transformers.models.{module}.modeling_{module}",
        layer_class=f"{prefix}DecoderLayer", rotary_class=f"{prefix}RotaryEmbedding",
        linears=_ATTN + _MLP,
        norms=(NormMap("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
               NormMap("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))),
        residual_writers=("self_attn.o_proj", "mlp.down_proj"),
        r2_value="self_attn.v_proj", r2_output="self_attn.o_proj", r4="mlp.down_proj",
        gptq_order=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                    ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)),
        **overrides,
    )


def _phi3() -> ArchMap:
    """Phi-3: the Llama block with q/k/v fused into one qkv_proj ([q; k; v] rows, so R2 touches only the v rows)
    and gate/up fused into gate_up_proj ([gate; up] rows); no biases; a configured sliding window applies to every
    layer (config.json sets no use_sliding_window); partial rotary reaches transformers' layer through the config."""
    qkv, o, gate_up, down = "self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"
    return ArchMap(
        model_type="phi3", modeling_module="transformers.models.phi3.modeling_phi3",
        layer_class="Phi3DecoderLayer", rotary_class="Phi3RotaryEmbedding",
        linears=(LinearMap(qkv, QKV, HIDDEN), LinearMap(o, HIDDEN, Q), LinearMap(gate_up, GATE_UP, HIDDEN),
                 LinearMap(down, HIDDEN, INTERMEDIATE)),
        norms=(NormMap("input_layernorm", (qkv,)), NormMap("post_attention_layernorm", (gate_up,))),
        residual_writers=(o, down), r2_value=qkv, r2_value_rows=(Q, KV), r2_output=o, r4=down,
        gptq_order=((qkv,), (o,), (gate_up,), (down,)), sliding_window_by_default=True,
    )


def _qk_norms() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Per-head RMSNorms on q and k (Qwen3) act on q_proj/k_proj outputs before RoPE: R1 sits on those linears'
    input side and R3 after RoPE, so the norms see exactly what they saw before and pass through untouched."""
    return (("self_attn.q_norm.weight", (HEAD_DIM,)), ("self_attn.k_norm.weight", (HEAD_DIM,)))


ARCHS: dict[str, ArchMap] = {
    # Llama's attention_bias covers o_proj too; mlp_bias all three MLP linears
    "llama": _llama_like("llama", "llama", "Llama", biases=(
        BiasRule("attention_bias", tuple(lin.name for lin in _ATTN)),
        BiasRule("mlp_bias", tuple(lin.name for lin in _MLP)))),
    "mistral": _llama_like("mistral", "mistral", "Mistral", sliding_window_by_default=True),
    # Qwen2 always has q/k/v biases and never an o_proj one; like Qwen3 it windows only the layers layer_types marks
    "qwen2": _llama_like("qwen2", "qwen2", "Qwen2", biases=(
        BiasRule(None, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),), window_by_layer_types=True),
    # Qwen3: the Llama block plus q/k norms; attention_bias covers q/k/v/o; a sliding window (use_sliding_window)
    # only on the layers layer_types marks (transformers derives them from max_window_layers)
    "qwen3": _llama_like("qwen3", "qwen3", "Qwen3", biases=(
        BiasRule("attention_bias", tuple(lin.name for lin in _ATTN)),), passthrough=_qk_norms(),
        window_by_layer_types=True),
    "phi3": _phi3(),
}
