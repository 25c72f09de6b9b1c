"""Shared by the benchmark scripts: the RSS sampler (from streamquant.bench) and appending a section to RESULTS.md."""
from __future__ import annotations

import datetime
import json
import platform
import shlex
import sys
from pathlib import Path

import psutil

from streamquant.bench import PeakRSS  # noqa: F401  (re-exported for the scripts)

__all__ = ["PeakRSS", "RESULTS", "append_results", "machine"]
RESULTS = Path(__file__).with_name("RESULTS.md")


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {psutil.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, {gpu}, torch {torch.__version__}"


def append_results(title: str, table_md: str, payload: dict) -> None:
    """Append (never overwrite) a dated section with the exact command that produced it."""
    cmd = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = (f"\n## {title} ({stamp})\n\nCommand: `{cmd}`  \nMachine: {machine()}\n\n{table_md}\n\n"
            f"<details><summary>JSON</summary>\n\n```json\n{json.dumps(payload, indent=1)}\n```\n</details>\n")
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nEvery section is appended by a script in `benchmarks/`; the command is shown.\n")
    with RESULTS.open("a") as fh:
        fh.write(text)
