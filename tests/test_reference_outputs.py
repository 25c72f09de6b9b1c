"""Refactors change no output: a run of the current code writes the same bytes as the reference commit's code.

REFERENCE_COMMIT is the last commit that changed outputs on purpose (new numerics, new tensors); a commit that
changes them again on purpose moves it forward and says why. The reference code is taken from git itself and run
in a separate process on the same machine, so the comparison is exact and needs no stored hashes.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import io
from pathlib import Path

import pytest

from conftest import WIKITEXT

# 5ac1622: the first commit whose CLI has --r1-lr (1e-3 everywhere then; for every command it writes c9b5abe's bytes).
# The w4a4 preset took R1's step 1e-2 after it, so the W4A4 dart commands below (which infer it) name --r1-lr 1e-3.
# c9b5abe: the scale refit's systems summed in another order and H + λI taken as is instead of rebuilt from its
# inverse factor (the refit command's bytes move; the others write 855943a's). The w4a16 preset turned one round of
# the refit on after it, so the W4A16 commands below name --refit-scales 0: they do what they did before.
# 855943a: the first commit whose CLI has --refit-scales (off in every preset, so for the other commands it writes
# b7c5ba9's bytes); the refit command below checks that later work keeps its bytes.
# b7c5ba9: the first commit whose CLI has --asym-targets; the full-precision stream's commands below check that later
# work (its last Hessian pass moving the stream on instead of a forward of its own) writes its bytes, and for the
# others it writes 54f5536's (this test passed against 54f5536 at b7c5ba9).
# 54f5536: the first commit whose CLI has --no-asym-calib, which the W4A4 GPTQ commands below now name; for them it
# writes 6450d0f's bytes (this test passed against 6450d0f at 54f5536, and --asym-calib was off in every preset until
# after it). 6450d0f: the first commit whose CLI has --no-o-online, which the W4A4 commands below name; for them it
# writes daed4b7's bytes (this test passed against daed4b7 at 640b828, and --o-online was off in every preset until after
# 6450d0f). daed4b7: dart one-pass W4A16 learns R2 in the one-pass pass (o_proj's Hessian turned by R2, other
# rounding); 8bd4aa7 (GPTQ scan gathers errors per column, issue 11), 2c5687d, 34c2f03, 0dbf21c before
REFERENCE_COMMIT = "5ac1622"
REPO = Path(__file__).resolve().parents[1]
FAST = ["--samples", "4", "--seqlen", "48", "--r1-epochs", "2", "--r2-epochs", "1", "--r1-reservoir", "1MiB", "--seed", "3"]
SCHEMES = {   # name: (tiny model, options)
    # --refit-scales 0 in the W4A16 commands since the w4a16 preset turned one round of the scale refit on;
    # --no-w-clip, --no-o-online and --no-asym-calib since the w4a4 presets turned the MSE clip search, o_proj's
    # online Hadamard and the asymmetric calibration on, and --r1-lr 1e-3 since w4a4 took R1's step 1e-2: the command
    # names what it did before
    "dart-w4a4-gptq": ("llama", ["--method", "dart", "--w-bits", "4", "--a-bits", "4", "--weights", "gptq",
                                 "--no-w-clip", "--no-o-online", "--no-asym-calib", "--r1-lr", "1e-3"]),
    "dart-w4a16-gptq-g32": ("llama", ["--method", "dart", "--w-bits", "4", "--a-bits", "16", "--weights", "gptq",
                                      "--group-size", "32", "--refit-scales", "0"]),
    # data-free since issue 11 (no calibration pass at all): the same bytes as when it ran them
    "quarot-w4a4kv4-rtn": ("llama", ["--method", "quarot", "--w-bits", "4", "--a-bits", "4", "--kv-bits", "4",
                                     "--weights", "rtn", "--no-w-clip", "--no-o-online"]),
    # sequential GPTQ of MoE experts: one pass fills a stage's expert Hessians (issue 11); d6c498f wrote the same
    # bytes as 2c5687d's pass per expert
    "dart-w4a4-gptq-mixtral": ("mixtral", ["--method", "dart", "--w-bits", "4", "--a-bits", "4", "--weights", "gptq",
                                           "--no-w-clip", "--no-o-online", "--no-asym-calib", "--r1-lr", "1e-3"]),
    # GPTAQ's full-precision stream beside the quantized one, dense and MoE (expert stages run whole)
    "dart-w4a16-fp-targets": ("llama", ["--method", "dart", "--w-bits", "4", "--a-bits", "16", "--weights", "gptq",
                                        "--group-size", "16", "--hessians", "sequential", "--asym-calib",
                                        "--asym-targets", "model", "--refit-scales", "0"]),
    "dart-w4a16-fp-targets-mixtral": ("mixtral", ["--method", "dart", "--w-bits", "4", "--a-bits", "16", "--weights",
                                                  "gptq", "--hessians", "sequential", "--asym-calib",
                                                  "--asym-targets", "model", "--refit-scales", "0"]),
    # GPTQ's scale refit in three rounds, with act-order's static groups and the full-precision targets
    "dart-w4a16-fp-targets-refit": ("llama", ["--method", "dart", "--w-bits", "4", "--a-bits", "16", "--weights",
                                              "gptq", "--group-size", "16", "--hessians", "sequential",
                                              "--asym-calib", "--asym-targets", "model", "--refit-scales", "3"]),
}


@pytest.fixture(scope="module")
def reference_code(tmp_path_factory) -> Path:
    """The reference commit's package, laid out the way pyproject.toml installs it (kernels/ and cli/ inside)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", REFERENCE_COMMIT,
                              "streamquant", "kernels", "cli"], capture_output=True)
    assert archive.returncode == 0, f"git archive {REFERENCE_COMMIT} failed: {archive.stderr.decode()}"
    src = tmp_path_factory.mktemp("reference-src")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(src, filter="data")
    pkg = tmp_path_factory.mktemp("reference-pkg")
    shutil.copytree(src / "streamquant", pkg / "streamquant")
    shutil.copytree(src / "kernels", pkg / "streamquant" / "kernels")
    shutil.copytree(src / "cli", pkg / "streamquant" / "cli")
    return pkg


