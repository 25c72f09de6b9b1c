"""The incremental checkpoint: loadable W4A16 export, resume after SIGKILL is byte-identical, partial never passes."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import WIKITEXT, last_json, run_cli
from streamquant.data import eval_windows, load_tokenizer, tokenize

FAST = ["--samples", "6", "--seqlen", "48", "--r1-epochs", "2", "--r2-epochs", "1", "--r1-reservoir", "1MiB"]


def run_args(model, out, *extra):
    calib = WIKITEXT / "valid.txt"
    return ["run", str(model), "--out", str(out), "--calib", str(calib) if calib.exists() else "default", *FAST, *extra]


def tree(out: Path) -> dict[str, bytes]:
    """Every file of an output except the run report and run.log (they record wall-clock times; neither is in the
    manifest's checkpoint files)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name not in ("report.json", "run.log")}


def hf_ppl(model_dir: Path, text: Path, seqlen: int, windows: int) -> float:
    from transformers import AutoModelForCausalLM

    ids = eval_windows(tokenize(load_tokenizer(model_dir), text.read_text()), seqlen, windows)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return math.exp(sum(float(model(w[None], labels=w[None]).loss) for w in ids) / len(ids))


@pytest.mark.parametrize("arch,extra", [("llama", ["--weights", "gptq", "--group-size", "16"]),
                                        ("llama", ["--weights", "gptq", "--group-size", "16", "--refit-scales", "2"]),
                                        ("qwen2", ["--weights", "rtn", "--method", "quarot"]),
                                        ("qwen3", ["--weights", "gptq", "--group-size", "16"]),
                                        ("phi3", ["--weights", "gptq", "--group-size", "16"])])
def test_w4a16_loads_in_transformers(tiny_models, eval_text, tmp_path, arch, extra):
    out = tmp_path / "w4a16"
    res = run_cli(*run_args(tiny_models[arch], out, "--w-bits", "4", "--a-bits", "16", *extra, "--json"))
    assert res.returncode == 0, res.stderr
    assert last_json(res.stdout)["format"] == "pack-quantized"
    ours = run_cli("eval", str(out), "--data", str(eval_text), "--seqlen", "48", "--windows", "3", "--json")
    assert ours.returncode == 0, ours.stderr
    theirs = hf_ppl(out, eval_text, 48, 3)
    assert abs(last_json(ours.stdout)["ppl"] - theirs) <= 1e-3 * theirs
    from transformers import AutoModelForCausalLM  # the linears really are compressed-tensors INT4 modules
    assert "compressed" in AutoModelForCausalLM.from_pretrained(out).config.quantization_config.quant_method


@pytest.mark.parametrize("extra", [["--no-o-online"], ["--o-online"]])
def test_w4a4_output_evaluates_like_the_run(tiny_models, eval_text, tmp_path, extra):
    """The streamquant format (online R3/R4 and o_proj's Hadamard, act/KV quantizers) reloads to the PPL the run
    measured in-pass."""
    out = tmp_path / "w4a4"
    res = run_cli(*run_args(tiny_models["mistral"], out, "--a-bits", "4", "--kv-bits", "4", "--weights", "gptq",
                            "--eval", str(eval_text), "--eval-windows", "3", "--json", *extra))
    assert res.returncode == 0, res.stderr
    run_ppl = last_json(res.stdout)["ppl"]
    ev = run_cli("eval", str(out), "--data", str(eval_text), "--seqlen", "48", "--windows", "3", "--json")
    assert ev.returncode == 0, ev.stderr
    assert abs(last_json(ev.stdout)["ppl"] - run_ppl) <= 1e-5 * run_ppl
    runtime = json.loads((out / "config.json").read_text())["streamquant"]["runtime"]
    assert ("o_seed" in runtime) == (extra == ["--o-online"])   # the reload applied what the run did


@pytest.fixture(scope="module")
def reference_run(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    res = run_cli(*run_args(tiny_models["llama"], out, "--a-bits", "4", "--weights", "gptq"))
    assert res.returncode == 0, res.stderr
    return out


@pytest.mark.parametrize("crash", ["tmp:R1.safetensors", "after:block-00000.safetensors",
                                   "tmp:block-00002.safetensors", "tmp:head.safetensors"])
def test_resume_after_sigkill_is_byte_identical(tiny_models, reference_run, tmp_path, crash):
    out = tmp_path / "out"
    args = run_args(tiny_models["llama"], out, "--a-bits", "4", "--weights", "gptq")
    env = dict(os.environ, STREAMQUANT_CRASH_AT=crash)
    exe = Path(sys.executable).with_name("streamquant")
    killed = subprocess.run([str(exe), *args], env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    if crash == "tmp:head.safetensors":  # every block is on disk: the most complete-looking partial output
        ev = run_cli("eval", str(out), "--seqlen", "48", "--windows", "1")
        assert ev.returncode == 2 and "incomplete" in ev.stderr  # never taken for a finished one
        assert run_cli("verify", str(out)).returncode == 1
        assert run_cli(*args).returncode == 2  # non-empty --out without --resume is refused
    resumed = run_cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert tree(out) == tree(reference_run)
    assert run_cli("verify", str(out)).returncode == 0


def test_resume_after_external_sigkill(tiny_models, reference_run, tmp_path):
    """A kill from outside at whatever point the run has reached once block 1 exists."""
    out = tmp_path / "out"
    args = run_args(tiny_models["llama"], out, "--a-bits", "4", "--weights", "gptq")
    proc = subprocess.Popen([str(Path(sys.executable).with_name("streamquant")), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "block-00001.safetensors").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run_cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert tree(out) == tree(reference_run)


def test_verify_reports_corrupt_and_missing(reference_run, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(reference_run, out)
    assert run_cli("verify", str(out)).returncode == 0
    shard = out / "block-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    (out / "block-00002.safetensors").unlink()
    res = run_cli("verify", str(out))
    assert res.returncode == 1
    assert "block-00001.safetensors: corrupt" in res.stderr and "block-00002.safetensors: missing" in res.stderr


def test_group_size_that_does_not_divide_is_one_line(tiny_models, tmp_path):
    res = run_cli(*run_args(tiny_models["llama"], tmp_path / "o", "--group-size", "64", "--a-bits", "16"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "--group-size 64 does not divide" in res.stderr and len(res.stderr.strip().splitlines()) == 1


# ---- fast unit tests: values in, files out, read back (no model, no subprocess) ----

def _unit_output(tmp_path, group_size: int, symmetric: bool):
    import json as _json

    from streamquant.formats import OutputFormat
    from streamquant.qblock import Runtime
    from streamquant.quant.quantizers import WeightQuantConfig
    from streamquant.quantized import QuantizedBlock, QuantizedLinear
    from streamquant.spec import read_spec

    cfg = dict(model_type="llama", hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, head_dim=16, vocab_size=40)
    (tmp_path / "config.json").write_text(_json.dumps(cfg))
    spec = read_spec(tmp_path)
    wcfg = WeightQuantConfig(4, group_size, symmetric)
    gen = torch.Generator().manual_seed(1)
    linears, dense = {}, {}
    for name, shape in spec.block_shapes().items():
        if len(shape) == 1:
            dense[name] = torch.randn(shape, generator=gen)
            continue
        groups = 1 if group_size == -1 else shape[1] // group_size
        lo, hi = (-8, 8) if symmetric else (0, 16)
        codes = torch.randint(lo, hi, shape, generator=gen, dtype=torch.int8)
        zero = torch.zeros(shape[0], groups) if symmetric else torch.randint(0, 16, (shape[0], groups), generator=gen).float()
        linears[name.removesuffix(".weight")] = QuantizedLinear(codes, torch.rand(shape[0], groups, generator=gen) + 0.1,
                                                                zero, wcfg)
    block = QuantizedBlock(0, dense, linears, r2=torch.eye(16, dtype=torch.float64)[None])
    fmt = OutputFormat("pack-quantized", spec, wcfg, Runtime(), torch.float32)
    identity = {"run": {"w_bits": 4, "group_size": group_size, "w_symmetric": symmetric}, "num_layers": 2}
    return spec, block, fmt, identity


@pytest.mark.parametrize("group_size,symmetric", [(-1, True), (16, False)])
def test_block_values_round_trip_through_the_files(tmp_path, group_size, symmetric):
    """What the writer stores and the reader dequantizes equals (codes − zero)·scale, computed densely here."""
    from streamquant.reader import read_block
    from streamquant.writer import OutputWriter

    (tmp_path / "model").mkdir()
    spec, block, fmt, identity = _unit_output(tmp_path / "model", group_size, symmetric)
    writer = OutputWriter(tmp_path / "out")
    assert writer.begin(identity, fmt) == (None, 0)
    writer.write_block(block)
    back = read_block(tmp_path / "out", 0, spec, writer.manifest)
    for name, lin in block.linears.items():
        g = lin.codes.shape[1] // lin.scale.shape[1]
        # (codes − zero) is a small integer, so its product with an fp32 scale rounds once: exact in fp32
        dense = (lin.codes.float() - lin.zero.repeat_interleave(g, 1)) * lin.scale.repeat_interleave(g, 1)
        assert torch.equal(back[f"{name}.weight"], dense), name
    for name, t in block.dense.items():
        assert torch.equal(back[name], t)
    assert writer.manifest["blocks"] == ["block-00000.safetensors"] and not writer.manifest["complete"]


def test_resume_checks_identity_and_integrity(tmp_path):
    from streamquant.errors import UserError
    from streamquant.writer import OutputWriter

    (tmp_path / "model").mkdir()
    spec, block, fmt, identity = _unit_output(tmp_path / "model", -1, True)
    first = OutputWriter(tmp_path / "out")
    first.begin(identity, fmt)
    first.write_r1(torch.eye(32, dtype=torch.float64))
    first.write_block(block)
    r1, done = OutputWriter(tmp_path / "out", resume=True).begin(identity, fmt)
    assert done == 1 and torch.equal(r1, torch.eye(32, dtype=torch.float64))
    with pytest.raises(UserError, match="different options"):
        OutputWriter(tmp_path / "out", resume=True).begin({**identity, "run": {"w_bits": 16}}, fmt)
    with pytest.raises(UserError, match="not empty"):
        OutputWriter(tmp_path / "out").begin(identity, fmt)
    path = tmp_path / "out" / "block-00000.safetensors"
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    with pytest.raises(UserError, match="block-00000.safetensors: corrupt"):
        OutputWriter(tmp_path / "out", resume=True).begin(identity, fmt)


def test_method_none_keeps_the_plain_model(tiny_models, tmp_path):
    """`--method none` is the unrotated baseline: unquantized, every block tensor is the original's, norms included
    (σ is not fused into the weights RTN/GPTQ would round)."""
    from safetensors import safe_open

    from streamquant.shards import ShardIndex
    from streamquant.spec import read_spec

    out = tmp_path / "none"
    res = run_cli(*run_args(tiny_models["qwen2"], out, "--method", "none", "--w-bits", "16", "--a-bits", "16"))
    assert res.returncode == 0, res.stderr
    spec = read_spec(tiny_models["qwen2"])
    original = ShardIndex(tiny_models["qwen2"], spec).load_block(1)
    with safe_open(str(out / "block-00001.safetensors"), framework="pt") as fh:
        written = {k.removeprefix("model.layers.1."): fh.get_tensor(k) for k in fh.keys()}
    assert written.keys() == original.keys()
    assert all(torch.equal(written[k], original[k]) for k in original)
    assert not torch.equal(original["input_layernorm.weight"], torch.ones_like(original["input_layernorm.weight"]))
