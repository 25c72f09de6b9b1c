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
from dataclasses import dataclass, field, replace

# Symbolic sizes a shape is written in; `ModelSpec.dims()` gives their values for one checkpoint.
HIDDEN, INTERMEDIATE, Q, KV, HEAD_DIM = "hidden", "intermediate", "q", "kv", "head_dim"
QKV, GATE_UP = "qkv", "gate_up"   # fused linears' outputs: q, k and v rows stacked; gate and up rows stacked
EXPERTS, EXPERT_INTERMEDIATE = "experts", "expert_intermediate"   # MoE: router rows; one expert's MLP width
EXPERT = "{e}"   # in a MoE map's names: the expert index, expanded per checkpoint (ArchMap.with_experts)


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
class MoeMap:
    """A sparse MoE MLP: a router Linear reading the normalised residual picks the top-k experts per token (softmax,
    then top-k, renormalised when `normalize_key` says so); each expert is a SwiGLU MLP whose output is weighted by
    its routing probability. streamquant runs it as an expert loop over per-expert Linears (streamquant.moe) under
    the checkpoint's own names, so per-expert hooks see exactly the tokens routed to each expert."""

    module: str              # the MoE module's name in checkpoints, relative to the block (Mixtral: block_sparse_moe)
    layer_attr: str          # the attribute transformers' decoder layer calls it by (mlp)
    router: str              # the router Linear, relative to `module`: it stays 16-bit
    gate: str                # per-expert linears, relative to `{module}.experts.{e}`: act(gate(x)) * up(x) → down
    up: str
    down: str
    experts_keys: tuple[str, ...]   # config.json: the number of experts (the first of these keys present)
    intermediate_key: str    # config.json: one expert's intermediate size
    top_k_key: str = "num_experts_per_tok"
    normalize_key: str | None = None    # config.json flag: renormalise the top-k weights (None: always)
    weights_in_model_dtype: bool = False  # the top-k weights are cast to the model dtype before they scale the
                                          # experts' outputs (Qwen3-MoE; Mixtral scales in fp32)
    all_sparse: tuple[tuple[str, object], ...] = ()   # config.json keys that must hold these values (absent is
                                                      # fine): otherwise some layers are dense MLPs (refused)

    def expert(self, name: str) -> str:
        return f"{self.module}.experts.{EXPERT}.{name}"


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
    unquantized: tuple[str, ...] = ()     # linears that stay 16-bit (weights and inputs): a MoE router
    moe: MoeMap | None = None             # the MLP is a sparse MoE (linear names hold EXPERT until with_experts)
    r4_names: tuple[str, ...] = ()        # every linear R4 sits on (default: r4 alone; MoE: every expert's down)
    routed: tuple[str, ...] = ()          # linears that see only the tokens routed to them (MoE experts' linears)
    gptq_stage: tuple[int, ...] = ()      # per GPTQ group: groups of one stage read inputs no group of the stage
                                          # changes (one expert template's groups), so one pass fills all their
                                          # Hessians; () = each group its own stage
    layer_prefix: str = "model.layers."
    embed: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    lm_head: str = "lm_head.weight"
    linear_names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "linear_names", tuple(lin.name for lin in self.linears))
        if not self.r4_names:
            object.__setattr__(self, "r4_names", (self.r4,))
        if not self.gptq_stage:
            object.__setattr__(self, "gptq_stage", tuple(range(len(self.gptq_order))))
        readers = [name for nm in self.norms for name in nm.readers]
        for name in (*readers, *self.residual_writers, self.r2_value, self.r2_output, *self.r4_names,
                     *self.unquantized, *(n for group in self.gptq_order for n in group)):
            if name not in self.linear_names:
                raise ValueError(f"{self.model_type}: {name} is not one of its linears")
        if sorted([*(n for group in self.gptq_order for n in group), *self.unquantized]) != sorted(self.linear_names):
            raise ValueError(f"{self.model_type}: gptq_order and unquantized must name every linear once")

    @property
    def quantized_names(self) -> tuple[str, ...]:
        """The linears whose weights are quantized (all but the 16-bit ones, such as a MoE router)."""
        return tuple(n for n in self.linear_names if n not in self.unquantized)

    def with_experts(self, n: int) -> "ArchMap":
        """This map for a checkpoint with `n` experts: every name holding EXPERT becomes n names (expert-major,
        so an expert's linears stay in computation order), every GPTQ group holding it n groups (one Hessian per
        expert: each sees only the tokens routed to its expert). R4 is on the first expert's down (its size) and
        r4_names lists every expert's. A map without MoE is returned as it is."""
        if self.moe is None:
            return self

        def names(seq: tuple[str, ...]) -> tuple[str, ...]:
            out: list[str] = []
            run: list[str] = []
            for name in (*seq, None):
                if name is not None and EXPERT in name:
                    run.append(name)
                    continue
                out += [r.replace(EXPERT, str(e)) for e in range(n) for r in run]
                run = []
                if name is not None:
                    out.append(name)
            return tuple(out)

        linears: list[LinearMap] = []
        run_l: list[LinearMap] = []
        for lin in (*self.linears, None):
            if lin is not None and EXPERT in lin.name:
                run_l.append(lin)
                continue
            linears += [replace(r, name=r.name.replace(EXPERT, str(e))) for e in range(n) for r in run_l]
            run_l = []
            if lin is not None:
                linears.append(lin)
        groups: list[tuple[str, ...]] = []
        stages: list[int] = []
        for stage, group in enumerate(self.gptq_order):
            copies = n if any(EXPERT in name for name in group) else 1
            groups += [tuple(name.replace(EXPERT, str(e)) for name in group) for e in range(copies)]
            stages += [stage] * copies
        r4_names = names(self.r4_names)
        return replace(self, linears=tuple(linears),
                       norms=tuple(NormMap(nm.norm, names(nm.readers)) for nm in self.norms),
                       residual_writers=names(self.residual_writers), gptq_order=tuple(groups),
                       gptq_stage=tuple(stages),
                       unquantized=names(self.unquantized), r4=r4_names[0], r4_names=r4_names,
                       routed=tuple(lin.name for lin in linears if lin.name not in self.linear_names),
                       biases=tuple(BiasRule(b.flag, names(b.linears)) for b in self.biases))

    @property
    def norm_names(self) -> tuple[str, ...]:
        return tuple(nm.norm for nm in self.norms)

    @property
    def residual_readers(self) -> tuple[str, ...]:
        return tuple(name for nm in self.norms for name in nm.readers)

    @property
    def capture_points(self) -> tuple[str, ...]:
        """One reader per norm: its input is the normalised residual R1 is calibrated on (attention and MLP side).
        Every token reaches the first reader (a MoE router, not an expert that sees only its own tokens)."""
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


