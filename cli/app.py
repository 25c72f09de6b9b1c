"""The `streamquant` command: thin wrappers that parse options, show progress, and turn UserError into one line."""
from __future__ import annotations

import errno
import gc
import inspect
import json
import os
import sys
from pathlib import Path
from contextlib import contextmanager
from typing import Callable, Iterator, NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from streamquant.errors import Stopped, UserError

# Reproducible CPU math: MKL may otherwise pick fewer threads when the machine is busy, which changes reduction
# order, so two runs (or a run and its resume) would not be byte-identical. Must be set before torch loads MKL.
os.environ.setdefault("MKL_DYNAMIC", "FALSE")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Layer-streaming DartQuant (rotated INT4) quantization for models bigger than your GPU.")
# Messages carry user text (paths, dataset specs like 'name:train'): no emoji codes (':train:' is one), no markup
# in what we did not write ourselves.
console = Console(emoji=False, markup=False, highlight=False)
err = Console(stderr=True, emoji=False)


def say(label: str, message: str) -> None:
    """One line on stderr: a red label, then the message exactly as written (under torchrun, which rank said it)."""
    rank = f"rank {os.environ['RANK']}/{os.environ['WORLD_SIZE']}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    err.print(f"[bold red]{rank}{label}[/] {escape(message)}", highlight=False, soft_wrap=True)


@contextmanager
def stage_progress(quiet: bool = False) -> Iterator[Callable[[str, int, int], None]]:
    """One progress bar per pipeline stage, on stderr."""
    if quiet or not err.is_terminal and os.environ.get("STREAMQUANT_PROGRESS") != "1":
        yield lambda stage, done, total: None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err) as progress:
        tasks: dict[str, int] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total)
            progress.update(tasks[stage], completed=done)
        yield update


def emit(result: dict, as_json: bool, title: str, details: str = "--json") -> None:
    """The scalar results as a table for people; nested ones (per stage, per block) are named, not squeezed in."""
    if as_json:
        print(json.dumps(result))
        return
    table = Table(title=title, show_header=False)
    nested = []
    for key, value in result.items():
        if isinstance(value, (dict, list)):
            nested.append(key)
            continue
        table.add_row(key, f"{value:.6g}" if isinstance(value, float) else str(value))
    console.print(table)
    if nested:
        console.print(f"per stage and per block ({', '.join(nested)}): {details}", soft_wrap=True)


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help="Local directory, Hub id, streamquant output, or 'smollm2-135m'."),
    data: str = typer.Option("default", help="Text file, 'name[:config]:split' (needs `datasets`), or 'default'."),
    seqlen: int = typer.Option(512, help="Tokens per evaluation window."),
    windows: Optional[int] = typer.Option(None, help="Evaluate only the first N windows (default: all)."),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16 or float16."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    micro_batch: Optional[int] = typer.Option(None, help="Windows per micro-batch (default: planned)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object as the last stdout line."),
) -> None:
    """Streaming perplexity, one decoder block at a time."""
    from streamquant.evaluate import perplexity

    with stage_progress() as on_progress:
        result = perplexity(model, data, seqlen, windows, dtype, device, micro_batch, on_progress)
    emit(result, as_json, "streamquant eval")


