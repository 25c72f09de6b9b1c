"""The output directory, written incrementally so a multi-hour run survives a kill.

Every file is written atomically (temp → fsync → rename). The manifest (JSON) is rewritten after each file it lists
and says `complete: true` only after config.json, the index and the tokenizer exist, so a half-written output is
never mistaken for a finished one. I/O only: tensors arrive finished from the pipeline.

Layout:
    rotations/R1.safetensors, rotations/R2-00007.safetensors   learned rotations (fp64)
    embed.safetensors, block-00007.safetensors, head.safetensors  model tensors under their transformers names
    config.json, model.safetensors.index.json, tokenizer files    written at finalize
    streamquant_manifest.json, report.json
Linear weights use compressed-tensors' `pack-quantized` tensors (weight_packed, weight_scale, weight_shape,
weight_zero_point). Format `pack-quantized` (W4A16: no online transform) also gets a `quantization_config` so
transformers/vLLM load it directly; format `streamquant` (W4A4, KV4: online R3/R4 and activation quantizers) gets a
`streamquant` section describing the runtime instead, since a loader that ignored it would compute wrong outputs.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from streamquant import __version__
from streamquant.errors import UserError
from streamquant.manifest import MANIFEST
from streamquant.qblock import Runtime, install_runtime, qlinears
from streamquant.quant.pack import compressed_tensors_weight_args, from_compressed_tensors, to_compressed_tensors
from streamquant.quant.quantizers import WeightQuantConfig, dequantize_weight
from streamquant.shards import BlockPrefetcher
from streamquant.spec import BLOCK_LINEARS, ModelSpec, read_spec
from streamquant.stream import Engine

REPORT = "report.json"
EMBED_FILE, HEAD_FILE, R1_FILE = "embed.safetensors", "head.safetensors", "rotations/R1.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")


def copied_files_bytes(model_dir: Path) -> int:
    """Bytes of the source model's files an output carries over verbatim (tokenizer), for the disk check."""
    return sum((model_dir / name).stat().st_size for name in TOKENIZER_FILES if (model_dir / name).is_file())


def block_file(i: int) -> str:
    return f"block-{i:05d}.safetensors"


def r2_file(i: int) -> str:
    return f"rotations/R2-{i:05d}.safetensors"


