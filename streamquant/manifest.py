"""The output directory's layout and its manifest: file names, and reading and checking the manifest.

`streamquant_manifest.json` lists the sha256 of every file it covers and says `complete: true` only after finalize,
so a killed run is never mistaken for a finished one. Shared by the writer, the reader and `streamquant verify`.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from streamquant.errors import UserError

MANIFEST = "streamquant_manifest.json"   # written last, atomically
REPORT = "report.json"
EMBED_FILE, HEAD_FILE, R1_FILE = "embed.safetensors", "head.safetensors", "rotations/R1.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")


def block_file(i: int) -> str:
    return f"block-{i:05d}.safetensors"


def r2_file(i: int) -> str:
    return f"rotations/R2-{i:05d}.safetensors"


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
