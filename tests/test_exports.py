"""Exports standard runtimes serve (issue 12): W4A16, W4A16 + R4 online, W8A8, W4A8 as compressed-tensors.

The reference is independent of our runtime: transformers' own forward with compressed-tensors' quantized linears
and activation quantizers, plus (for R4) compressed-tensors' HadamardTransform attached by `streamquant.load`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import WIKITEXT, last_json, run_cli
from streamquant.data import eval_windows, load_tokenizer, tokenize
from streamquant.kernels.hadamard import OnlineHadamard
from streamquant.quant.pack import from_transform_weight, to_transform_weight

FAST = ["--samples", "6", "--seqlen", "48", "--r1-epochs", "2", "--r2-epochs", "1", "--r1-reservoir", "1MiB"]
A8 = ["--a-bits", "8", "--a-symmetric", "--a-clip", "1"]
EXPORTS = {   # name: (options, format, R4 online)
    "w4a16": (["--w-bits", "4", "--a-bits", "16", "--weights", "gptq", "--group-size", "16"], "pack-quantized", False),
    "w4a16-r4": (["--w-bits", "4", "--a-bits", "16", "--weights", "gptq", "--group-size", "16", "--r4-online"],
                 "pack-quantized", True),
    "w4a16-asym": (["--w-bits", "4", "--a-bits", "16", "--weights", "gptq", "--group-size", "16", "--w-asym"],
                   "pack-quantized", False),
    "w8a8": (["--w-bits", "8", *A8, "--weights", "gptq"], "int-quantized", False),
    "w8a8-r4": (["--w-bits", "8", *A8, "--weights", "rtn", "--method", "quarot", "--r4-online"], "int-quantized", True),
    "w4a8-r4": (["--w-bits", "4", *A8, "--weights", "gptq", "--group-size", "32", "--r4-online"], "pack-quantized", True),
}
SEQLEN, WINDOWS = 48, 3


def _calib() -> str:
    path = WIKITEXT / "valid.txt"
    return str(path) if path.exists() else "default"


@pytest.fixture(scope="module")
def exports(tiny_models, eval_text, tmp_path_factory) -> dict[str, tuple[Path, float]]:
    """Each export once per module: (output directory, the PPL the run itself reported)."""
    done = {}
    for name, (opts, _, _) in EXPORTS.items():
        out = tmp_path_factory.mktemp(name) / "out"
        res = run_cli("run", str(tiny_models["llama"]), "--out", str(out), "--calib", _calib(), *FAST, *opts,
                      "--eval", str(eval_text), "--eval-windows", str(WINDOWS), "--json")
        assert res.returncode == 0, res.stderr
        done[name] = (out, last_json(res.stdout)["ppl"])
    return done


def _ppl(model, out: Path, text: Path, seqlen: int = SEQLEN, windows: int = WINDOWS) -> float:
    """The same windows and PPL definition as `streamquant eval` (exp of the mean of per-window mean NLLs)."""
    ids = eval_windows(tokenize(load_tokenizer(out), text.read_text()), seqlen, windows)
    with torch.no_grad():
        return math.exp(sum(float(model(w[None], labels=w[None]).loss) for w in ids) / len(ids))


def check_export(out: Path, fmt: str, r4: bool, text: Path, seqlen: int, windows: int, plain: bool = True) -> float:
    """`streamquant eval` of `out`, transformers + compressed-tensors (+ `streamquant.load` for online transforms)
    of the same files: same PPL within 1e-4, and every stored key used (`streamquant.load` refuses a load with a
    missing or unused key). `plain`: also load with transformers alone and show what it drops."""
    from transformers import AutoModelForCausalLM

    import streamquant

    config = json.loads((out / "config.json").read_text())
    qcfg = config["quantization_config"]
    assert qcfg["format"] == fmt and ("transform_config" in qcfg) == r4
    ours = run_cli("eval", str(out), "--data", str(text), "--seqlen", str(seqlen), "--windows", str(windows), "--json")
    assert ours.returncode == 0, ours.stderr
    ours_ppl = last_json(ours.stdout)["ppl"]

    layers = config["num_hidden_layers"]
    transform_keys = {f"model.layers.{i}.mlp.down_proj.R4_input.weight" for i in range(layers)} if r4 else set()
    loaded = streamquant.load(out, dtype=torch.float32)    # our loader uses every key (it raises otherwise)
    assert set(loaded.streamquant_transforms) == transform_keys
    theirs = _ppl(loaded, out, text, seqlen, windows)
    del loaded
    assert abs(theirs - ours_ppl) <= 1e-4 * ours_ppl, (theirs, ours_ppl)
    asymmetric = not all(g["weights"]["symmetric"] for g in qcfg["config_groups"].values())
    if plain and not asymmetric:   # plain transformers refuses packed zero points (see `packed_zero_point_shapes`)
        model, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
        assert not info["missing_keys"] and not info["mismatched_keys"]
        assert set(info["unexpected_keys"]) == transform_keys   # plain transformers leaves R4 on the floor ...
        plain_ppl = _ppl(model, out, text, seqlen, windows)
        if r4:   # ... and computes something else: the online transform is what makes the export right
            assert abs(plain_ppl - ours_ppl) > 1e-3 * ours_ppl
        else:
            assert plain_ppl == theirs
    return ours_ppl


@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_export_runs_in_transformers_like_our_eval(exports, eval_text, name):
    out, run_ppl = exports[name]
    ours = run_cli("eval", str(out), "--data", str(eval_text), "--seqlen", str(SEQLEN), "--windows", str(WINDOWS),
                   "--json")
    assert ours.returncode == 0, ours.stderr
    assert abs(last_json(ours.stdout)["ppl"] - run_ppl) <= 1e-6 * run_ppl   # the run computed what the export says
    _, fmt, r4 = EXPORTS[name]
    check_export(out, fmt, r4, eval_text, SEQLEN, WINDOWS)


SMOLLM2_EXPORTS = {   # name: (options, format, R4 online); dart GPTQ once, the rest data-free (quarot RTN) for time
    "w4a16": (["--scheme", "w4a16", "--method", "dart", "--samples", "4", "--seqlen", "128", "--r1-epochs", "1",
               "--r2-epochs", "1", "--r1-reservoir", "4MiB"], "pack-quantized", False),
    "w4a16-r4": (["--scheme", "w4a16-r4", "--method", "quarot", "--weights", "rtn"], "pack-quantized", True),
    "w8a8": (["--scheme", "w8a8", "--method", "quarot", "--weights", "rtn"], "int-quantized", False),
    "w4a8-r4": (["--scheme", "w4a8", "--method", "quarot", "--weights", "rtn", "--r4-online"], "pack-quantized", True),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMOLLM2_EXPORTS))
def test_smollm2_exports_run_in_transformers_like_our_eval(smollm2, eval_text, tmp_path, name):
    opts, fmt, r4 = SMOLLM2_EXPORTS[name]
    out = tmp_path / name
    res = run_cli("run", "smollm2-135m", "--out", str(out), "--calib", _calib(), *opts, "--json", timeout=1800)
    assert res.returncode == 0, res.stderr
    # one window (compressed-tensors' fake-quantized forward takes seconds per window on 2 cores); transformers
    # alone is shown to drop R4 on the tiny models above
    ppl = check_export(out, fmt, r4, eval_text, 256, 1, plain=False)
    assert ppl < 60   # still a language model after quantization (fp32 SmolLM2 is ~28 on 512-token test windows)


def test_stored_r4_as_the_loader_applies_it_is_the_run_r4(exports):
    """The R4 in the export, applied by compressed-tensors' transform as loaded, equals OnlineHadamard(n, seed)."""
    import streamquant

    out, _ = exports["w4a16-r4"]
    seed = json.loads((out / "streamquant_manifest.json").read_text())["runtime"]["r4_seed"]
    assert seed is not None
    model = streamquant.load(out, dtype=torch.float32)
    for i, layer in enumerate(model.model.layers):
        n = layer.mlp.down_proj.in_features
        run_r4 = OnlineHadamard(n, seed).matrix()
        applied = layer.mlp.down_proj.R4_input(torch.eye(n, dtype=torch.float32)).double()   # rows: e_k @ R4
        assert torch.allclose(applied, run_r4, atol=1e-6, rtol=0)
        with safe_open(str(out / f"block-{i:05d}.safetensors"), framework="pt") as fh:
            stored = fh.get_tensor(f"model.layers.{i}.mlp.down_proj.R4_input.weight")
        assert stored.dtype == torch.float32 and torch.equal(from_transform_weight(stored), run_r4)
        assert not torch.allclose(run_r4, OnlineHadamard(n, seed + 1).matrix())   # the seed matters


