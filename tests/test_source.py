"""Where models come from: the embedded SmolLM2 conversion shared by processes that start together."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from safetensors import safe_open


def test_processes_that_start_together_convert_smollm2_once_and_all_get_it_whole(smollm2, tmp_path):
    # Parallel test workers and concurrent runs meet an empty cache together; without the lock they deleted each
    # other's half-written conversion. Each process reports the directory it got and how many it converted.
    script = ("import sys, streamquant.source as s\n"
              "done = []\n"
              "convert = getattr(s, '_convert_smollm2', None)\n"
              "s._convert_smollm2 = lambda target: (done.append(1), convert(target))\n"
              "print(s.smollm2_dir(), len(done))\n")
    env = dict(os.environ, STREAMQUANT_CACHE=str(tmp_path), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    got = [out.split() for out, _ in outs]
    assert {Path(d) for d, _ in got} == {tmp_path / "smollm2-135m"}
    assert sorted(int(n) for _, n in got) == [0, 1]   # one converted, the other waited and found it whole
    with safe_open(tmp_path / "smollm2-135m" / "model.safetensors", "pt") as new, \
            safe_open(smollm2 / "model.safetensors", "pt") as cached:
        assert set(new.keys()) == set(cached.keys())
        for key in ("model.embed_tokens.weight", "model.layers.29.mlp.down_proj.weight"):
            assert new.get_tensor(key).equal(cached.get_tensor(key))
