"""Progress a person can read: a live bar on a terminal, timestamped lines everywhere else, the same lines in
`run.log` inside the output directory; then the end-of-run summary and how to use the result.

The pipeline only reports events (a stage starts or ends, block i of n is done); this module decides how they look.
Stages inside a block (rotate, r2, quantize, forward, write) are shown on the bar but logged once per block, so a
log of an 80-block model has one line per block, not five.
"""
from __future__ import annotations

import datetime
import sys
import time
from pathlib import Path
from typing import Callable, TextIO

import torch

from streamquant.memory import current_host_bytes

GIB = 1 << 30
BLOCK_STAGES = ("rotate", "r2", "quantize", "forward", "write")   # timed inside each block of the main loop
ANNOUNCED = ("capture", "r1", "replay", "blocks", "eval")          # long stages: a line when they start, too
LOG_FILE = "run.log"                                             # not in the manifest: a log, not the checkpoint


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def size(n: float) -> str:
    return gib(n) if n >= GIB else f"{n / (1 << 20):.1f} MiB"


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class RunProgress:
    """Events in, readable progress out. mode: 'bar' (a terminal), 'lines' (pipes, nohup, CI) or 'off' (--quiet).
    Called as on_progress(stage, done, total) per block; `stage(name, seconds)` at each stage's start (None) and end.
    """

    def __init__(self, mode: str, stream: TextIO | None = None, device: torch.device | None = None):
        self.mode, self.stream = mode, stream or sys.stderr
        self.device = device or torch.device("cpu")
        self.plan_host, self.plan_gpu = 0, 0
        self.phase: str | None = None            # top-level stage or 'blocks'
        self.phase_start = self.last_event = time.perf_counter()
        self.first_done: int | None = None
        self.sub = ""
        self.log_target: Callable[[], Path | None] = lambda: None
        self.pending: list[str] = []              # lines waiting for the output directory to exist
        self._bar = self._task = None
        if mode == "bar":
            self._start_bar()

    # ---- setup ----
    def set_plan(self, plan) -> None:
        self.plan_host, self.plan_gpu = plan.peak_host_bytes, plan.peak_gpu_bytes

    def log_into(self, target: Callable[[], Path | None]) -> None:
        """Append every plain line to the file `target()` names once it names one (the output directory is created
        by the writer, after the data loaded: lines before that wait)."""
        self.log_target = target

    # ---- events ----
    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if self.first_done is None:
            self.first_done = done - 1
        rate = (now - self.phase_start) / max(1, done - self.first_done)
        eta = rate * (total - done)
        label = "block" if stage in ("quantize", "replay", "capture") else "step"
        self.line(f"{stage} {label} {done}/{total} done in {now - self.last_event:.1f}s · ETA {duration(eta)} · "
                  f"{self.memory()}")
        self.last_event = now
        if self._bar is not None:
            if self._bar.tasks[0].total != total:
                self._bar.reset(self._task, total=total, completed=done)
            self._bar.update(self._task, completed=done, description=self._describe(stage, done, total))

    def stage(self, name: str, seconds: float | None) -> None:
        if name in BLOCK_STAGES:
            if self.phase != "blocks":
                self._begin("blocks")
            self.sub = name
            if self._bar is not None and seconds is None:
                task = self._bar.tasks[0]
                self._bar.update(self._task, description=self._describe(
                    "blocks", int(task.completed) + 1, int(task.total or 0)))
            return
        if seconds is None:
            self._begin(name)
        else:
            self.line(f"stage {name} done in {seconds:.1f}s · {self.memory()}")
            self.phase = None

    def _begin(self, name: str) -> None:
        if self.phase == "blocks":
            self.line(f"stage blocks done in {time.perf_counter() - self.phase_start:.1f}s · {self.memory()}")
        self.phase, self.phase_start, self.first_done, self.sub = name, time.perf_counter(), None, ""
        self.last_event = self.phase_start
        if name in ANNOUNCED:
            self.line(f"stage {name} started" + (" (per block: rotate, r2, quantize, forward, write)"
                                                   if name == "blocks" else ""))
        if self._bar is not None:
            self._bar.reset(self._task, total=None, completed=0, description=f"{name}")

    def _describe(self, stage: str, done: int, total: int) -> str:
        sub = f" · {self.sub}" if self.sub and stage == "blocks" else ""
        return f"{stage} {min(done, total)}/{total}{sub}"

    # ---- output ----
    def memory(self) -> str:
        text = f"host {gib(current_host_bytes())}" + (f" (plan {gib(self.plan_host)})" if self.plan_host else "")
        if self.device.type == "cuda" and torch.cuda.is_available():
            text += f" · GPU {gib(torch.cuda.memory_allocated(self.device))}" + (
                f" (plan {gib(self.plan_gpu)})" if self.plan_gpu else "")
        return text

    def line(self, text: str, show: bool = False) -> None:
        """One plain timestamped line: on stderr in 'lines' mode (in every mode when `show`: above the bar on a
        terminal), and into run.log in every mode."""
        stamped = f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S} {text}"
        if self._bar is not None and show:
            self._bar.console.print(text, soft_wrap=True)
        elif self.mode == "lines" or show:
            print(stamped, file=self.stream, flush=True)
        self.pending.append(stamped)
        self._flush_log()

    def _flush_log(self) -> None:
        path = self.log_target()
        if path is None or not self.pending:
            return
        with open(path, "a", encoding="utf-8") as fh:
            fh.write("\n".join(self.pending) + "\n")
        self.pending.clear()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        self._flush_log()

    def __enter__(self) -> "RunProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start_bar(self) -> None:
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)
        from rich.text import Text

        owner = self

        class MemoryColumn(ProgressColumn):
            """Host RSS (and GPU memory on CUDA) read at every refresh, beside the plan's peak."""

            def render(self, task) -> Text:
                return Text(owner.memory())

        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("ETA"),
                             TimeRemainingColumn(), TimeElapsedColumn(), MemoryColumn(),
                             console=Console(file=self.stream, emoji=False, markup=False, highlight=False),
                             refresh_per_second=4)
        self._task = self._bar.add_task("starting", total=None)
        self._bar.start()