def _moe(model_type: str, module: str, prefix: str, moe: MoeMap, **overrides) -> ArchMap:
    """The Llama attention with a sparse MoE MLP: the router and every expert's gate/up read the post-attention
    norm (R1 input side, σ fused), every expert's down writes the residual (R1 output side) and carries R4; GPTQ
    quantizes each expert on its own routed tokens; the router stays 16-bit."""
    router = f"{moe.module}.{moe.router}"
    gate, up, down = moe.expert(moe.gate), moe.expert(moe.up), moe.expert(moe.down)
    o = "self_attn.o_proj"
    return ArchMap(
        model_type=model_type, modeling_module=f"transformers.models.{module}.modeling_{module}",
        layer_class=f"{prefix}DecoderLayer", rotary_class=f"{prefix}RotaryEmbedding",
        linears=_ATTN + (LinearMap(router, EXPERTS, HIDDEN), LinearMap(gate, EXPERT_INTERMEDIATE, HIDDEN),
                         LinearMap(up, EXPERT_INTERMEDIATE, HIDDEN), LinearMap(down, HIDDEN, EXPERT_INTERMEDIATE)),
        norms=(NormMap("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
               NormMap("post_attention_layernorm", (router, gate, up))),
        residual_writers=(o, down), r2_value="self_attn.v_proj", r2_output=o, r4=down,
        gptq_order=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), (o,), (gate, up), (down,)),
        unquantized=(router,), moe=moe, **overrides,
    )


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
    # Mixtral: Mistral's attention (a configured window on every layer) and block_sparse_moe with experts w1 (gate),
    # w3 (up), w2 (down); top-k weights always renormalised
    "mixtral": _moe("mixtral", "mixtral", "Mixtral", MoeMap(
        module="block_sparse_moe", layer_attr="mlp", router="gate", gate="w1", up="w3", down="w2",
        experts_keys=("num_local_experts",), intermediate_key="intermediate_size"), sliding_window_by_default=True),
    # Qwen3-MoE: Qwen3's attention (q/k norms, attention_bias, per-layer windows) and mlp.experts with a router
    # mlp.gate; norm_topk_prob decides the renormalisation; checkpoints with dense MLP layers are refused
    "qwen3_moe": _moe("qwen3_moe", "qwen3_moe", "Qwen3Moe", MoeMap(
        module="mlp", layer_attr="mlp", router="gate", gate="gate_proj", up="up_proj", down="down_proj",
        experts_keys=("num_experts", "num_local_experts"), intermediate_key="moe_intermediate_size",
        normalize_key="norm_topk_prob", weights_in_model_dtype=True,
        all_sparse=(("mlp_only_layers", []), ("decoder_sparse_step", 1))),
        biases=(BiasRule("attention_bias", tuple(lin.name for lin in _ATTN)),), passthrough=_qk_norms(),
        window_by_layer_types=True),
}