def run(code_root: Path | None, cwd: Path, args: list[str]) -> None:
    """`streamquant run ...` from `code_root` (None: the installed, current code) in a fresh process."""
    env = dict(os.environ, STREAMQUANT_PROGRESS="0", HF_HUB_OFFLINE="1")
    if code_root is not None:
        env["PYTHONPATH"] = str(code_root)     # ahead of the editable install of the current tree
    done = subprocess.run([sys.executable, "-m", "streamquant.cli.app", "run", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr


def output_bytes(out: Path) -> dict[str, bytes]:
    """Every file but the report and run.log (wall-clock times; run.log is newer than the reference commit and not
    in the manifest) and the manifest, whose run options may gain fields; the manifest's per-file hashes and block
    list are compared instead."""
    files = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
             if p.is_file() and p.name not in ("report.json", "streamquant_manifest.json", "run.log")}
    manifest = json.loads((out / "streamquant_manifest.json").read_text())
    files["manifest:files"] = json.dumps(manifest["files"], sort_keys=True).encode()
    files["manifest:blocks"] = json.dumps(manifest["blocks"]).encode()
    files["manifest:complete"] = json.dumps(manifest["complete"]).encode()
    return files


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_outputs_equal_the_reference_commit(reference_code, tiny_models, tmp_path, scheme):
    calib = WIKITEXT / "valid.txt"
    model, options = SCHEMES[scheme]
    common = [str(tiny_models[model]), "--calib", str(calib) if calib.exists() else "default", *FAST, *options]
    run(reference_code, tmp_path, [*common, "--out", str(tmp_path / "reference")])
    run(None, tmp_path, [*common, "--out", str(tmp_path / "current")])
    reference, current = output_bytes(tmp_path / "reference"), output_bytes(tmp_path / "current")
    assert sorted(current) == sorted(reference)
    differ = [name for name in reference if reference[name] != current[name]]
    assert not differ, f"outputs differ from {REFERENCE_COMMIT}'s: {differ}"
