"""The front door (issue 16): scheme presets, progress people can read, the end-of-run summary, Ctrl-C that leaves
a resumable output, and bad input found by trying (one line, exit 2)."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import last_json, run_cli
from test_writer import run_args, tree

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "
EXE = str(Path(sys.executable).with_name("streamquant"))


# ---- presets ----

def test_presets_fill_only_what_was_not_given(tiny_models):
    from streamquant.errors import UserError
    from streamquant.preflight import RunConfig
    from streamquant.schemes import build_config

    base = RunConfig(model=str(tiny_models["llama"]))
    none = dict(method=None, w_bits=None, a_bits=None, kv_bits=None, weights=None, group_size=None)
    cfg, choice = build_config(base, None, none)
    # llama tiny: linear inputs 96 (hidden, heads*head_dim) and 224 (intermediate): 128 and 64 do not divide 96/224
    assert (choice.scheme, cfg.method, cfg.weights, cfg.w_bits, cfg.a_bits, cfg.kv_bits, cfg.group_size) == \
        ("w4a16", "quarot", "gptq", 4, 16, 16, 32)
    assert "group 32 divides every linear input" in choice.line(cfg)
    assert cfg.w_symmetric and cfg.act_order and "act-order" in choice.line(cfg)
    # one-pass Hessians with a rotation, sequential without one, an explicit --hessians as given
    assert cfg.hessians == "one-pass" and "one-pass Hessians" in choice.line(cfg)
    assert build_config(base, None, {**none, "method": "dart"})[0].hessians == "one-pass"
    assert build_config(base, None, {**none, "method": "none"})[0].hessians == "sequential"
    assert build_config(base, None, {**none, "hessians": "sequential"})[0].hessians == "sequential"
    assert build_config(base, "w4a4", none)[0].hessians == "sequential"
    # the MSE clip search for GPTQ without a rotation only; an explicit --w-clip/--no-w-clip as given
    assert not cfg.w_clip and "MSE-clipped" not in choice.line(cfg)
    cfg_none, _ = build_config(base, None, {**none, "method": "none"})
    assert cfg_none.w_clip and "MSE-clipped" in choice.line(cfg_none)
    assert not build_config(base, None, {**none, "method": "none", "weights": "rtn"})[0].w_clip
    assert not build_config(base, None, {**none, "method": "none", "w_clip": False})[0].w_clip
    assert build_config(base, "w4a16-r4", {**none, "w_clip": True})[0].w_clip
    cfg, _ = build_config(base, None, {**none, "w_symmetric": False, "act_order": False})   # flags win over the preset
    assert not cfg.w_symmetric and not cfg.act_order and "asymmetric" in choice.line(cfg)
    cfg, _ = build_config(base, "w4a16", {**none, "group_size": 16, "weights": "rtn"})
    assert (cfg.group_size, cfg.weights) == (16, "rtn")
    # the reference-output test's explicit flags give the preset's config: no group, KV16
    cfg, choice = build_config(base, None, {**none, "method": "dart", "w_bits": 4, "a_bits": 4, "weights": "gptq"})
    assert choice.scheme == "w4a4" and cfg.group_size == -1 and cfg.kv_bits == 16 and cfg.w_symmetric
    assert cfg.w_clip   # W4A4 presets: MSE clip search on
    cfg, choice = build_config(base, "w4a4kv4", none)
    assert (cfg.a_bits, cfg.kv_bits, cfg.group_size, cfg.w_clip) == (4, 4, -1, True)
    # asymmetric calibration: on in the W4A4 presets, as given, and never where it cannot apply (16-bit activations,
    # RTN weights, full-precision calibration)
    cfg, choice = build_config(base, "w4a4", none)
    assert cfg.asym_calib and cfg.asym_targets == "input" and "asymmetric calibration (input" in choice.line(cfg)
    assert build_config(base, "w4a4kv4", none)[0].asym_calib
    assert not build_config(base, "w4a4", {**none, "asym_calib": False})[0].asym_calib
    assert not build_config(base, "w4a4", {**none, "weights": "rtn"})[0].asym_calib
    assert not build_config(base, "w4a4", {**none, "calib_acts": "full"})[0].asym_calib
    assert not build_config(base, None, none)[0].asym_calib
    assert not build_config(base, "w4a8", none)[0].asym_calib
    # its targets: before the activation quantizer where there is one, else the full-precision model's; the presets
    # turn on only the first (the second costs a full-precision stream), and a user's choice of targets wins
    cfg = build_config(base, "w4a16", {**none, "asym_calib": True})[0]
    assert cfg.asym_calib and cfg.asym_targets == "model"
    assert not build_config(base, "w4a4", {**none, "asym_targets": "model"})[0].asym_calib
    assert build_config(base, "w4a4", {**none, "asym_targets": "model", "asym_calib": True})[0].asym_targets == "model"
    # one round of GPTQ's scale refit for weight-only GPTQ; never with RTN (refused there) nor at W4A4; as given
    cfg, choice = build_config(base, None, none)
    assert cfg.refit_scales == 1 and "scales refitted (1 round)" in choice.line(cfg)
    assert build_config(base, None, {**none, "method": "none"})[0].refit_scales == 1
    assert build_config(base, None, {**none, "weights": "rtn"})[0].refit_scales == 0
    assert build_config(base, "w4a16", {**none, "a_bits": 4})[0].refit_scales == 0
    assert build_config(base, None, {**none, "refit_scales": 0})[0].refit_scales == 0
    cfg, choice = build_config(base, None, {**none, "refit_scales": 3})
    assert cfg.refit_scales == 3 and "scales refitted (3 rounds)" in choice.line(cfg)
    assert build_config(base, "w4a4", none)[0].refit_scales == 0
    assert build_config(base, "w4a16-r4", none)[0].refit_scales == 1
    # R1's step 1e-2 in w4a4 (also when inferred from --a-bits 4), the reference's 1e-3 elsewhere; as given
    assert build_config(base, None, none)[0].r1_train.lr == 1e-3
    assert build_config(base, "w4a8", none)[0].r1_train.lr == build_config(base, "w8a8", none)[0].r1_train.lr == 1e-3
    assert build_config(base, "w4a4", none)[0].r1_train.lr == 1e-2
    assert build_config(base, "w4a4kv4", none)[0].r1_train.lr == 1e-3
    assert build_config(base, None, {**none, "kv_bits": 4})[0].r1_train.lr == 1e-3
    assert build_config(base, None, {**none, "a_bits": 4})[0].r1_train.lr == 1e-2
    assert build_config(base, "w4a4", {**none, "r1_lr": 3e-3})[0].r1_train.lr == 3e-3
    assert build_config(base, None, {**none, "r1_lr": 5e-4})[0].r1_train.lr == 5e-4
    # the serving presets carry what their compressed-tensors format requires
    cfg, _ = build_config(base, "w4a16-r4", none)
    assert (cfg.w_bits, cfg.a_bits, cfg.group_size, cfg.r4_online) == (4, 16, 32, True)
    cfg, _ = build_config(base, "w8a8", none)
    assert (cfg.w_bits, cfg.a_bits, cfg.group_size, cfg.a_symmetric, cfg.a_clip) == (8, 8, -1, True, 1.0)
    cfg, _ = build_config(base, "w4a8", none)
    assert (cfg.w_bits, cfg.a_bits, cfg.a_symmetric, cfg.a_clip) == (4, 8, True, 1.0)
    with pytest.raises(UserError, match="--scheme must be one of"):
        build_config(base, "w3a3", none)


def test_auto_group_size_picks_the_largest_that_divides():
    from streamquant.schemes import auto_group_size

    assert auto_group_size({"hidden": 4096, "intermediate": 11008})[0] == 128
    assert auto_group_size({"hidden": 576, "intermediate": 1536})[0] == 64     # SmolLM2-135M
    group, why = auto_group_size({"hidden": 80, "intermediate": 100})
    assert group == -1 and "per channel" in why and "intermediate=100" in why


def test_dry_run_alone_shows_preset_group_and_default_output(tiny_models):
    res = run_cli("run", str(tiny_models["llama"]), "--dry-run", "--samples", "4", "--seqlen", "48")
    assert res.returncode == 0, res.stderr
    assert "scheme w4a16 (default)" in res.stdout and "group 32" in res.stdout
    assert "output directory: llama-w4a16 (default" in res.stdout and "memory plan" in res.stdout
    plan = last_json(run_cli("plan", str(tiny_models["llama"]), "--scheme", "w4a4", "--samples", "4",
                             "--seqlen", "48", "--json").stdout)
    assert plan["scheme"] == "w4a4" and plan["group_size"] == -1 and plan["out"] == "llama-w4a4"


@pytest.mark.parametrize("args,message", [
    (["--scheme", "w9a9"], "--scheme must be one of w4a16, w4a16-r4, w8a8, w4a8, w4a4, w4a4kv4"),
    (["--group-size", "0"], "--group-size must be -1 (per channel) or a positive divisor"),
    (["--r1-steps-per-epoch", "-2"], "--r1-steps-per-epoch must be >= 0 (got -2)"),
    (["--r2-epochs", "-1"], "--r1-epochs and --r2-epochs must be >= 0"),
    (["--r1-lr", "0"], "--r1-lr must be > 0 (got 0.0)"),
    (["--calib-acts", "fp16"], "--calib-acts must be one of quantized, full (got 'fp16')"),
])
def test_bad_scheme_options_are_one_line(tiny_models, tmp_path, args, message):
    out = tmp_path / "o"
    res = run_cli("run", str(tiny_models["llama"]), "--out", str(out), "--samples", "2", "--seqlen", "32", *args)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and message in res.stderr, res.stderr
    assert not out.exists()


# ---- progress, run.log, summary ----

def test_plain_lines_run_log_and_summary(tiny_models, tmp_path):
    """stderr is a pipe here: timestamped lines per stage and per block; run.log holds them; verify ignores it."""
    out = tmp_path / "out"
    res = run_cli(*run_args(tiny_models["llama"], out, "--scheme", "w4a16", "--method", "dart"))  # every stage
    assert res.returncode == 0, res.stderr
    for pattern in (r"stage capture started", r"capture block 4/4 done in [\d.]+s · ETA", r"stage r1 done in",
                    r"stage blocks started", r"quantize block 1/4 done in [\d.]+s · ETA \d+:\d\d · host [\d.]+ GiB "
                    r"\(plan [\d.]+ GiB\)", r"stage blocks done in", r"stage head done in"):
        assert re.search("^" + STAMP + pattern, res.stderr, re.M), (pattern, res.stderr)
    log = (out / "run.log").read_text()
    assert re.search("^" + STAMP + "quantize block 4/4 done", log, re.M) and "scheme w4a16 (--scheme)" in log
    manifest = json.loads((out / "streamquant_manifest.json").read_text())
    assert manifest["complete"] and "run.log" not in manifest["files"]
    assert run_cli("verify", str(out)).returncode == 0
    for text in ("quantize", "peak host memory", "(plan", "output",
                 f"from_pretrained('{out}')", f"vllm serve {out}"):
        assert text in res.stdout, (text, res.stdout)
    quiet = run_cli(*run_args(tiny_models["llama"], tmp_path / "quiet", "--scheme", "w4a16", "--quiet"))
    assert quiet.returncode == 0 and quiet.stderr.strip() == "", quiet.stderr
    assert "quantize block 4/4" in (tmp_path / "quiet" / "run.log").read_text()


def test_terminal_view_in_tmux(tiny_models, tmp_path):
    """A real terminal: the bar shows the stage, block count, ETA and live host memory against the plan."""
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    session = f"sq-{os.getpid()}"
    out = tmp_path / "out"
    # dart (a capture stage, a learned R2 per block) over 96 × 128 tokens: a run of several seconds, so the screens
    # polled below catch its bars (the tiny default run took 1.6 s, between two screens)
    cmd = shlex.join([EXE, *run_args(tiny_models["llama"], out, "--scheme", "w4a16", "--method", "dart",
                                     "--samples", "96", "--seqlen", "128")])
    env = {k: v for k, v in os.environ.items() if k != "STREAMQUANT_PROGRESS"}
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "200", "-y", "50",
                    f"{cmd}; echo EXIT=$?; sleep 600"], check=True, env=env)
    screens = []
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            screen = subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True,
                                    text=True).stdout
            screens.append(screen)
            if "EXIT=" in screen:
                break
            time.sleep(0.1)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session])
    assert "EXIT=0" in screens[-1], screens[-1]
    bars = [s for s in screens if re.search(r"(capture|blocks|quantize) \d+/4", s) and "ETA" in s]
    assert bars, screens[-1]
    # the memory column (a bar's row may be caught mid-redraw on a loaded machine: any screen of the run counts)
    assert any(re.search(r"host [\d.]+ GiB \(plan [\d.]+ GiB\)", s) for s in screens), bars[-1]
    assert any("━" in s for s in bars)
    assert not re.search("^" + STAMP + "quantize block", screens[-1], re.M)   # a bar, not log lines
    assert "peak host memory" in screens[-1]


# ---- Ctrl-C ----

@pytest.fixture(scope="module")
def uninterrupted(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    res = run_cli(*run_args(tiny_models["llama"], out, "--scheme", "w4a4"))
    assert res.returncode == 0, res.stderr
    return out


def _resume_from_message(stderr: str) -> list[str]:
    """The command the run printed, run exactly as a user pastes it."""
    line = next(ln for ln in stderr.splitlines() if "continue with: " in ln)
    args = shlex.split(line.split("continue with: ", 1)[1])
    assert args[0] == "streamquant" and args[-1] == "--resume"
    return args[1:]


def _check_resume(stderr: str, out: Path, reference: Path) -> None:
    args = _resume_from_message(stderr)
    resumed = run_cli(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert tree(out) == tree(reference)
    assert run_cli("verify", str(out)).returncode == 0


def test_first_sigint_stops_after_the_block_and_resumes_byte_identical(tiny_models, uninterrupted, tmp_path):
    """SIGINT (a real signal, sent by the process to itself) while block 0 is being written: block 0 is finished
    and committed, block 1 never starts, exit 130, and the printed --resume command completes the same output."""
    out = tmp_path / "out"
    env = dict(os.environ, STREAMQUANT_PROGRESS="0", HF_HUB_OFFLINE="1",
               STREAMQUANT_SIGINT_AT="after:block-00000.safetensors")
    res = subprocess.run([EXE, *run_args(tiny_models["llama"], out, "--scheme", "w4a4")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 130, res.stderr
    assert "Traceback" not in res.stderr and "stopping after the current block" in res.stderr
    manifest = json.loads((out / "streamquant_manifest.json").read_text())
    assert manifest["blocks"] == ["block-00000.safetensors"] and not manifest["complete"]
    assert not (out / "block-00001.safetensors").exists()
    assert "1 of 4 blocks written" in res.stderr
    _check_resume(res.stderr, out, uninterrupted)


def test_second_sigint_aborts_at_once_and_still_resumes(tiny_models, uninterrupted, tmp_path):
    """Ctrl-C twice in the middle of writing block 1: the abort is immediate (block 1 never lands), the manifest
    stays valid (blocks 0 only) and --resume completes the same output."""
    out = tmp_path / "out"
    env = dict(os.environ, STREAMQUANT_PROGRESS="0", HF_HUB_OFFLINE="1",
               STREAMQUANT_SIGINT_AT="tmp:block-00001.safetensors", STREAMQUANT_SIGINT_COUNT="2")
    res = subprocess.run([EXE, *run_args(tiny_models["llama"], out, "--scheme", "w4a4")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 130, res.stderr
    assert "Traceback" not in res.stderr
    manifest = json.loads((out / "streamquant_manifest.json").read_text())
    assert manifest["blocks"] == ["block-00000.safetensors"] and not manifest["complete"]
    assert not (out / "block-00001.safetensors").exists()
    assert run_cli("verify", str(out)).returncode == 1   # incomplete, said so; not a crash
    _check_resume(res.stderr, out, uninterrupted)


def test_external_sigint_to_a_running_run(tiny_models, uninterrupted, tmp_path):
    """The user's Ctrl-C from outside, once block 0 exists: exit 130, a valid partial output, resume completes it."""
    out = tmp_path / "out"
    env = dict(os.environ, STREAMQUANT_PROGRESS="0", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([EXE, *run_args(tiny_models["llama"], out, "--scheme", "w4a4")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "block-00000.safetensors").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr
    manifest = json.loads((out / "streamquant_manifest.json").read_text())
    assert 1 <= len(manifest["blocks"]) < 4 and not manifest["complete"]
    _check_resume(stderr, out, uninterrupted)


# ---- bad input found by trying ----

def test_nan_weights_named_at_their_block(tiny_models, tmp_path):
    from safetensors.torch import load_file, save_file

    model = tmp_path / "m"
    shutil.copytree(tiny_models["llama"], model)
    name = "model.layers.2.mlp.down_proj.weight"
    shard = next(p for p in sorted(model.glob("*.safetensors")) if name in load_file(p))
    tensors = load_file(shard)
    tensors[name][3, 5] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    out = tmp_path / "out"
    res = run_cli(*run_args(model, out, "--scheme", "w4a16", "--quiet"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{shard.name}: tensor {name} holds NaN or Inf" in lines[0], res.stderr
    assert not out.exists() or not json.loads((out / "streamquant_manifest.json").read_text())["complete"]


def test_tampered_block_file_in_eval_names_it(uninterrupted, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(uninterrupted, out)
    block = out / "block-00001.safetensors"
    block.write_bytes(block.read_bytes()[:-64])
    res = run_cli("eval", str(out), "--seqlen", "48", "--windows", "1")
    assert res.returncode == 2 and "Traceback" not in res.stderr and "internal error" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "block-00001.safetensors is corrupt" in lines[0] and "streamquant verify" in lines[0]


def test_unreachable_hub_dataset_fails_fast_in_one_line(tiny_models, tmp_path):
    """No network (the Hub endpoint refuses connections), HF_HUB_OFFLINE unset: one line, no retry messages."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env |= {"HF_ENDPOINT": "http://127.0.0.1:9", "STREAMQUANT_PROGRESS": "0",
            "HF_HOME": str(tmp_path / "hf")}   # an empty cache
    res = subprocess.run([EXE, "run", str(tiny_models["llama"]), "--calib", "wikitext:wikitext-2-raw-v1:test",
                          "--samples", "2", "--seqlen", "32", "--dry-run"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr and "Retrying" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "the Hugging Face Hub is unreachable" in lines[0], res.stderr
