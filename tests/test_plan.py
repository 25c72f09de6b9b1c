"""The planner works from headers alone, fits the micro-batch to --gpu-mem, refuses impossible budgets early,
and --dry-run writes nothing."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import last_json, run_cli

from streamquant.synthetic import LLAMA2_70B, write_checkpoint

GIB = 1 << 30


@pytest.fixture(scope="module")
def sparse_70b(tmp_path_factory) -> Path:
    """Llama-2-70B's 80 blocks as safetensors headers over holes: 137 GB of apparent size, almost no disk."""
    return write_checkpoint(tmp_path_factory.mktemp("s70") / "model", dict(LLAMA2_70B), sparse=True)


def _allocated(path: Path) -> int:
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file())


def test_plan_70b_from_headers_only(sparse_70b):
    res = run_cli("plan", str(sparse_70b), "--gpu-mem", "23GiB", "--samples", "128", "--seqlen", "2048", "--json")
    assert res.returncode == 0, res.stderr
    plan = last_json(res.stdout)
    for key in ("peak_gpu_bytes", "peak_host_bytes", "output_bytes", "micro_batch", "min_gpu_bytes", "stages"):
        assert key in plan
    assert 1 <= plan["micro_batch"] <= 128
    assert plan["peak_gpu_bytes"] <= 23 * GIB
    assert plan["min_gpu_bytes"] <= plan["peak_gpu_bytes"]
    # DESIGN.md back-of-envelope: a block is 1.72 GB fp16 and the down_proj Hessian 3.3 GB: the GPU peak must hold both
    assert plan["peak_gpu_bytes"] > 1.72e9 + 3.3e9
    assert plan["peak_host_bytes"] <= 16 * GIB  # the design target for a desktop
    assert 30e9 < plan["output_bytes"] < 45e9  # ~69B params at 4 bits + fp16 embedding/head
    assert _allocated(sparse_70b) < 50 << 20  # the data regions are holes: only headers exist


def test_more_budget_never_means_smaller_micro_batch(sparse_70b):
    mbs = []
    for budget in ("16GiB", "23GiB", "40GiB"):
        res = run_cli("plan", str(sparse_70b), "--gpu-mem", budget, "--json")
        assert res.returncode == 0, res.stderr
        mbs.append(last_json(res.stdout)["micro_batch"])
    assert mbs == sorted(mbs) and mbs[0] < mbs[-1]


def test_impossible_budget_refused_with_minimum(sparse_70b):
    res = run_cli("plan", str(sparse_70b), "--gpu-mem", "4GiB")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    line = res.stderr.strip()
    assert len(line.splitlines()) == 1 and "nothing fits in --gpu-mem 4.00 GiB" in line and "smallest plan" in line


def test_preset_refit_gives_way_to_the_budget_an_explicit_one_is_refused(sparse_70b):
    """The w4a16 preset refits GPTQ's scales, which holds H + λI beside the inverse factor. At a budget between the
    two smallest plans the preset's refit is turned off, and said, rather than refusing a run that fits without it;
    an explicit --refit-scales is the user's, so that run is refused with the way out, and the way out fits."""
    roomy = last_json(run_cli("plan", str(sparse_70b), "--gpu-mem", "40GiB", "--json").stdout)
    assert roomy["refit_scales"] == 1 and roomy["notes"] == []   # room for it: the preset's refit stays on
    refit = roomy["min_gpu_bytes"]
    lean = last_json(run_cli("plan", str(sparse_70b), "--gpu-mem", "40GiB", "--refit-scales", "0",
                             "--json").stdout)["min_gpu_bytes"]
    assert lean < refit   # a 70B down_proj's H + λI is 3.3 GB
    budget = f"{(lean + refit) / 2 / GIB:.2f}GiB"
    res = run_cli("plan", str(sparse_70b), "--gpu-mem", budget, "--refit-scales", "1")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert f"pass --refit-scales 0 (its smallest plan needs {lean / GIB:.2f} GiB)" in res.stderr
    assert run_cli("plan", str(sparse_70b), "--gpu-mem", budget, "--refit-scales", "0").returncode == 0

    res = run_cli("plan", str(sparse_70b), "--gpu-mem", budget, "--json")
    assert res.returncode == 0, res.stderr
    plan = last_json(res.stdout)
    assert plan["refit_scales"] == 0 and plan["min_gpu_bytes"] == lean
    assert plan["notes"] == [f"GPTQ's scale refit is off: its smallest plan needs {refit / GIB:.2f} GiB, over "
                             f"--gpu-mem {float(budget[:-3]):.2f} GiB (without it {lean / GIB:.2f} GiB)"]
    shown = run_cli("plan", str(sparse_70b), "--gpu-mem", budget)
    assert shown.returncode == 0 and "scale refit is off" in shown.stdout
    assert "scales refitted" not in shown.stdout   # the scheme line tells what runs


