"""The streaming forward must reproduce transformers' full-model forward, holding at most two blocks at once."""
from __future__ import annotations

import gc
import math

import pytest
import torch

from conftest import TINY, last_json, reference_nll, run_cli
from streamquant.data import eval_windows, load_tokenizer, tokenize
from streamquant.shards import ShardIndex
from streamquant.spec import read_spec
from streamquant.stream import CheckpointSource, Engine, stream_logits, stream_nll

SEQLEN, WINDOWS = 64, 4


def _windows(model_dir, text_path, seqlen=SEQLEN, windows=WINDOWS):
    return eval_windows(tokenize(load_tokenizer(model_dir), text_path.read_text()), seqlen, windows)


@pytest.mark.parametrize("arch", list(TINY))
def test_block_straddles_shards(tiny_models, arch):
    index = ShardIndex(tiny_models[arch], read_spec(tiny_models[arch]))
    files_per_block = [len({e.file for e in block.values()}) for block in index.blocks]
    assert max(files_per_block) >= 2, "fixture must exercise a block spanning two shard files"
    assert len({e.file for e in index.entries.values()}) > 3


@pytest.mark.parametrize("arch", list(TINY))
def test_stream_logits_match_transformers(tiny_models, eval_text, arch):
    from transformers import AutoModelForCausalLM

    model_dir = tiny_models[arch]
    ids = _windows(model_dir, eval_text)
    spec = read_spec(model_dir)
    engine = Engine(spec, torch.device("cpu"), torch.float32, micro_batch=3)  # 3 does not divide 4: ragged batches
    ours = stream_logits(CheckpointSource(ShardIndex(model_dir, spec)), engine, ids)
    ref_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():
        ref = ref_model(ids).logits
    scale = ref.abs().max()
    assert (ours - ref).abs().max() <= 1e-5 * scale


@pytest.mark.parametrize("arch", list(TINY))
def test_cli_eval_ppl_matches_transformers(tiny_models, eval_text, arch):
    model_dir = tiny_models[arch]
    res = run_cli("eval", str(model_dir), "--data", str(eval_text), "--seqlen", str(SEQLEN),
                  "--windows", str(WINDOWS), "--dtype", "float32", "--json")
    assert res.returncode == 0, res.stderr
    out = last_json(res.stdout)
    ref_ppl = math.exp(float(reference_nll(model_dir, _windows(model_dir, eval_text)).mean()))
    assert out["windows"] == WINDOWS and out["seqlen"] == SEQLEN
    assert abs(out["ppl"] - ref_ppl) <= 1e-4 * ref_ppl
    for key in ("seconds", "peak_host_bytes", "peak_gpu_bytes"):
        assert key in out
    assert out["peak_gpu_bytes"] == 0 and out["peak_host_bytes"] > 0


def test_cli_eval_reads_a_hub_dataset(tiny_models, eval_text, tmp_path):
    """'name:split' goes through datasets.load_dataset (here a local parquet folder: the same loader as the Hub,
    offline); rows are joined with blank lines, as GPTQ-family evaluations join WikiText-2's."""
    datasets = pytest.importorskip("datasets")   # in the test extra, so CI always runs this; a bare GPU box may not

    model_dir = tiny_models["llama"]
    rows = eval_text.read_text(encoding="utf-8").split("\n")
    datasets.Dataset.from_dict({"id": list(range(len(rows))), "text": rows}).to_parquet(
        str(tmp_path / "ds" / "test.parquet"))
    joined = tmp_path / "joined.txt"
    joined.write_text("\n\n".join(rows), encoding="utf-8")
    res = run_cli("eval", str(model_dir), "--data", f"{tmp_path / 'ds'}:test", "--seqlen", str(SEQLEN),
                  "--windows", str(WINDOWS), "--dtype", "float32", "--json")
    assert res.returncode == 0, res.stderr
    ref_ppl = math.exp(float(reference_nll(model_dir, _windows(model_dir, joined)).mean()))
    assert abs(last_json(res.stdout)["ppl"] - ref_ppl) <= 1e-4 * ref_ppl
    # the planner sizes a dataset like a file: evaluation hidden states (all windows) are in the plan
    plan = last_json(run_cli("run", str(model_dir), "--eval", f"{tmp_path / 'ds'}:test", "--samples", "2",
                             "--seqlen", str(SEQLEN), "--dry-run", "--json").stdout)
    same = last_json(run_cli("run", str(model_dir), "--eval", str(joined), "--samples", "2",
                             "--seqlen", str(SEQLEN), "--dry-run", "--json").stdout)

    def eval_extra(p: dict) -> int:   # what evaluation adds over the load stage (the process baselines cancel)
        return p["stages"]["eval"]["host_bytes"] - p["stages"]["load"]["host_bytes"]
    assert abs(eval_extra(plan) / eval_extra(same) - 1) < 0.02


def test_at_most_two_blocks_alive(tiny_models, eval_text):
    """Census of live tensors (gc, independent of our own bookkeeping) at every block boundary."""
    model_dir = tiny_models["llama"]
    spec = read_spec(model_dir)
    up_shape = (spec.intermediate_size, spec.hidden_size)  # gate_proj and up_proj: 2 per block, unique shape
    counts = []

    def census(i: int) -> None:
        gc.collect()
        storages = {o.untyped_storage().data_ptr() for o in gc.get_objects()
                    if type(o) in (torch.Tensor, torch.nn.Parameter) and tuple(o.shape) == up_shape}
        counts.append(len(storages))

    engine = Engine(spec, torch.device("cpu"), torch.float32, micro_batch=2)
    stream_nll(CheckpointSource(ShardIndex(model_dir, spec)), engine, _windows(model_dir, eval_text), census)
    assert len(counts) == spec.num_layers
    assert min(counts) >= 2, counts  # the census sees the block being computed
    assert max(counts) <= 2 * 2, counts  # current block + the prefetched one
    assert spec.num_layers * 2 > 4  # a model loaded whole would be caught


@pytest.mark.slow
def test_smollm2_eval_matches_transformers(smollm2, eval_text):
    res = run_cli("eval", "smollm2-135m", "--data", str(eval_text), "--seqlen", "256", "--windows", "4",
                  "--dtype", "float32", "--json")
    assert res.returncode == 0, res.stderr
    out = last_json(res.stdout)
    ref = reference_nll(smollm2, _windows(smollm2, eval_text, 256, 4))
    ref_ppl = math.exp(float(ref.mean()))
    assert abs(out["ppl"] - ref_ppl) <= 1e-4 * ref_ppl
    assert 5 < out["ppl"] < 200  # a trained model, not noise (random would be ~49152)
