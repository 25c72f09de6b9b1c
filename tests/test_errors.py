"""Bad input: one clear line on stderr, exit code 2, never a traceback."""
from __future__ import annotations

import json
import shutil
import struct

import pytest

from conftest import run_cli


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _shards(d):
    return sorted(d.glob("*.safetensors"))


def _rewrite_header(path, edit):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * (n - len(new)) if len(new) <= n else b""
    assert len(new) == n, "header edit must keep its length"
    path.write_bytes(raw[:8] + new + raw[8 + n:])


def _case_missing_dir(tmp_path, tiny, text):
    return [str(tmp_path / "nope")], "does not exist"


def _case_no_safetensors(tmp_path, tiny, text):
    d = _copy(tiny, tmp_path / "m")
    for f in _shards(d):
        f.unlink()
    (d / "model.safetensors.index.json").unlink()
    return [str(d)], "no .safetensors"


def _case_unsupported(tmp_path, tiny, text):
    d = _copy(tiny, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    return [str(d)], "unsupported model_type 'gpt2'"


def _case_truncated(tmp_path, tiny, text):
    d = _copy(tiny, tmp_path / "m")
    shard = _shards(d)[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    return [str(d)], f"{shard.name} is truncated"


def _case_wrong_shape(tmp_path, tiny, text):
    d = _copy(tiny, tmp_path / "m")
    for shard in _shards(d):
        raw = shard.read_bytes()
        if b"model.layers.1.mlp.up_proj.weight" in raw[:8 + struct.unpack("<Q", raw[:8])[0]]:
            break

    def swap(header):  # same byte count, transposed shape: only a shape check can catch it
        entry = header["model.layers.1.mlp.up_proj.weight"]
        entry["shape"] = entry["shape"][::-1]
    _rewrite_header(shard, swap)
    return [str(d)], "model.layers.1.mlp.up_proj.weight has shape"


def _case_seqlen_zero(tmp_path, tiny, text):
    return [str(tiny), "--seqlen", "0"], "--seqlen must be at least 2"


def _case_short_data(tmp_path, tiny, text):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.")
    return [str(tiny), "--data", str(short)], "fewer than one window"


def _case_corrupt_header(tmp_path, tiny, text):
    d = _copy(tiny, tmp_path / "m")
    shard = _shards(d)[0]
    raw = bytearray(shard.read_bytes())
    raw[8:20] = b"not json!!!!"
    shard.write_bytes(bytes(raw))
    return [str(d)], f"{shard.name}: corrupt safetensors header"


def _case_hub_offline(tmp_path, tiny, text):
    return ["streamquant-tests/not-a-cached-model"], "not in the local Hub cache"


def _case_markup_in_path(tmp_path, tiny, text):   # rich must print user text as written, not as markup
    return [str(tiny), "--data", str(tmp_path / "[bold]missing.txt")], "[bold]missing.txt does not exist"


def _case_dataset_offline(tmp_path, tiny, text):   # ':train:' must not turn into an emoji
    return [str(tiny), "--data", "streamquant-tests/no-such-dataset:train"], \
        "cannot load dataset streamquant-tests/no-such-dataset:train: "


def _case_dataset_split(tmp_path, tiny, text):
    import datasets
    datasets.Dataset.from_dict({"text": ["Only a train split."]}).to_parquet(str(tmp_path / "ds" / "train.parquet"))
    return [str(tiny), "--data", f"{tmp_path / 'ds'}:validation"], 'Unknown split "validation"'


CASES = {name.removeprefix("_case_"): fn for name, fn in globals().items() if name.startswith("_case_")}


def test_info_reads_headers(tiny_models):
    """`info` reports per-block bytes equal to the sum of that block's tensor sizes in the real files."""
    from safetensors import safe_open

    from conftest import last_json

    d = tiny_models["qwen2"]
    res = run_cli("info", str(d), "--json")
    assert res.returncode == 0, res.stderr
    info = last_json(res.stdout)
    total = 0
    for shard in _shards(d):
        with safe_open(str(shard), framework="pt") as fh:
            total += sum(fh.get_tensor(k).nbytes for k in fh.keys() if k.startswith("model.layers.0."))
    assert info["max_block_bytes"] == total and info["model_type"] == "qwen2" and info["attention_bias"] is True


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2(tmp_path, tiny_models, eval_text, case):
    args, expected = CASES[case](tmp_path, tiny_models["llama"], eval_text)
    args += [] if "--seqlen" in args else ["--seqlen", "64"]
    args += [] if "--data" in args else ["--data", str(eval_text)]
    res = run_cli("eval", *args)
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr + res.stdout
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert expected in lines[0], lines[0]