def test_dry_run_writes_nothing(tiny_models, tmp_path):
    out = tmp_path / "never"
    res = run_cli("run", str(tiny_models["llama"]), "--out", str(out), "--dry-run", "--samples", "4",
                  "--seqlen", "32", "--json")
    assert res.returncode == 0, res.stderr
    assert last_json(res.stdout)["micro_batch"] >= 1
    assert not out.exists()


@pytest.mark.parametrize("asym_calib", [False, True])
def test_bench_runs_the_pipeline_on_70b_shaped_blocks(tmp_path, asym_calib):
    """`streamquant bench` at 1/64 scale on CPU: every stage runs, the output is written, the planner's host
    prediction is within 15 % of the measured peak RSS, and the 80-block extrapolation stays under 16 GiB; also with
    the full-precision stream of --asym-calib under sequential GPTQ (a second state buffer and block) and GPTQ's
    scale refit (H + λI beside the inverse factor, the scan's start and a second scan's copies)."""
    work = tmp_path / "bench"
    res = run_cli("bench", "--scale", "64", "--blocks", "2", "--samples", "4", "--seqlen", "64", "--device", "cpu",
                  "--r1-reservoir", "1MiB", "--w-clip", "--workdir", str(work), "--json",
                  *(["--asym-calib", "--asym-targets", "model", "--refit-scales", "2"] if asym_calib else []),
                  timeout=900)
    assert res.returncode == 0, res.stderr
    out = last_json(res.stdout)
    assert out["w_clip"] is True and out["hessians"] == "sequential" and out["asym_calib"] is asym_calib
    assert out["asym_targets"] == ("model" if asym_calib else "input")
    report = json.loads((work / "out" / "report.json").read_text())
    assert report["w_clip"] is True and report["asym_calib"] is asym_calib   # the run did what was asked
    assert report["refit_scales"] == out["refit_scales"] == (2 if asym_calib else 0)
    assert out["shape"]["hidden_size"] == 8192 // 64 and out["shape"]["intermediate_size"] == 28672 // 64
    assert [b["block"] for b in out["per_block"]] == [0, 1]
    for block in out["per_block"]:
        assert all(block[stage] > 0 for stage in ("rotate", "r2", "quantize", "forward"))
    assert set(out["memory"]) >= {"capture", "r1", "quantize"}
    assert abs(out["host_prediction_error"]) <= 0.15, out["host_prediction_error"]
    assert out["extrapolated_80_blocks"]["predicted_peak_host_bytes"] <= 16 * GIB
    assert json.loads((work / "out" / "streamquant_manifest.json").read_text())["complete"] is True


