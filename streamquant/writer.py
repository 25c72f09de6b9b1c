"""The output directory, written incrementally so a multi-hour run survives a kill; `--resume` continues it.

Every file is written atomically (temp → fsync → rename). The manifest (JSON) is rewritten after each file it lists
and says `complete: true` only after config.json, the index and the tokenizer exist, so a half-written output is
never mistaken for a finished one. I/O only: blocks arrive as values (`streamquant.quantized`) and
`streamquant.formats` names their tensors.

Layout (names in `streamquant.manifest`):
    rotations/R1.safetensors, rotations/R2-00007.safetensors   learned rotations (fp64)
    embed.safetensors, block-00007.safetensors, head.safetensors  model tensors under their transformers names
    config.json, model.safetensors.index.json, tokenizer files    written at finalize
    streamquant_manifest.json, report.json
"""
from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from streamquant.errors import UserError
from streamquant.formats import OutputFormat
from streamquant.manifest import (EMBED_FILE, HEAD_FILE, MANIFEST, R1_FILE, REPORT, TOKENIZER_FILES, block_file,
                                  check_files, r2_file, read_manifest, sha256)
from streamquant.quantized import QuantizedBlock
from streamquant.reader import read_block


def copied_files_bytes(model_dir: Path) -> int:
    """Bytes of the source model's files an output carries over verbatim (tokenizer), for the disk check."""
    return sum((model_dir / name).stat().st_size for name in TOKENIZER_FILES if (model_dir / name).is_file())


def _crash_point(name: str) -> None:
    """Fault injection for the kill tests: STREAMQUANT_CRASH_AT=<point> SIGKILLs the process right there;
    STREAMQUANT_SIGINT_AT=<point> sends it SIGINT (STREAMQUANT_SIGINT_COUNT times: 2 = Ctrl-C pressed twice)."""
    if os.environ.get("STREAMQUANT_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("STREAMQUANT_SIGINT_AT") == name:
        for _ in range(int(os.environ.get("STREAMQUANT_SIGINT_COUNT", "1"))):
            os.kill(os.getpid(), signal.SIGINT)


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


class OutputWriter:
    """Pipeline sink: rotations and blocks as they finish, the rest at finalize; resumes a killed run."""

    def __init__(self, out: Path, resume: bool = False, overwrite: bool = False):
        self.out, self.resume, self.overwrite = Path(out), resume, overwrite
        self.manifest: dict = {}
        self.format: OutputFormat | None = None

    # ---- start / resume ----
    def begin(self, identity: dict, fmt: OutputFormat) -> tuple[torch.Tensor | None, int]:
        """Prepare the directory for a run `identity` (the manifest's record of what is written and how); on
        --resume return (R1, number of finished blocks) from a verified manifest of the same run."""
        out, self.format = self.out, fmt
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
            save_tensors(self.out / EMBED_FILE, self.format.embedding_tensors(table))
            self._add(EMBED_FILE)
            self._commit()

    def write_block(self, block: QuantizedBlock) -> None:
        i = block.index
        if block.r2 is not None:
            save_tensors(self.out / r2_file(i), {"R2": block.r2})
            self._add(r2_file(i))
        save_tensors(self.out / block_file(i), self.format.block_tensors(block))
        _crash_point(f"after:{block_file(i)}")
        self._add(block_file(i))
        self.manifest["blocks"].append(block_file(i))
        self._commit()

    # ---- finalize ----
    def finish(self, norm_weight: torch.Tensor, head_weight: torch.Tensor, report: dict, tokenizer_dir: Path) -> None:
        out = self.out
        save_tensors(out / HEAD_FILE, self.format.head_tensors(norm_weight, head_weight))
        self._add(HEAD_FILE)
        weight_map = {}
        for name in [EMBED_FILE, HEAD_FILE] + self.manifest["blocks"]:
            with safe_open(str(out / name), framework="pt") as fh:
                weight_map |= {k: name for k in fh.keys()}
        atomic_json(out / "model.safetensors.index.json", {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))})
        atomic_json(out / "config.json", self.format.config())
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                atomic_write(out / name, lambda tmp, n=name: shutil.copyfile(tokenizer_dir / n, tmp))
        for name in ["model.safetensors.index.json", "config.json"] + [n for n in TOKENIZER_FILES if (out / n).is_file()]:
            self._add(name)
        atomic_json(out / REPORT, report)
        self.manifest["complete"] = True
        self._commit()

    # ---- read back finished blocks (resume replay) ----
    def block_r2(self, i: int) -> torch.Tensor | None:
        """Block i's R2 as written (None for a run without R2)."""
        if r2_file(i) not in self.manifest["files"]:
            return None
        with safe_open(str(self.out / r2_file(i)), framework="pt") as fh:
            return fh.get_tensor("R2")

    def block_weights(self, i: int) -> dict[str, torch.Tensor]:
        return read_block(self.out, i, self.format.spec, self.manifest)