def progress_mode(quiet: bool, is_terminal: bool) -> str:
    """'off' with --quiet, a bar on a terminal, plain lines otherwise (STREAMQUANT_PROGRESS=1 forces the bar)."""
    import os

    forced = os.environ.get("STREAMQUANT_PROGRESS")
    if quiet:
        return "off"
    if forced == "1" or (is_terminal and forced != "0"):
        return "bar"
    return "lines"


# ---- end of run ----

def output_size(out: Path) -> int:
    return sum(p.stat().st_size for p in out.rglob("*") if p.is_file())


def summary_rows(result: dict, out: Path | None) -> list[tuple[str, str]]:
    """Seconds per stage, peak memory against the plan, output size and PPL, as label/value rows."""
    rows = [("scheme", f"{result['method']} W{result['w_bits']}A{result['a_bits']}KV{result['kv_bits']} "
                       f"{result['weights']} group {result['group_size']} · format {result['format']}")]
    for stage, seconds in result.get("stage_seconds", {}).items():
        if stage == "replay" and seconds < 0.05:   # only a resumed run replays blocks
            continue
        rows.append((f"  {stage}", f"{seconds:.1f} s"))
    rows.append(("total", f"{result['seconds']:.1f} s ({duration(result['seconds'])})"))
    plan = result.get("plan", {})
    rows.append(("peak host memory", f"{gib(result['peak_host_bytes'])} (plan {gib(plan.get('peak_host_bytes', 0))})"))
    if result.get("device", "cpu").startswith("cuda"):
        rows.append(("peak GPU memory", f"{gib(result['peak_gpu_bytes'])} (plan {gib(plan.get('peak_gpu_bytes', 0))})"))
    if out is not None:
        rows.append(("output", f"{out} · {size(output_size(out))} (plan {size(plan.get('output_bytes', 0))})"))
    if "ppl" in result:
        rows.append(("perplexity", f"{result['ppl']:.4f} over {result['eval_windows']} windows"))
    return rows


def how_to_use(fmt: str, out: Path, r4_online: bool = False, zero_points: bool = False) -> str:
    """The exact command that loads or serves the result: plain transformers where it computes the right thing,
    `streamquant.load` where it does not (it drops R4's online transform and refuses packed zero points)."""
    if fmt in ("pack-quantized", "int-quantized"):
        if r4_online or zero_points:
            why = "R4 online" if r4_online else "zero points"
            load = (f"load it (pip install compressed-tensors; plain transformers cannot load {why} correctly):\n"
                    f"  python -c \"import streamquant; m = streamquant.load('{out}'); print(m.config.quantization_config)\"\n")
        else:
            load = (f"load it (pip install compressed-tensors):\n"
                    f"  python -c \"from transformers import AutoModelForCausalLM; "
                    f"m = AutoModelForCausalLM.from_pretrained('{out}'); print(m.config.quantization_config)\"\n")
        return load + f"serve it: vllm serve {out}\nevaluate it: streamquant eval {out}"
    return f"evaluate it (online R3/R4 and activation quantizers at run time): streamquant eval {out}"