def test_smollm2_r4_size_is_an_exact_pm1_matrix_for_compressed_tensors():
    """SmolLM2's 1536 = 12·128 is no power of two: the dense stored weight carries it. It is exactly ±1 (so the
    bf16 copy vLLM loads is exact too), and compressed-tensors' transform applies exactly our matrix."""
    from compressed_tensors.transform import TransformArgs, TransformScheme
    from compressed_tensors.transform.factory.hadamard import HadamardTransform

    r4 = OnlineHadamard(1536, 4)
    stored = to_transform_weight(r4.matrix())
    assert torch.equal(stored.abs(), torch.ones_like(stored))
    assert torch.equal(stored.to(torch.bfloat16).float(), stored)
    scheme = TransformScheme(type="random-hadamard")
    args = TransformArgs(targets=["re:.*down_proj$"], location="input")
    t = HadamardTransform(torch.nn.Parameter(stored, requires_grad=False), None, scheme, args, torch.nn.Linear)
    x = torch.randn(5, 1536, dtype=torch.float64)
    assert torch.allclose(t(x.float()).double(), x @ r4.matrix(), atol=1e-5, rtol=0)


def test_exported_configs_parse_in_compressed_tensors(exports):
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.transform import TransformConfig

    for name, (out, _) in exports.items():
        qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
        parsed = QuantizationConfig.model_validate(qcfg)
        inputs = parsed.config_groups["group_0"].input_activations
        weights = parsed.config_groups["group_0"].weights
        assert weights.symmetric == ("--w-asym" not in EXPORTS[name][0]), name
        assert weights.actorder is None, name   # act-order's static groups need no g_idx
        if "--a-symmetric" in EXPORTS[name][0]:
            assert inputs.num_bits == 8 and inputs.symmetric and inputs.dynamic and inputs.strategy == "token"
        else:
            assert inputs is None
        if "transform_config" in qcfg:
            (group,) = TransformConfig.model_validate(qcfg["transform_config"]).config_groups.values()
            assert [a.location for a in group.apply] == ["input"]     # only the online half; the inverse is fused
            assert "streamquant_online_transforms" in json.loads((out / "config.json").read_text())