def _crash_point(name: str) -> None:
    """Fault injection for the kill tests: STREAMQUANT_CRASH_AT=<point> SIGKILLs the process right there."""
    if os.environ.get("STREAMQUANT_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def atomic_write(path: Path, write) -> None:
    """write(tmp) then fsync and rename: a killed run leaves at most a stray temp file, never a partial real one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    _crash_point(f"tmp:{path.name}")
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_json(path: Path, obj) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n"))


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                                             metadata={"format": "pt"}))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(out: Path) -> dict:
    try:
        return json.loads((out / MANIFEST).read_text())
    except FileNotFoundError:
        raise UserError(f"{out} is not a streamquant output (no {MANIFEST})") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{out / MANIFEST} is corrupt ({exc})") from exc


def check_files(out: Path, manifest: dict) -> list[str]:
    """Problems with the files the manifest lists: missing or not matching their sha256."""
    problems = []
    for name, digest in sorted(manifest.get("files", {}).items()):
        path = out / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif sha256(path) != digest:
            problems.append(f"{name}: corrupt (sha256 differs from the manifest)")
    return problems


class OutputWriter:
    """Pipeline sink: rotations and blocks as they finish, the rest at finalize; resumes a killed run."""

    def __init__(self, out: Path, resume: bool = False, overwrite: bool = False):
        self.out, self.resume, self.overwrite = Path(out), resume, overwrite
        self.manifest: dict = {}

    # ---- start / resume ----
    def begin(self, pipeline) -> tuple[torch.Tensor | None, int]:
        """Prepare the directory; on --resume return (R1, number of finished blocks) from a verified manifest."""
        out, identity = self.out, self._identity(pipeline)
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} exists and is not a directory")
        has_content = out.exists() and any(out.iterdir())
        if self.resume and has_content and (out / MANIFEST).exists():
            manifest = read_manifest(out)
            if manifest.get("run") != identity["run"]:
                raise UserError(f"--resume: {out} was written with different options; rerun with the same options "
                                f"or pass --overwrite")
            for stray in out.rglob(".*.tmp"):  # temp files of the write that was killed
                stray.unlink()
            problems = check_files(out, manifest)
            if problems:
                raise UserError(f"--resume: {out} is damaged ({problems[0]}); pass --overwrite to start again")
            self.manifest = manifest
            r1 = None
            if R1_FILE in manifest["files"]:
                with safe_open(str(out / R1_FILE), framework="pt") as fh:
                    r1 = fh.get_tensor("R1")
            return r1, len(manifest["blocks"])
        if has_content and not self.resume:
            if not self.overwrite:
                raise UserError(f"--out {out} is not empty; pass --resume to continue a run or --overwrite to replace it")
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        self.manifest = {**identity, "files": {}, "blocks": [], "complete": False}
        self._commit()
        return None, 0

    @staticmethod
    def _identity(pipeline) -> dict:
        cfg = pipeline.cfg
        run = {k: v for k, v in asdict(cfg).items() if k not in ("out", "device", "micro_batch")}
        run["model"] = str(pipeline.model_dir)
        return {"streamquant_version": __version__, "torch_version": torch.__version__, "run": json.loads(json.dumps(run, default=str)),
                "format": pipeline.format, "runtime": pipeline.runtime.to_json(), "num_layers": pipeline.spec.num_layers}

    def _add(self, name: str) -> None:
        self.manifest["files"][name] = sha256(self.out / name)

    def _commit(self) -> None:
        _crash_point("manifest")
        atomic_json(self.out / MANIFEST, self.manifest)

    # ---- incremental writes ----
    def write_r1(self, r1: torch.Tensor | None) -> None:
        if r1 is not None and R1_FILE not in self.manifest["files"]:
            save_tensors(self.out / R1_FILE, {"R1": r1})
            self._add(R1_FILE)
            self._commit()

    def write_embedding(self, table: torch.Tensor) -> None:
        if EMBED_FILE not in self.manifest["files"]:
            save_tensors(self.out / EMBED_FILE, {"model.embed_tokens.weight": table})
            self._add(EMBED_FILE)
            self._commit()

    def write_block(self, i: int, layer: nn.Module, r2: torch.Tensor | None, wcfg: WeightQuantConfig | None) -> None:
        prefix = f"model.layers.{i}."
        tensors: dict[str, torch.Tensor] = {}
        for name, tensor in layer.state_dict().items():
            base = name.rsplit(".", 1)[0]
            if name.endswith(".weight") and base in BLOCK_LINEARS and wcfg is not None:
                q, scale, zero = qlinears(layer)[base].codes
                for key, t in to_compressed_tensors(q, scale, zero, wcfg, tensor.shape).items():
                    tensors[f"{prefix}{base}.{key}"] = t
            else:
                tensors[prefix + name] = tensor
        if r2 is not None:
            save_tensors(self.out / r2_file(i), {"R2": r2})
            self._add(r2_file(i))
        save_tensors(self.out / block_file(i), tensors)
        _crash_point(f"after:{block_file(i)}")
        self._add(block_file(i))
        self.manifest["blocks"].append(block_file(i))
        self._commit()

    # ---- finalize ----
    def finish(self, pipeline, norm_weight: torch.Tensor, head_weight: torch.Tensor, result: dict) -> None:
        out = self.out
        save_tensors(out / HEAD_FILE, {"model.norm.weight": norm_weight, "lm_head.weight": head_weight})
        self._add(HEAD_FILE)
        weight_map = {}
        for name in [EMBED_FILE, HEAD_FILE] + self.manifest["blocks"]:
            with safe_open(str(out / name), framework="pt") as fh:
                weight_map |= {k: name for k in fh.keys()}
        atomic_json(out / "model.safetensors.index.json", {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))})
        atomic_json(out / "config.json", self._config(pipeline))
        for name in TOKENIZER_FILES:
            if (pipeline.model_dir / name).is_file():
                atomic_write(out / name, lambda tmp, n=name: shutil.copyfile(pipeline.model_dir / n, tmp))
        for name in ["model.safetensors.index.json", "config.json"] + [n for n in TOKENIZER_FILES if (out / n).is_file()]:
            self._add(name)
        atomic_json(out / REPORT, result)
        self.manifest["complete"] = True
        self._commit()

    def _config(self, pipeline) -> dict:
        cfg = {k: v for k, v in pipeline.spec.raw.items() if k != "quantization_config"}
        cfg["tie_word_embeddings"] = False  # the embedding keeps E·R1, lm_head got σ and R1: they differ now
        cfg["torch_dtype"] = str(pipeline.dtype).removeprefix("torch.")
        wcfg = pipeline.cfg.weight_cfg
        if pipeline.format == "pack-quantized" and wcfg is not None:
            cfg["quantization_config"] = {
                "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
                "config_groups": {"group_0": {"targets": ["Linear"], "weights": compressed_tensors_weight_args(wcfg),
                                              "input_activations": None, "output_activations": None,
                                              "format": "pack-quantized"}},
                "ignore": ["lm_head"], "kv_cache_scheme": None,
            }
        else:
            cfg["streamquant"] = {"format": pipeline.format, "runtime": pipeline.runtime.to_json(),
                                  "weights": None if wcfg is None else asdict(wcfg)}
        return cfg

    # ---- read back finished blocks (resume replay) ----
    def block_weights(self, i: int) -> dict[str, torch.Tensor]:
        return read_block(self.out, i, self.manifest)


def read_block(out: Path, i: int, manifest: dict) -> dict[str, torch.Tensor]:
    """A finished block as dense (dequantized) weights, names relative to the block."""
    wcfg = manifest["run"]
    cfg = None if wcfg["w_bits"] >= 16 else WeightQuantConfig(wcfg["w_bits"], wcfg["group_size"], wcfg["w_symmetric"])
    prefix = f"model.layers.{i}."
    with safe_open(str(out / block_file(i)), framework="pt") as fh:
        raw = {k.removeprefix(prefix): fh.get_tensor(k) for k in fh.keys()}
    weights: dict[str, torch.Tensor] = {}
    for name in BLOCK_LINEARS:
        if f"{name}.weight_packed" in raw:
            parts = {k.removeprefix(f"{name}."): raw.pop(k) for k in list(raw) if k.startswith(f"{name}.weight_")}
            q, scale, zero = from_compressed_tensors(parts, cfg)
            weights[f"{name}.weight"] = dequantize_weight(q, scale, zero, cfg.group_size)
    return weights | raw


class OutputSource:
    """A finished streamquant output as a BlockSource: `streamquant eval OUT` streams it block by block."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.manifest = read_manifest(self.out)
        if not self.manifest.get("complete"):
            done, total = len(self.manifest.get("blocks", [])), self.manifest.get("num_layers", "?")
            raise UserError(f"{self.out} is an incomplete streamquant output ({done} of {total} blocks written); "
                            f"finish it with `streamquant run ... --out {self.out} --resume`")
        self.spec: ModelSpec = read_spec(self.out)
        self.runtime = Runtime.from_json(self.manifest["runtime"])

    def embedding(self) -> torch.Tensor:
        with safe_open(str(self.out / EMBED_FILE), framework="pt") as fh:
            return fh.get_tensor("model.embed_tokens.weight")

    def load_block(self, i: int, pin: bool = False) -> dict[str, torch.Tensor]:
        weights = read_block(self.out, i, self.manifest)
        return {k: v.pin_memory() for k, v in weights.items()} if pin else weights

    def layers(self, engine: Engine) -> Iterator[tuple[int, nn.Module]]:
        with BlockPrefetcher(self, pin=engine.pin) as prefetcher:   # read and unpack block i+1 while i computes
            for i in range(self.spec.num_layers):
                weights = prefetcher.get(i)
                prefetcher.prefetch(i + 1)
                layer = install_runtime(engine.build_layer(i, weights), self.spec, self.runtime)
                del weights
                yield i, layer
                del layer

    def head(self) -> tuple[torch.Tensor, torch.Tensor]:
        with safe_open(str(self.out / HEAD_FILE), framework="pt") as fh:
            return fh.get_tensor("model.norm.weight"), fh.get_tensor("lm_head.weight")


def open_output(out: Path) -> OutputSource:
    return OutputSource(out)
