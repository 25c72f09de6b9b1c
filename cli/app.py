"""The `streamquant` command: thin wrappers that parse options, show progress, and turn UserError into one line."""
from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from streamquant.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Layer-streaming DartQuant (rotated INT4) quantization for models bigger than your GPU.")
err = Console(stderr=True)


@contextmanager
def block_progress(label: str, total: int, quiet: bool = False) -> Iterator[Callable[[int], None]]:
    """A progress bar over decoder blocks on stderr (stdout stays clean for --json)."""
    if quiet or not err.is_terminal and os.environ.get("STREAMQUANT_PROGRESS") != "1":
        yield lambda i: None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as progress:
        task = progress.add_task(label, total=total)
        yield lambda i: progress.update(task, completed=i + 1)


def emit(result: dict, as_json: bool, title: str) -> None:
    if as_json:
        print(json.dumps(result))
        return
    table = Table(title=title, show_header=False)
    for key, value in result.items():
        table.add_row(key, f"{value:.6g}" if isinstance(value, float) else str(value))
    Console().print(table)


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
    from streamquant.source import resolve_model
    from streamquant.spec import read_spec

    layers = read_spec(resolve_model(model)).num_layers
    with block_progress("eval", layers, quiet=False) as tick:
        result = perplexity(model, data, seqlen, windows, dtype, device, micro_batch, on_block=tick)
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
    emit(result, as_json, "streamquant info")


def main() -> None:
    """Entry point: bad input is one line on stderr and exit code 2, never a traceback."""
    try:
        app(standalone_mode=False)
    except UserError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err.print("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except Exception as exc:  # click's usage errors and anything unexpected
        import click

        if isinstance(exc, click.ClickException):
            err.print(f"[bold red]error:[/] {exc.format_message()}", highlight=False, soft_wrap=True)
            sys.exit(exc.exit_code)
        if os.environ.get("STREAMQUANT_DEBUG"):
            raise
        err.print(f"[bold red]internal error:[/] {type(exc).__name__}: {exc} (set STREAMQUANT_DEBUG=1 for the traceback)",
                  highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