@pytest.mark.parametrize("opts,words", [
    (["--format", "int-quantized", "--w-bits", "8", "--a-bits", "8"], "symmetric"),         # asymmetric A8
    (["--format", "pack-quantized", "--a-bits", "8", "--a-symmetric"], "unclipped"),          # clip 0.9
    (["--format", "pack-quantized", "--a-bits", "4", "--a-symmetric", "--a-clip", "1"], "int8"),
    (["--format", "int-quantized", "--w-bits", "4", "--a-bits", "16"], "8-bit weights"),
    (["--format", "pack-quantized", "--a-bits", "16", "--kv-bits", "4"], "KV"),
    (["--w-bits", "8", "--a-bits", "4"], "int-quantized"),                                    # no 8-bit streamquant
    (["--r4-online", "--method", "none", "--a-bits", "16"], "rotation"),
    (["--o-online", "--method", "none", "--a-bits", "4"], "rotation"),
    (["--o-online", "--format", "pack-quantized", "--a-bits", "16"], "o_proj"),
])
def test_options_an_export_cannot_express_are_one_line(tiny_models, tmp_path, opts, words):
    res = run_cli("run", str(tiny_models["llama"]), "--out", str(tmp_path / "o"), *FAST, *opts)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert words in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_loader_refuses_the_private_format(tmp_path):
    from streamquant.errors import UserError
    import streamquant

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "streamquant": {"format": "streamquant"}}))
    with pytest.raises(UserError, match="streamquant eval"):
        streamquant.load(tmp_path)


def test_auto_format_keeps_existing_choices():
    from streamquant.formats import resolve_format

    assert resolve_format("auto", 4, 16, 16) == "pack-quantized"
    assert resolve_format("auto", 4, 4, 16) == "streamquant"
    assert resolve_format("auto", 4, 8, 16) == "streamquant"              # asymmetric/clipped A8: ours, as before
    assert resolve_format("auto", 4, 8, 16, a_exportable=True) == "pack-quantized"
    assert resolve_format("auto", 8, 8, 16, a_exportable=True) == "int-quantized"
    assert resolve_format("auto", 8, 16, 16, a_exportable=True) == "int-quantized"
    assert resolve_format("auto", 4, 8, 4, a_exportable=True) == "streamquant"
    assert resolve_format("auto", 4, 16, 16, o_online=True) == "streamquant"   # online parts only ours carries


@pytest.mark.parametrize("opts, loader", [
    (["--weights", "rtn", "--method", "none"], "AutoModelForCausalLM.from_pretrained"),
    (["--weights", "rtn", "--method", "none", "--w-asym"], "streamquant.load"),   # plain transformers refuses it
    (["--weights", "rtn", "--method", "quarot", "--r4-online"], "streamquant.load"),  # plain drops R4
])
def test_the_load_command_the_run_prints_loads_the_export(tiny_models, tmp_path, opts, loader):
    import subprocess
    import sys

    out = tmp_path / "out"
    res = run_cli("run", str(tiny_models["llama"]), "--out", str(out), "--w-bits", "4", "--a-bits", "16",
                  "--group-size", "16", *opts)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    command = lines[next(i for i, line in enumerate(lines) if line.startswith("load it")) + 1].strip()
    assert command.startswith('python -c "') and loader in command, command
    code = command.removeprefix('python -c "').removesuffix('"')
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