def test_bench_bad_option_is_one_line(tmp_path):
    res = run_cli("bench", "--scale", "64", "--blocks", "2", "--weights", "awq", "--device", "cpu",
                  "--workdir", str(tmp_path / "w"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "--weights must be rtn or gptq" in res.stderr
    assert not (tmp_path / "w" / "model").exists()  # refused before writing the synthetic checkpoint


def test_peak_host_bytes_is_this_process_image_only():
    """A run spawned by a large process (pytest, a notebook) must not report its parent's peak as its own: Linux's
    getrusage ru_maxrss survives exec, so the planner's accuracy check would compare against the wrong number."""
    import subprocess
    import sys

    ballast = bytearray(768 << 20)
    ballast[::4096] = b"\x01" * len(ballast[::4096])    # touch every page: the parent's RSS really is 768 MiB more
    code = "from streamquant.memory import peak_host_bytes; print(peak_host_bytes())"
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    del ballast
    assert 0 < child < 600 << 20, child


def _payload_bytes(out: Path) -> int:
    """Tensor bytes of every safetensors file under `out`: file size minus the 8-byte length and the JSON header."""
    import struct

    total = 0
    for f in out.rglob("*.safetensors"):
        with open(f, "rb") as fh:
            total += f.stat().st_size - 8 - struct.unpack("<Q", fh.read(8))[0]
    return total


@pytest.mark.parametrize("arch,args", [
    ("llama", ["--method", "quarot", "--w-bits", "4", "--a-bits", "16", "--group-size", "16"]),  # pack-quantized
    ("qwen2", ["--method", "quarot", "--w-bits", "4", "--a-bits", "4", "--w-asym"]),  # biases, zero points, R1/R2
    ("mistral", ["--method", "none", "--w-bits", "16", "--a-bits", "4"]),              # 16-bit weights, no rotations
])
def test_output_bytes_match_what_is_written(tiny_models, tmp_path, arch, args):
    """The planner's output size (used to refuse a run the disk cannot hold) against the tensors actually written."""
    out = tmp_path / "out"
    res = run_cli("run", str(tiny_models[arch]), "--out", str(out), *args, "--samples", "2", "--seqlen", "32",
                  "--json")
    assert res.returncode == 0, res.stderr
    predicted = last_json(res.stdout)["plan"]["output_bytes"]
    written = _payload_bytes(out)
    assert abs(predicted / written - 1) <= 0.005, (predicted, written)


def test_refused_before_any_work_when_host_memory_cannot_hold_the_plan(sparse_70b, tmp_path):
    """A CPU run holding 10^6 × 2048 hidden states of width 8192 needs petabytes: refused up front, nothing written."""
    out = tmp_path / "out"
    res = run_cli("run", str(sparse_70b), "--out", str(out), "--device", "cpu", "--samples", "1000000",
                  "--seqlen", "2048")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "GiB of host memory at its peak" in res.stderr
    assert not out.exists()


def test_disk_check_counts_free_space_and_what_a_killed_run_left(tmp_path):
    """check_room against the real filesystem: an output larger than the free space is refused; files already in
    --out (a killed run's, kept by --resume) count as room. The leftover is a sparse file: large, yet no disk used."""
    import shutil

    from streamquant.errors import UserError
    from streamquant.plan import Plan, check_room

    free = shutil.disk_usage(tmp_path).free
    plan = Plan(micro_batch=1, device="cpu", stages={"load": {"gpu_bytes": 0, "host_bytes": 1 << 20}},
                output_bytes=free + GIB)
    out = tmp_path / "deeper" / "out"          # not there yet: the free space of its nearest existing parent counts
    with pytest.raises(UserError, match="GiB free"):
        check_room(plan, out)
    check_room(Plan(1, "cpu", plan.stages, output_bytes=1 << 20), out)   # a small output fits
    out.mkdir(parents=True)
    with open(out / "block-00000.safetensors", "wb") as fh:
        fh.truncate(3 * GIB)                      # what the earlier run wrote, reusable by --resume
    check_room(plan, out)


@pytest.mark.parametrize("bad,message", [
    (["--group-size", "7"], "--group-size 7 does not divide"),
    (["--calib", "no-such-file.txt"], "does not exist"),
    (["--asym-calib", "--a-bits", "16", "--asym-targets", "input"], "--asym-calib needs GPTQ weights (--weights gptq"),
    (["--asym-calib", "--a-bits", "16", "--hessians", "one-pass"], "--asym-targets model needs --hessians sequential"),
    (["--asym-calib", "--asym-targets", "fp"], "--asym-targets must be one of input, model"),
    (["--asym-calib", "--a-bits", "4", "--weights", "rtn"], "--asym-calib needs GPTQ weights"),
    (["--asym-calib", "--a-bits", "4", "--calib-acts", "full"], "exclude each other"),
    (["--refit-scales", "-1"], "--refit-scales must be >= 0"),
    (["--refit-scales", "2", "--weights", "rtn"], "--refit-scales needs GPTQ weights"),
])
def test_bad_run_options_refused_before_the_output_exists(tiny_models, tmp_path, bad, message):
    out = tmp_path / "out"
    res = run_cli("run", str(tiny_models["llama"]), "--out", str(out), "--samples", "2", "--seqlen", "32", *bad)
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert not out.exists()


def test_run_prints_a_table_for_people(tiny_models, tmp_path):
    """Without --json: a summary table (seconds per stage, peak memory against the plan, output size), where the
    per-block details are, and how to load the result (not cut-off JSON)."""
    out = tmp_path / "out"
    res = run_cli("run", str(tiny_models["llama"]), "--out", str(out), "--samples", "2", "--seqlen", "32",
                  "--method", "quarot")
    assert res.returncode == 0, res.stderr
    assert "peak host memory" in res.stdout and "(plan" in res.stdout and '{"' not in res.stdout
    assert f"streamquant eval {out}" in res.stdout
    assert f"{out / 'report.json'} or --json" in res.stdout and "blocks" in res.stdout
    blocks = json.loads((out / "report.json").read_text())["blocks"]
    assert [b["block"] for b in blocks] == list(range(len(blocks))) and blocks
    for b in blocks:   # per block: seconds by stage, compute in all, the shard read and how much of it was hidden
        assert b["compute"] == pytest.approx(b["rotate"] + b.get("r2", 0.0) + b["quantize"] + b["forward"])  # quarot: no R2 pass
        assert b["io"] > 0 and 0.0 <= b["io_hidden"] <= 1.0 and b["io_wait"] >= 0


def test_work_per_block_is_counted_and_bounded(tiny_models, tmp_path):
    """report.json counts each block's calibration forwards in full-block units: dart W4A4 GPTQ needs at most 3
    (R2 and q/k/v's Hessian share one pass, each pass stops at the linear it feeds); a data-free run needs none."""
    res = run_cli("run", str(tiny_models["llama"]), "--samples", "2", "--seqlen", "32", "--weights", "gptq",
                  "--method", "dart", "--a-bits", "4", "--no-write", "--json")
    assert res.returncode == 0, res.stderr
    blocks = last_json(res.stdout)["blocks"]
    assert all(1.0 < b["forward_equivalents"] <= 3.0 and b["gptq_solve"] > 0 for b in blocks)
    # one-pass GPTQ at A16: one full pass per block, which also samples R2's rows (no probe pass of its own);
    # the last stops at down_proj
    one = run_cli("run", str(tiny_models["llama"]), "--samples", "2", "--seqlen", "32", "--weights", "gptq",
                  "--method", "dart", "--a-bits", "16", "--hessians", "one-pass", "--no-write", "--json")
    assert one.returncode == 0, one.stderr
    work = [b["forward_equivalents"] for b in last_json(one.stdout)["blocks"]]
    assert all(w == 1.0 for w in work[:-1]) and work[-1] < 1.0, work
    free = run_cli("run", str(tiny_models["llama"]), "--seqlen", "32", "--method", "quarot", "--weights", "rtn",
                   "--no-write", "--json")
    assert free.returncode == 0, free.stderr
    report = last_json(free.stdout)
    assert all(b["forward_equivalents"] == 0 for b in report["blocks"]) and "capture" not in report["stage_seconds"]
