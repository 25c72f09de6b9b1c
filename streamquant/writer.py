"""The output directory: written incrementally, every file atomically (temp → fsync → rename), JSON for metadata.

I/O only: it receives finished tensors from the pipeline and never computes on them.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from streamquant.errors import UserError
from streamquant.manifest import MANIFEST

ROTATIONS = "rotations.safetensors"
REPORT = "report.json"


def atomic_write(path: Path, write) -> None:
    """write(tmp_path) then fsync and rename, so a killed run never leaves a complete-looking partial file."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_json(path: Path, obj) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, sort_keys=True)))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class OutputWriter:
    """Sink for the pipeline: rotations as they are learned, a report at the end."""

    def __init__(self, out: Path, resume: bool = False, overwrite: bool = False):
        self.out, self.resume, self.overwrite = Path(out), resume, overwrite
        self.r2: dict[str, torch.Tensor] = {}

    def begin(self, pipeline) -> None:
        out = self.out
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} exists and is not a directory")
        if out.exists() and any(out.iterdir()) and not self.resume:
            if not self.overwrite:
                raise UserError(f"--out {out} is not empty; pass --resume to continue a run or --overwrite to replace it")
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)

    def write_r1(self, r1: torch.Tensor | None) -> None:
        self.r1 = r1

    def write_block(self, i: int, layer, r2: torch.Tensor | None) -> None:
        if r2 is not None:
            self.r2[f"R2.{i}"] = r2.contiguous()

    def finish(self, pipeline, norm_weight: torch.Tensor, head_weight: torch.Tensor, result: dict) -> None:
        tensors = dict(self.r2)
        if self.r1 is not None:
            tensors["R1"] = self.r1.contiguous()
        if tensors:
            atomic_write(self.out / ROTATIONS, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
        atomic_json(self.out / REPORT, result)
