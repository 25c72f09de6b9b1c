"""Mixture-of-Experts blocks (Mixtral, Qwen3-MoE): the expanded architecture map, GPTQ per expert on the tokens
routed to it (and the RTN fallback for an expert no token reaches), the W4A16 export in the per-expert layout that
transformers + compressed-tensors load, and the refusals. (Streaming and rotated forwards against transformers are in
test_stream.py / test_invariance.py, W4A4 + resume + info/plan in test_archs.py: all parametrized over MoE too.)"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from streamquant.pipeline import GPTQ_MIN_TOKENS

from conftest import MOE, TINY, last_json, make_tiny_model, run_cli
from test_plan import _payload_bytes
from test_writer import run_args

SAMPLES, SEQLEN = 6, 48   # test_writer.FAST


def _stored(out: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    names = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                names[k] = (str(fh.get_slice(k).get_dtype()), tuple(fh.get_slice(k).get_shape()))
    return names


@pytest.mark.parametrize("arch", MOE)
def test_the_map_spells_out_every_expert(tiny_models, arch):
    from streamquant.spec import read_spec

    spec = read_spec(tiny_models[arch])
    a, moe, n = spec.arch, spec.arch.moe, TINY[arch].get("num_local_experts", TINY[arch].get("num_experts"))
    assert spec.num_experts == n and spec.experts_per_token == 2
    router = f"{moe.module}.{moe.router}"
    downs = tuple(f"{moe.module}.experts.{e}.{moe.down}" for e in range(n))
    assert a.unquantized == (router,) and router not in a.quantized_names
    assert a.r4_names == downs and set(downs) <= set(a.residual_writers)
    assert a.routed == tuple(n for n in a.linear_names if ".experts." in n) and len(a.routed) == 3 * n
    readers = a.norms[1].readers
    assert readers[0] == router and len(readers) == 1 + 2 * n           # router and every expert's gate and up
    expert_groups = [g for g in a.gptq_order if any(".experts." in name for name in g)]
    assert len(expert_groups) == 2 * n                                   # one Hessian per expert and input
    assert all(len({name.split(".experts.")[1].split(".")[0] for name in g}) == 1 for g in expert_groups)
    assert {name for name in spec.block_shapes() if ".experts." in name} == {
        f"{moe.module}.experts.{e}.{p}.weight" for e in range(n) for p in (moe.gate, moe.up, moe.down)}


@pytest.mark.parametrize("arch", MOE)
def test_w4a16_export_loads_in_transformers_with_the_ppl_of_eval(tiny_models, eval_text, tmp_path, arch):
    """Per-expert packed tensors under the checkpoint's names, the router dense and ignored; transformers (with
    compressed-tensors) loads every tensor into its fused experts and computes the PPL `streamquant eval` does."""
    from transformers import AutoModelForCausalLM

    from streamquant.data import eval_windows, load_tokenizer, tokenize

    out = tmp_path / "w4a16"
    res = run_cli(*run_args(tiny_models[arch], out, "--w-bits", "4", "--a-bits", "16", "--weights", "gptq",
                            "--group-size", "16", "--json"))
    assert res.returncode == 0, res.stderr
    run = last_json(res.stdout)
    assert run["format"] == "pack-quantized"
    moe = read_moe(out)
    stored = _stored(out)
    prefix = f"model.layers.1.{moe.module}"
    down = f"{prefix}.experts.3.{moe.down}"
    assert f"{down}.weight_packed" in stored and f"{down}.weight" not in stored   # per-expert, packed
    assert stored[f"{prefix}.{moe.router}.weight"][0] == "F32"          # the router stays 16-bit (here fp32)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert f"re:.*{moe.module}\\.{moe.router}$" in config["ignore"]
    # GPTQ per expert saw exactly the tokens routed to it: every token reaches top-k experts
    for block in run["blocks"]:
        gates = {k: v for k, v in block["gptq_tokens"].items() if k.endswith(f".{moe.gate}")}
        assert len(gates) == 4 and sum(gates.values()) == SAMPLES * SEQLEN * 2
        # experts that saw too few tokens were rounded to nearest (the random qwen3_moe routes 13 tokens to one)
        few = {k for k, v in gates.items() if v < GPTQ_MIN_TOKENS}
        assert {k for k in block.get("rtn_fallback", {}) if k.endswith(f".{moe.gate}")} == few
    assert abs(run["plan"]["output_bytes"] / _payload_bytes(out) - 1) <= 0.005

    ours = run_cli("eval", str(out), "--data", str(eval_text), "--seqlen", "48", "--windows", "3", "--json")
    assert ours.returncode == 0, ours.stderr
    ids = eval_windows(tokenize(load_tokenizer(out), eval_text.read_text()), 48, 3)
    model, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert "compressed" in model.config.quantization_config.quant_method
    with torch.no_grad():
        theirs = math.exp(sum(float(model(w[None], labels=w[None]).loss) for w in ids) / len(ids))
    assert abs(last_json(ours.stdout)["ppl"] - theirs) <= 1e-4 * theirs


def read_moe(model_dir: Path):
    from streamquant.spec import read_spec

    return read_spec(model_dir).arch.moe


def _unreachable_expert_model(root: Path) -> Path:
    """Mixtral with 5 experts whose router rows are a, −a, b, −b, 0: one of ±x·a and one of ±x·b is ≥ 0 for
    every token, so top-2 never picks expert 4 (logit 0) — it receives no calibration tokens at all."""
    model = make_tiny_model(root, "mixtral", num_local_experts=5)
    gen = torch.Generator().manual_seed(1)
    for f in model.glob("*.safetensors"):
        tensors = load_file(str(f))
        routers = [k for k in tensors if k.endswith("block_sparse_moe.gate.weight")]
        for k in routers:
            a, b = torch.randn(2, tensors[k].shape[1], generator=gen)
            tensors[k] = torch.stack([a, -a, b, -b, torch.zeros_like(a)])
        if routers:
            save_file(tensors, str(f), metadata={"format": "pt"})
    return model


def test_an_expert_without_tokens_is_rounded_to_nearest_and_reported(tmp_path):
    model = _unreachable_expert_model(tmp_path / "model")
    out = tmp_path / "out"
    res = run_cli(*run_args(model, out, "--w-bits", "4", "--a-bits", "16", "--weights", "gptq", "--group-size", "16",
                            "--json"))
    assert res.returncode == 0, res.stderr
    report = json.loads((out / "report.json").read_text())
    for block in report["blocks"]:
        idle = {f"block_sparse_moe.experts.4.{p}": 0 for p in ("w1", "w3", "w2")}
        assert block["rtn_fallback"] == idle
        assert block["gptq_tokens"]["block_sparse_moe.experts.4.w1"] == 0
        assert not set(idle) & set(block["gptq_loss"])                  # no GPTQ solve on them
        busy = [f"block_sparse_moe.experts.{e}.w1" for e in range(4)]
        assert sum(block["gptq_tokens"][k] for k in busy) == SAMPLES * SEQLEN * 2
    stored = _stored(out)
    assert "model.layers.0.block_sparse_moe.experts.4.w2.weight_packed" in stored   # still written, 4-bit
    assert math.isfinite(last_json(res.stdout)["plan"]["output_bytes"])


@pytest.mark.parametrize("options", [dict(w_bits=8, a_bits=16, format="int-quantized"),
                                     dict(a_bits=8, a_symmetric=True, a_clip=1.0, format="pack-quantized"),
                                     dict(a_bits=16, r4_online=True, format="pack-quantized")])
def test_exports_transformers_cannot_express_for_experts_are_refused(tiny_models, tmp_path, options):
    from streamquant.errors import UserError
    from streamquant.preflight import RunConfig, prepare

    with pytest.raises(UserError, match="MoE"):
        prepare(RunConfig(model=str(tiny_models["mixtral"]), method="quarot", samples=2, seqlen=32, **options),
                plan_only=True)


def test_a_refused_moe_export_is_one_line_and_writes_nothing(tiny_models, tmp_path):
    res = run_cli(*run_args(tiny_models["qwen3_moe"], tmp_path / "out", "--a-bits", "16", "--r4-online",
                            "--format", "pack-quantized"))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "MoE" in res.stderr
    assert not (tmp_path / "out").exists()


def test_the_plan_holds_every_expert_of_a_block(tmp_path):
    """The planner sizes a block with all its experts: twice the experts grow the predicted quantize peak by at
    least the added experts twice over (the block as read from disk and as built)."""
    from streamquant.preflight import RunConfig, prepare

    def planned(model: Path) -> int:
        plan = prepare(RunConfig(model=str(model), weights="gptq", samples=4, seqlen=48), plan_only=True).plan
        return plan.stages["quantize"]["host_bytes"] - plan.base_host_bytes

    small = make_tiny_model(tmp_path / "e4", "mixtral")
    large = make_tiny_model(tmp_path / "e8", "mixtral", num_local_experts=8)
    cfg = TINY["mixtral"]
    added = 4 * 3 * cfg["intermediate_size"] * cfg["hidden_size"] * 4      # 4 experts of 3 fp32 matrices
    assert planned(large) - planned(small) >= 2 * added


@pytest.mark.parametrize("arch", MOE)
def test_bf16_stream_routes_and_mixes_as_transformers(tiny_models, arch):
    """In bf16 the dtype the top-k weights scale the experts in matters (Qwen3-MoE casts them to bf16, Mixtral keeps
    fp32 and sums in fp32): the streamed model matches transformers' default bf16 forward (measured: identical on
    CPU; with the two rules swapped the logits move by ~1 % of their range, and Mixtral summed in bf16 by 34 %)."""
    from transformers import AutoModelForCausalLM

    from streamquant.shards import ShardIndex
    from streamquant.spec import read_spec
    from streamquant.stream import CheckpointSource, Engine, stream_logits

    model_dir = tiny_models[arch]
    spec = read_spec(model_dir)
    ids = torch.randint(3, 500, (2, 48), generator=torch.Generator().manual_seed(0))
    ours = stream_logits(CheckpointSource(ShardIndex(model_dir, spec)),
                         Engine(spec, torch.device("cpu"), torch.bfloat16, micro_batch=2), ids)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa")
    with torch.no_grad():
        theirs = ref(ids).logits.float()
    assert (ours - theirs).abs().max() <= 2e-3 * theirs.abs().max()


def test_a_w4a4_block_keeps_the_router_16_bit_and_r4_on_every_expert(tiny_models):
    """At run time every expert's Linear quantizes its input (and every down applies R4 online); the router reads
    16-bit inputs and is not among the linears whose weights get quantized."""
    from streamquant.qblock import Runtime, qlinears
    from streamquant.quant.quantizers import ActQuantConfig
    from streamquant.rotate.model import build_rotated_layer
    from streamquant.shards import ShardIndex
    from streamquant.spec import read_spec
    from streamquant.stream import Engine

    spec = read_spec(tiny_models["mixtral"])
    engine = Engine(spec, torch.device("cpu"), torch.float32, micro_batch=2)
    layer = build_rotated_layer(engine, 0, ShardIndex(tiny_models["mixtral"], spec).load_block(0),
                                Runtime(r4_seed=4, act=ActQuantConfig(bits=4)))
    router = layer.get_submodule(spec.arch.unquantized[0])
    quantized = qlinears(layer, spec.arch)
    assert not router.act.enabled and router not in quantized.values()
    assert len(quantized) == 4 + 3 * spec.num_experts and all(q.act.bits == 4 for q in quantized.values())
    assert [n for n in spec.arch.linear_names if layer.get_submodule(n).transform is not None] == list(
        spec.arch.r4_names)


def test_at_most_two_moe_blocks_alive(tmp_path, eval_text):
    """Census of live expert tensors (gc, independent of our bookkeeping) at every block boundary: a block holds all
    its experts, and at most the block computed and the one prefetched are alive."""
    import gc

    from streamquant.data import eval_windows, load_tokenizer, tokenize
    from streamquant.shards import ShardIndex
    from streamquant.spec import read_spec
    from streamquant.stream import CheckpointSource, Engine, stream_nll

    model = make_tiny_model(tmp_path / "m", "mixtral", num_hidden_layers=4)
    spec = read_spec(model)
    gate_shape = (spec.expert_intermediate_size, spec.hidden_size)   # every expert's w1 and w3 only
    per_block = 2 * spec.num_experts
    counts = []

    def census(i: int) -> None:
        gc.collect()
        counts.append(len({o.untyped_storage().data_ptr() for o in gc.get_objects()
                           if type(o) in (torch.Tensor, torch.nn.Parameter) and tuple(o.shape) == gate_shape}))

    ids = eval_windows(tokenize(load_tokenizer(model), eval_text.read_text()), 32, 2)
    stream_nll(CheckpointSource(ShardIndex(model, spec)), Engine(spec, torch.device("cpu"), torch.float32, 2), ids,
               census)
    assert len(counts) == spec.num_layers and min(counts) >= per_block and max(counts) <= 2 * per_block, counts
    assert spec.num_layers * per_block > 2 * per_block


@pytest.mark.parametrize("arch", MOE)
def test_expert_hessians_of_a_stage_share_one_pass(tiny_models, tmp_path, arch):
    """Sequential GPTQ fills every expert's gate/up Hessian in one pass and every expert's down Hessian in another
    (their inputs do not depend on each other's weights), so the work per block does not grow with the experts:
    R2 (stopped at o_proj), o_proj's pass, two expert passes and the quantized forward, at most 3.5 block forwards
    where a pass per expert took 5.5 with these 4 experts. (That the outputs equal a pass per expert is
    test_reference_outputs' Mixtral case.)"""
    res = run_cli(*run_args(tiny_models[arch], tmp_path / "out", "--method", "dart", "--w-bits", "4", "--a-bits", "4",
                            "--weights", "gptq", "--hessians", "sequential", "--json"))
    assert res.returncode == 0, res.stderr
    work = [b["forward_equivalents"] for b in last_json(res.stdout)["blocks"]]
    assert all(w <= 3.5 for w in work), work