@app.command("info")
def info_cmd(
    model: str = typer.Argument(..., help="Local directory, Hub id, or 'smollm2-135m'."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Architecture summary and per-block bytes, from config.json and safetensors headers only."""
    from streamquant.shards import ShardIndex
    from streamquant.source import resolve_model
    from streamquant.spec import read_spec

    model_dir = resolve_model(model)
    spec = read_spec(model_dir)
    index = ShardIndex(model_dir, spec)
    blocks = [index.block_bytes(i) for i in range(spec.num_layers)]
    result = {
        "model": str(model_dir), "model_type": spec.model_type, "layers": spec.num_layers,
        "hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
        "heads": spec.num_heads, "kv_heads": spec.num_kv_heads, "head_dim": spec.head_dim,
        "vocab_size": spec.vocab_size, "tied_embeddings": spec.tie_word_embeddings,
        "attention_bias": spec.attention_bias, "shards": len({e.file for e in index.entries.values()}),
        "block_bytes": blocks[0] if len(set(blocks)) == 1 else blocks,
        "max_block_bytes": max(blocks), "total_bytes": index.total_bytes(),
    }
    if spec.num_experts:   # a MoE block: the bytes above hold all its experts
        result |= {"experts": spec.num_experts, "experts_per_token": spec.experts_per_token,
                   "expert_intermediate_size": spec.expert_intermediate_size}
    emit(result, as_json, "streamquant info")


def parse_bytes(text: str) -> int:
    """'2GiB', '512MiB', '23GB', '1048576' -> bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 2**10, "M": 2**20, "G": 2**30}
    t = text.strip().upper()
    num = t.rstrip("KMGTIB")
    try:
        value = float(num) * units[t[len(num):]]
    except (ValueError, KeyError):
        raise UserError(f"cannot read {text!r} as a size (use e.g. 512MiB, 2GiB, 23GB)") from None
    if value <= 0:
        raise UserError(f"size {text!r} must be positive")
    return int(value)


@app.command("run")
def run_cmd(
    model: str = typer.Argument(..., help="Local directory, Hub id, or 'smollm2-135m'."),
    out: Optional[str] = typer.Option(None, help="Output directory (default: ./<model-name>-<scheme>)."),
    scheme: Optional[str] = typer.Option(None, help="Preset: w4a16 (default: GPTQ INT4 weights, group 128/64/32 that "
                                         "divides the model, servable), w4a4 (the paper), w4a4kv4. Explicit flags "
                                         "below override it."),
    method: Optional[str] = typer.Option(None, help="dart (learned R1/R2), quarot (random Hadamard), none. [preset: dart]"),
    w_bits: Optional[int] = typer.Option(None, help="Weight bits (16 = off). [preset: 4]"),
    a_bits: Optional[int] = typer.Option(None, help="Activation bits, per-token asymmetric (16 = off). [preset]"),
    kv_bits: Optional[int] = typer.Option(None, help="KV-cache bits (16 = off). [preset]"),
    weights: Optional[str] = typer.Option(None, help="Weight quantizer: rtn or gptq. [preset: gptq]"),
    group_size: Optional[int] = typer.Option(None, help="Weight group size (-1 = per output channel). [preset]"),
    w_asym: Optional[bool] = typer.Option(None, "--w-asym/--w-sym", help="Asymmetric weights (a zero point per group) or symmetric. [preset]"),
    act_order: Optional[bool] = typer.Option(None, "--act-order/--no-act-order", help="GPTQ: quantize columns by descending Hessian diagonal (groups stay the contiguous column ranges). [preset]"),
    w_clip: Optional[bool] = typer.Option(None, "--w-clip/--no-w-clip", help="MSE-searched weight clipping (QuaRot w_clip). [preset]"),
    damp: float = typer.Option(0.01, help="GPTQ dampening, relative to the mean of the Hessian diagonal."),
    refit_scales: Optional[int] = typer.Option(None, "--refit-scales", help="GPTQ: refit each group's scale to the codes the scan chose, by least squares under GPTQ's Hessian, in N rounds (each after the first scans again on the refitted grid; each row keeps its best); 0: off. [preset]"),
    hessians: Optional[str] = typer.Option(None, "--hessians", help="GPTQ Hessians: sequential (each group's inputs through the weights quantized before it) or one-pass (from one pass of the unquantized model: one forward per block instead of ~2.2). [preset]"),
    calib_acts: Optional[str] = typer.Option(None, "--calib-acts", help="What calibration (R2's rows, GPTQ's Hessians, the states carried to the next block) sees of activations: quantized (as the runtime computes them) or full precision (QuaRot's GPTQ); evaluation and output quantize them either way. [preset]"),
    o_online: Optional[bool] = typer.Option(None, "--o-online/--no-o-online", help="An online Hadamard on o_proj's input, across heads (QuaRot's out_proj transform; R2 turns within a head only). streamquant format. [preset]"),
    asym_calib: Optional[bool] = typer.Option(None, "--asym-calib/--no-asym-calib", help="GPTQ reproduces each linear's output on target inputs from the inputs it really gets (asymmetric calibration, GPTAQ): weights that undo part of the error before them. Needs --weights gptq; the targets are --asym-targets'. [preset]"),
    asym_targets: Optional[str] = typer.Option(None, "--asym-targets", help="--asym-calib's targets: input (the input before the activation quantizer; needs --a-bits < 16; no extra pass) or model (the full-precision model's, from a second calibration stream through the unquantized blocks; weight-only too; needs --hessians sequential; ~2x the block passes, a second state buffer and block). Default: input with quantized activations, else model. [preset]"),
    a_clip: float = typer.Option(0.9, help="Activation clip ratio."),
    a_symmetric: bool = typer.Option(False, "--a-symmetric", help="Symmetric per-token activations (what int-quantized/pack-quantized A8 exports express, with --a-bits 8 --a-clip 1)."),
    r4_online: bool = typer.Option(False, "--r4-online", help="pack-/int-quantized: R4 online as a transform_config (vLLM TP=1 and streamquant.load apply it; plain transformers does not)."),
    calib: str = typer.Option("default", help="Calibration text: file, 'default', or name[:config]:split."),
    samples: int = typer.Option(128, help="Calibration windows."),
    seqlen: int = typer.Option(2048, help="Tokens per calibration (and evaluation) window."),
    seed: int = typer.Option(0),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16, float16."),
    device: str = typer.Option("auto"),
    micro_batch: Optional[int] = typer.Option(None, help="Samples per micro-batch (default: planned)."),
    r1_reservoir: str = typer.Option("256MiB", help="Byte budget of the sampled R1 calibration reservoir."),
    r1_epochs: int = typer.Option(10), r2_epochs: int = typer.Option(5, help="0: R2 stays its random Hadamard init."),
    r1_steps: int = typer.Option(10, "--r1-steps-per-epoch", help="R1 optimizer steps per epoch (each over a tenth of the epoch's 10 % of the reservoir); 0: steps of 64 rows."),
    r1_lr: Optional[float] = typer.Option(None, "--r1-lr", help="R1's SGD learning rate (momentum 0.9). [preset: 1e-2 in w4a4 (measured), else 1e-3 as in the reference code]"),
    eval: Optional[str] = typer.Option(None, "--eval", help="End with the quantized model's perplexity on this text."),
    eval_windows: Optional[int] = typer.Option(None, help="Evaluate the first N windows (default: all)."),
    resume: bool = typer.Option(False, "--resume", help="Continue a stopped or killed run in --out."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out."),
    no_write: bool = typer.Option(False, "--no-write", help="Write no output (measure, e.g. with --eval, only)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or progress lines (run.log is still written)."),
    gpu_mem: Optional[str] = typer.Option(None, "--gpu-mem", help="GPU memory budget, e.g. 23GiB: fits the micro-batch, caps CUDA."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the scheme, output directory and memory plan (the same as `plan` with these options) and exit; reads config, headers and tokenizer, writes nothing."),
    fmt: str = typer.Option("auto", "--format", help="auto, pack-quantized (W4A16/W4A8), int-quantized (W8A8): compressed-tensors for transformers/vLLM; streamquant (R3, KV, asymmetric or clipped activations)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object as the last stdout line."),
    dist_timeout: float = typer.Option(7200, "--dist-timeout", help="Under torchrun: seconds any collective may wait for the other ranks (a GPTQ solve, a block write) before the group fails."),
) -> None:
    """Quantize: capture → calibrate R1 → per block rotate, calibrate R2, quantize, write."""
    from dataclasses import replace as dc_replace

    from streamquant.pipeline import Pipeline
    from streamquant.preflight import RunConfig, prepare
    from streamquant.progress import LOG_FILE, RunProgress, progress_mode
    from streamquant.rotate.dart import R1_CONFIG, R2_CONFIG
    from streamquant.schemes import build_config, default_out
    from streamquant.stopping import SafeStop

    base = RunConfig(model=model, damp=damp,
                     a_clip=a_clip, calib=calib, a_symmetric=a_symmetric, r4_online=r4_online,
                     samples=samples, seqlen=seqlen, seed=seed, dtype=dtype, device=device, micro_batch=micro_batch,
                     r1_reservoir_bytes=parse_bytes(r1_reservoir),
                     r1_train=dc_replace(R1_CONFIG, epochs=r1_epochs, batches_per_epoch=r1_steps or None),
                     r2_train=dc_replace(R2_CONFIG, epochs=r2_epochs), eval=eval, eval_windows=eval_windows,
                     format=fmt, gpu_mem=None if gpu_mem is None else parse_bytes(gpu_mem))
    cfg, choice = build_config(base, scheme, dict(method=method, w_bits=w_bits, a_bits=a_bits, kv_bits=kv_bits,
                                                  weights=weights, group_size=group_size,
                                                  w_symmetric=None if w_asym is None else not w_asym,
                                                  act_order=act_order, w_clip=w_clip, hessians=hessians,
                                                  calib_acts=calib_acts, o_online=o_online,
                                                  asym_calib=asym_calib, asym_targets=asym_targets,
                                                  refit_scales=refit_scales, r1_lr=r1_lr))
    out_dir = None if no_write else Path(out) if out is not None else default_out(model, choice.scheme)
    cfg.out = out_dir
    if dry_run:
        prepared = prepare(cfg, plan_only=True, optional_refit=choice.refit_optional)
        plan, cfg = prepared.plan, prepared.cfg
        if as_json:
            print(json.dumps({**plan.to_json(), "scheme": choice.scheme, "group_size": cfg.group_size,
                              "refit_scales": cfg.refit_scales, "notes": prepared.notes,
                              "out": None if out_dir is None else str(out_dir)}))
            return
        console.print(choice.line(cfg), soft_wrap=True)
        for note in prepared.notes:
            console.print(note, soft_wrap=True)
        console.print(f"output directory: {out_dir if out_dir is not None else '(none: --no-write)'}"
                      + ("" if out is not None or out_dir is None else " (default ./<model-name>-<scheme>; --out to change)"),
                      soft_wrap=True)
        show_plan(plan, False)
        return
    from streamquant.distributed import join

    group = join(cfg.device, dist_timeout)   # one process (Solo) unless started by torchrun
    prepared = prepare(cfg, group=group, optional_refit=choice.refit_optional)
    cfg = prepared.cfg
    if not group.writes:   # torchrun: rank 0 alone writes, shows progress and prints the result
        with SafeStop(lambda message: None) as stop:   # Ctrl-C: the group stops together at a block boundary
            try:
                Pipeline(prepared, sink=None, should_stop=stop).run()
            except Stopped:
                raise typer.Exit(130)
        group.close()
        return
    sink = None
    if out_dir is not None:
        from streamquant.writer import OutputWriter

        sink = OutputWriter(out_dir, resume=resume, overwrite=overwrite)
    mode = progress_mode(quiet, err.is_terminal)
    resume_cmd = resume_command(out, out_dir)
    with RunProgress(mode, device=prepared.device) as progress, \
            SafeStop(lambda message: progress.line(message, show=True)) as stop:
        progress.set_plan(prepared.plan)
        if sink is not None:
            progress.log_into(lambda: sink.out / LOG_FILE if sink.manifest else None)
        progress.line(choice.line(cfg) + (f"; output {out_dir}" if out_dir is not None else ""), show=mode == "bar")
        for note in prepared.notes:
            progress.line(note, show=True)
        try:
            result = Pipeline(prepared, progress, sink, on_stage=progress.stage, should_stop=stop).run()
        except Stopped as exc:
            progress.line(f"stopped at a safe point: {exc.done} of {exc.total} blocks written")
            progress.close()
            say("stopped:", f"{exc.done} of {exc.total} blocks written to {out_dir}; continue with: {resume_cmd}"
                if out_dir is not None else f"{exc.done} of {exc.total} blocks done; nothing was written")
            raise typer.Exit(130)
        except KeyboardInterrupt:
            progress.line("aborted (second Ctrl-C)")
            progress.close()
            if out_dir is not None and out_dir.exists():
                say("aborted:", f"finished blocks are kept in {out_dir}; continue with: {resume_cmd}")
            raise
        progress.line(f"done in {result['seconds']:.1f}s")
    group.close()
    if as_json:
        print(json.dumps(result))
        return
    show_summary(result, out_dir)


def resume_command(out: str | None, out_dir: Path | None) -> str:
    """The command line of this run, with --resume (and --out when it was the default), for copy and paste."""
    import shlex

    args = [a for a in sys.argv[1:] if a not in ("--overwrite", "--resume")]
    if out is None and out_dir is not None:
        args += ["--out", str(out_dir)]
    return shlex.join(["streamquant", *args, "--resume"])


def show_summary(result: dict, out_dir: Optional[Path]) -> None:
    """End of run: seconds per stage, peak memory against the plan, output size, PPL, and how to use the result."""
    from streamquant.progress import how_to_use, summary_rows

    table = Table(title="streamquant run", show_header=False)
    for label, value in summary_rows(result, out_dir):
        table.add_row(label, value)
    console.print(table)
    details = f"{out_dir / 'report.json'} or --json" if out_dir is not None else "--json"
    console.print(f"per stage and per block (blocks, memory, plan): {details}", soft_wrap=True)
    if out_dir is not None:
        console.print(how_to_use(result["format"], out_dir, result.get("r4_online", False),
                                 not result.get("w_symmetric", True)), soft_wrap=True)


def show_plan(plan, as_json: bool) -> None:
    if as_json:
        print(json.dumps(plan.to_json()))
        return
    gib = 1 << 30
    table = Table(title=f"memory plan: micro-batch {plan.micro_batch} on {plan.device}")
    for col in ("stage", "peak GPU GiB", "peak host GiB"):
        table.add_column(col, justify="right" if col != "stage" else "left")
    for stage, s in plan.stages.items():
        table.add_row(stage, f"{s['gpu_bytes'] / gib:.2f}", f"{s['host_bytes'] / gib:.2f}")
    console.print(table)
    console.print(f"output on disk: {plan.output_bytes / gib:.2f} GiB; smallest GPU budget that works: "
                    f"{plan.min_gpu_bytes / gib:.2f} GiB")


def plan_cmd(**options) -> None:
    """Predict per-stage peak GPU and host memory and the output size; choose the micro-batch for --gpu-mem.
    Takes run's options and prints exactly what `run ... --dry-run` prints (with --device auto, a --gpu-mem budget
    plans a CUDA run even on a machine without a GPU)."""
    run_cmd(**options, out=None, resume=False, overwrite=False, no_write=False, quiet=False, dry_run=True)


_RUN_ONLY = ("out", "resume", "overwrite", "no_write", "quiet", "dry_run")
_RUN_SIGNATURE = inspect.signature(run_cmd)
plan_cmd.__signature__ = _RUN_SIGNATURE.replace(parameters=[
    p for name, p in _RUN_SIGNATURE.parameters.items() if name not in _RUN_ONLY])
plan_cmd.__annotations__ = {k: v for k, v in run_cmd.__annotations__.items() if k not in _RUN_ONLY}
app.command("plan")(plan_cmd)


@app.command("bench")
def bench_cmd(
    scale: int = typer.Option(1, help="Divide every Llama-2-70B dimension by this (1 = real 70B blocks)."),
    blocks: int = typer.Option(4, help="Decoder blocks in the synthetic checkpoint (the report extrapolates to 80)."),
    samples: int = typer.Option(128), seqlen: int = typer.Option(2048),
    gpu_mem: str = typer.Option("23GiB", "--gpu-mem", help="GPU budget (ignored on a CPU run)."),
    device: str = typer.Option("auto"), dtype: str = typer.Option("auto"),
    weights: str = typer.Option("gptq", help="gptq or rtn."),
    hessians: str = typer.Option("sequential", "--hessians", help="GPTQ Hessians: sequential (the w4a4 preset's) or one-pass."),
    w_clip: bool = typer.Option(False, "--w-clip/--no-w-clip", help="The w4a4 preset's MSE weight clip search (off: comparable with earlier entries)."),
    asym_calib: bool = typer.Option(False, "--asym-calib/--no-asym-calib", help="Asymmetric calibration of GPTQ (off: comparable with earlier entries)."),
    asym_targets: str = typer.Option("input", "--asym-targets", help="Its targets: input (before the activation quantizer) or model (a full-precision stream; sequential Hessians)."),
    refit_scales: int = typer.Option(0, "--refit-scales", help="GPTQ's least-squares scale refit, in N rounds (0: off, comparable with earlier entries)."),
    r1_reservoir: str = typer.Option("256MiB", help="Byte budget of the sampled R1 calibration reservoir."),
    workdir: Optional[str] = typer.Option(None, help="Keep the synthetic checkpoint and output here (default: temp, removed)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object as the last stdout line."),
) -> None:
    """The 70B-shape proof: full pipeline on synthetic Llama-2-70B-shaped blocks; time and memory per stage,
    planner vs measured, and the extrapolation to 80 blocks."""
    from streamquant.bench import BenchConfig, markdown, seventy_b

    cfg = BenchConfig(scale=scale, blocks=blocks, samples=samples, seqlen=seqlen, gpu_mem=parse_bytes(gpu_mem),
                      device=device, dtype=dtype, weights=weights, hessians=hessians, w_clip=w_clip, asym_calib=asym_calib, asym_targets=asym_targets, refit_scales=refit_scales, r1_reservoir_bytes=parse_bytes(r1_reservoir), workdir=Path(workdir) if workdir else None)
    with stage_progress() as on_progress:
        result = seventy_b(cfg, on_progress)
    if as_json:
        print(json.dumps(result))
    else:
        console.print(markdown(result))


@app.command("verify")
def verify_cmd(out: str = typer.Argument(..., help="A streamquant output directory.")) -> None:
    """Re-hash every file against the manifest; report missing, corrupt or unfinished parts (exit 1)."""
    from streamquant.manifest import check_files, read_manifest

    path = Path(out)
    manifest = read_manifest(path)
    problems = check_files(path, manifest)
    if not manifest.get("complete"):
        problems.append(f"incomplete: {len(manifest.get('blocks', []))} of {manifest.get('num_layers', '?')} blocks "
                        f"written, not finalized (resume with `streamquant run ... --out {out} --resume`)")
    for line in problems:
        say("FAIL", line)
    if problems:
        raise typer.Exit(1)
    console.print(f"OK {len(manifest['files'])} files match the manifest; output complete")


def main() -> None:
    """Entry point: bad input is one line on stderr and exit code 2, never a traceback."""
    try:
        _main()
    finally:
        # The process ends here, its outputs written and closed: hand the millions of objects torch and transformers
        # created to the OS at exit instead of letting the interpreter's last garbage collection walk them all
        # (measured 1.27 s of every command on the 2-core machine, 60 % of a data-free RTN run's own work).
        gc.freeze()


def _main() -> None:
    try:
        rc = app(standalone_mode=False)  # click returns (not raises) the code of a typer.Exit here
        sys.exit(rc if isinstance(rc, int) else 0)
    except UserError as exc:
        say("error:", str(exc))
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err.print("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:   # a run keeps its finished blocks: the user frees space and resumes
            where = f" writing {exc.filename}" if exc.filename else ""
            say("error:", f"no space left on the device{where}; free some space and rerun with --resume")
            sys.exit(2)
        _unexpected(exc)
    except Exception as exc:  # click's usage errors (typer may vendor its own click) and anything unexpected
        if hasattr(exc, "format_message") and isinstance(getattr(exc, "exit_code", None), int):
            say("error:", exc.format_message())
            sys.exit(exc.exit_code)
        _unexpected(exc)


def _unexpected(exc: BaseException) -> NoReturn:
    if os.environ.get("STREAMQUANT_DEBUG"):
        raise exc
    say("internal error:", f"{type(exc).__name__}: {exc} (set STREAMQUANT_DEBUG=1 for the traceback)")
    sys.exit(1)


if __name__ == "__main__":
    main()
