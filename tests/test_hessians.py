"""Where GPTQ's Hessians come from (--hessians): one-pass GPTQ of the plain model quantizes every linear against the
inputs transformers' own full-model forward gives it; sequential GPTQ does not (its inputs pass through the weights
already quantized); a one-pass run resumes to the same bytes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from conftest import WIKITEXT, run_cli
from streamquant.data import calibration_windows, load_tokenizer, read_text, tokenize_in_pieces
from streamquant.qblock import QLinear, Runtime
from streamquant.quant.gptq import GPTQ
from streamquant.quant.quantizers import WeightQuantConfig
from streamquant.reader import read_block
from streamquant.rotate.fuse import r2_gram
from streamquant.rotate.model import build_rotated_layer, rotate_block
from streamquant.shards import ShardIndex
from streamquant.manifest import read_manifest
from streamquant.spec import read_spec
from streamquant.stream import Engine
from test_invariance import random_orthogonal
from test_writer import run_args, tree

# --refit-scales 0: the references below are GPTQ's scan alone (the w4a16 preset refits the scales once)
PLAIN_W4A16 = ["--method", "none", "--w-bits", "4", "--a-bits", "16", "--weights", "gptq", "--group-size", "16",
               "--no-act-order", "--no-w-clip", "--refit-scales", "0", "--seed", "5"]


def reference_weights(model_dir, calib: str, samples: int, seqlen: int, seed: int) -> dict[str, torch.Tensor]:
    """Every linear GPTQ-quantized against the inputs of transformers' full-model fp32 forward (fp64 Σ x xᵀ)."""
    from transformers import AutoModelForCausalLM

    ids = calibration_windows(tokenize_in_pieces(load_tokenizer(model_dir), read_text(calib)), seqlen, samples, seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def accumulate(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]
        return accumulate

    linears = {n: m for n, m in model.model.layers.named_modules() if isinstance(m, torch.nn.Linear)}
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    cfg = WeightQuantConfig(bits=4, group_size=16, symmetric=True)
    out = {}
    for name, module in linears.items():
        gptq = GPTQ(module.in_features)
        gptq.S, gptq.n_samples = sums[name].float(), counts[name]
        out[name] = gptq.quantize(module.weight.data, cfg).weight
    return out


def agreement(out, model_dir, reference: dict[str, torch.Tensor]) -> float:
    """The share of weights the run wrote equal to the reference's."""
    spec, manifest = read_spec(out), read_manifest(out)
    same = total = 0
    for i in range(spec.num_layers):
        written = read_block(out, i, spec, manifest)
        for name, w in written.items():
            if f"{i}.{name.removesuffix('.weight')}" in reference:
                ref = reference[f"{i}.{name.removesuffix('.weight')}"]
                same += int(torch.isclose(w.float(), ref, rtol=1e-5, atol=1e-7).sum())
                total += ref.numel()
    assert total > 0
    return same / total


def test_one_pass_quantizes_against_the_unquantized_models_inputs(tiny_models, tmp_path):
    model = tiny_models["llama"]
    calib = str(WIKITEXT / "valid.txt") if (WIKITEXT / "valid.txt").exists() else "default"
    reference = reference_weights(model, calib, samples=6, seqlen=48, seed=5)
    shares = {}
    for mode in ("one-pass", "sequential"):
        out = tmp_path / mode
        res = run_cli(*run_args(model, out, *PLAIN_W4A16, "--hessians", mode))
        assert res.returncode == 0, res.stderr
        shares[mode] = agreement(out, model, reference)
    # the same Hessians up to fp32 summation order: a near-tie may round the other way, and GPTQ carries that one
    # flip's error along the rest of its row (measured 98.9 % equal; k/v of block 0 bit-equal)
    assert shares["one-pass"] > 0.95, shares
    # the reference can tell: sequential GPTQ's later linears see inputs through quantized weights (measured 24.6 %)
    assert shares["sequential"] < 0.6, shares


def test_one_pass_resume_after_sigkill_is_byte_identical(tiny_models, tmp_path):
    """The resumed run's calibration states replay through the *unquantized* blocks (dart's R2 probe, since R2 is
    learned in the one-pass pass). Killed after block 2 of 4, so the replay carries them through two blocks (a kill
    after block 1 replays one, and missed that the replay dropped them after its first block)."""
    assert_resume_after_sigkill_is_byte_identical(tiny_models["llama"], tmp_path, [
        "--method", "dart", "--w-bits", "4", "--a-bits", "16", "--weights", "gptq", "--group-size", "16",
        "--hessians", "one-pass"])


def assert_resume_after_sigkill_is_byte_identical(model: Path, tmp_path: Path, extra: list[str]) -> None:
    """Killed after block 2 of 4 (the replay then carries states through two blocks), resumed: the same bytes as
    an uninterrupted run."""
    whole = tmp_path / "whole"
    assert run_cli(*run_args(model, whole, *extra)).returncode == 0
    out = tmp_path / "out"
    args = run_args(model, out, *extra)
    env = dict(os.environ, STREAMQUANT_CRASH_AT="after:block-00002.safetensors")
    killed = subprocess.run([str(Path(sys.executable).with_name("streamquant")), *args], env=env,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = run_cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert tree(out) == tree(whole)


@pytest.mark.parametrize("arch", ["llama", "phi3"])   # GQA; a fused qkv whose value rows follow q's and k's
def test_r2_folded_into_the_pass_gives_the_hessians_of_a_pass_with_r2(tiny_models, arch):
    """dart with one-pass GPTQ learns R2 from the pass that fills every Hessian (no probe pass of its own): turned by
    r2_gram, o_proj's Hessian of the block without R2 equals a dense fp64 2/N XᵀX of what o_proj reads once R2 is
    fused, and every other group's Hessian is the one a block with R2 gives."""
    model_dir = tiny_models[arch]
    spec = read_spec(model_dir)
    weights = ShardIndex(model_dir, spec).load_block(1)
    gen = torch.Generator().manual_seed(0)
    r1 = random_orthogonal(spec.hidden_size, gen)
    r2 = torch.stack([random_orthogonal(spec.head_dim, gen) for _ in range(spec.num_kv_heads)])
    engine = Engine(spec, torch.device("cpu"), torch.float32, micro_batch=2)
    hidden = torch.randn(3, 40, spec.hidden_size, generator=gen)
    order = spec.arch.gptq_order

    def hessians(r2_fused):
        layer = build_rotated_layer(engine, 1, rotate_block(weights, spec, r1, r2_fused, 4), Runtime(r4_seed=4))
        gptqs, dense, handles = {}, {}, []
        for g, group in enumerate(order):
            first = layer.get_submodule(group[0])
            gptqs[g] = GPTQ(first.in_features)

            def hook(mod, args, g=g):
                x = QLinear.quantized_input(mod, args[0])
                gptqs[g].add_batch(x)
                x = x.reshape(-1, x.shape[-1]).double()
                dense[g] = dense.get(g, 0) + x.T @ x
            handles.append(first.register_forward_pre_hook(hook))
        engine.run_until(layer, hidden)
        for h in handles:
            h.remove()
        return gptqs, {g: 2 * s / (hidden.shape[0] * hidden.shape[1]) for g, s in dense.items()}

    folded, _ = hessians(None)
    _, reference = hessians(r2)
    o_proj = next(g for g, group in enumerate(order) if spec.arch.r2_output in group)
    unturned = folded[o_proj].H.double()
    folded[o_proj].rotate_inputs(partial(r2_gram, r2=r2, spec=spec))
    for g, ref in reference.items():
        assert (folded[g].H.double() - ref).abs().max() <= 1e-5 * ref.abs().max(), order[g]
    # R2 does move o_proj's inputs: a fold that forgot to turn its Hessian would fail above
    assert (unturned - reference[o_proj]).abs().max() > 1e-2 * reference[o_proj].abs().max()


# every weight option named, so that --a-bits 4 and --a-bits 16 infer no different preset
W4_EXPLICIT = ["--method", "dart", "--w-bits", "4", "--weights", "gptq", "--group-size", "16", "--w-sym",
               "--no-act-order", "--no-w-clip", "--hessians", "sequential", "--format", "streamquant", "--seed", "5",
               "--no-o-online", "--refit-scales", "0", "--r1-lr", "1e-3"]


def block_weights(out: Path) -> dict[str, torch.Tensor]:
    spec, manifest = read_spec(out), read_manifest(out)
    return {f"{i}.{name}": w for i in range(spec.num_layers) for name, w in read_block(out, i, spec, manifest).items()}


def test_full_precision_calibration_quantizes_weights_as_a_run_without_activation_quantizers(tiny_models, tmp_path):
    """--calib-acts full: R2's rows, every sequential GPTQ Hessian and the states carried between blocks see
    unquantized activations, so a W4A4 run writes exactly the weights (and R2s) of the same W4A16 run; the default
    (quantized) does not. R4 is online in both (the streamquant format)."""
    model = tiny_models["llama"]
    outs = {}
    for name, extra in (("a16", ["--a-bits", "16"]), ("a4-full", ["--a-bits", "4", "--calib-acts", "full"]),
                        ("a4-quantized", ["--a-bits", "4", "--calib-acts", "quantized"])):
        outs[name] = tmp_path / name
        res = run_cli(*run_args(model, outs[name], *W4_EXPLICIT, *extra))
        assert res.returncode == 0, res.stderr
    a16, full, quantized = (block_weights(outs[n]) for n in ("a16", "a4-full", "a4-quantized"))
    assert a16.keys() == full.keys() == quantized.keys()
    assert all(torch.equal(a16[k], full[k]) for k in a16)
    assert not all(torch.equal(a16[k], quantized[k]) for k in a16)


def test_full_precision_calibration_resume_after_sigkill_is_byte_identical(tiny_models, tmp_path):
    """The replay carries the calibration states through the finished blocks with activations unquantized, and the
    evaluation states with them quantized, as the uninterrupted run did (killed after block 2 of 4)."""
    assert_resume_after_sigkill_is_byte_identical(tiny_models["llama"], tmp_path,
                                                  [*W4_EXPLICIT, "--a-bits", "4", "--calib-acts", "full"])


def test_full_precision_stream_resume_after_sigkill_is_byte_identical(tiny_models, tmp_path):
    """--asym-targets model: the replay carries the full-precision stream through the finished blocks
    unquantized (rebuilt with their saved R2), beside the calibration states through the quantized ones; W4A4 dart,
    so R2, the activation quantizers the stream leaves out and the online transforms all take part."""
    assert_resume_after_sigkill_is_byte_identical(tiny_models["llama"], tmp_path,
                                                  [*W4_EXPLICIT, "--a-bits", "4", "--hessians", "sequential",
                                                   "--asym-calib", "--asym-targets", "model"])


def _per_token_int4(t: torch.Tensor, clip: float = 0.9) -> torch.Tensor:
    """The runtime's activation quantizer written out in fp64: per token, asymmetric, range [min, max] ∋ 0 times
    the clip ratio, 15 steps, integer zero point."""
    lo = t.amin(-1, keepdim=True).clamp(max=0) * clip
    hi = t.amax(-1, keepdim=True).clamp(min=0) * clip
    scale = (hi - lo) / 15
    zero = torch.round(-lo / scale)
    return (torch.clamp(torch.round(t / scale) + zero, 0, 15) - zero) * scale


def test_asym_calib_reproduces_the_output_on_the_unquantized_input(tiny_models, tmp_path):
    """--asym-calib: GPTQ fits the linear's output on its input before the activation quantizer, from the quantized
    input. Checked on block 0's q/k/v of the plain model, whose inputs transformers' own forward gives: the run's
    weights agree with GPTQ solved on that pair (the quantizer written out above), and a run without the option
    does not."""
    from transformers import AutoModelForCausalLM

    model = tiny_models["llama"]
    calib = str(WIKITEXT / "valid.txt") if (WIKITEXT / "valid.txt").exists() else "default"
    ids = calibration_windows(tokenize_in_pieces(load_tokenizer(model), read_text(calib)), 48, 6, 5)
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    attn = hf.model.layers[0].self_attn
    seen = []
    handle = attn.q_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        hf(ids)
    handle.remove()
    t = torch.cat(seen)
    gptq = GPTQ(t.shape[1], targets=True)   # GPTQ's own algebra is checked against fp64 in test_gptq
    gptq.add_batch(_per_token_int4(t.double()).float(), t)
    names = ("q_proj", "k_proj", "v_proj")
    stacked = torch.cat([getattr(attn, n).weight.data for n in names])
    ref = gptq.quantize(stacked, WeightQuantConfig(bits=4, group_size=16, symmetric=True)).weight
    reference = dict(zip((f"0.self_attn.{n}" for n in names), ref.split([getattr(attn, n).out_features for n in names])))
    w4a4 = [*PLAIN_W4A16, "--a-bits", "4"]   # the later --a-bits wins
    shares = {}
    for name, extra in (("asym", ["--asym-calib"]), ("plain", ["--no-asym-calib"])):
        out = tmp_path / name
        res = run_cli(*run_args(model, out, *w4a4, "--hessians", "one-pass", *extra))
        assert res.returncode == 0, res.stderr
        shares[name] = agreement(out, model, reference)
    assert shares["asym"] > 0.95 and shares["plain"] < 0.8, shares


def test_asym_targets_model_are_the_full_precision_models_inputs(tiny_models, tmp_path):
    """--asym-calib --asym-targets model (GPTAQ, sequential GPTQ): the run keeps a full-precision stream beside the quantized one,
    and GPTQ fits each linear's output on the full-precision model's input from the quantized model's input. Checked
    on block 1's q/k/v of the plain W4A16 model against transformers' own forwards: the original model gives the
    targets, the model with the run's written (quantized) block 0 the inputs; GPTQ solved on that pair with a
    quarter step (pipeline.FP_STREAM_STEP) agrees with the run's weights, and a run without the option does not."""
    from transformers import AutoModelForCausalLM

    from streamquant.pipeline import FP_STREAM_STEP

    model = tiny_models["llama"]
    calib = str(WIKITEXT / "valid.txt") if (WIKITEXT / "valid.txt").exists() else "default"
    ids = calibration_windows(tokenize_in_pieces(load_tokenizer(model), read_text(calib)), 48, 6, 5)
    runs = {}
    for name, extra in (("asym", ["--asym-calib"]), ("plain", ["--no-asym-calib"])):
        runs[name] = tmp_path / name
        res = run_cli(*run_args(model, runs[name], *PLAIN_W4A16, "--hessians", "sequential", "--asym-targets", "model",
                                *extra))
        assert res.returncode == 0, res.stderr

    def q_proj_inputs(block0: dict[str, torch.Tensor] | None) -> torch.Tensor:
        hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        if block0 is not None:   # the quantized model up to block 1's input: block 0 as the run wrote it
            hf.model.layers[0].load_state_dict(block0, strict=True)
        seen = []
        q = hf.model.layers[1].self_attn.q_proj
        handle = q.register_forward_pre_hook(lambda m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
        with torch.no_grad():
            hf(ids)
        handle.remove()
        return torch.cat(seen)

    out = runs["asym"]
    spec, manifest = read_spec(out), read_manifest(out)
    t, x = q_proj_inputs(None), q_proj_inputs(read_block(out, 0, spec, manifest))
    assert not torch.allclose(x, t)   # the quantized block 0 moved the inputs: there is something to undo
    gptq = GPTQ(t.shape[1], targets=True)
    gptq.add_batch(x, t)
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    attn = hf.model.layers[1].self_attn
    names = ("q_proj", "k_proj", "v_proj")
    stacked = torch.cat([getattr(attn, n).weight.data for n in names])
    ref = gptq.quantize(stacked, WeightQuantConfig(bits=4, group_size=16, symmetric=True),
                        target_step=FP_STREAM_STEP).weight
    reference = dict(zip((f"1.self_attn.{n}" for n in names), ref.split([getattr(attn, n).out_features for n in names])))
    shares = {name: agreement(out, model, reference) for name, out in runs.items()}
    assert shares["asym"] > 0.95 and shares["plain"] < 0.8, shares
