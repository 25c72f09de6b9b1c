"""Text in, token windows out: evaluation windows (fixed, from the start) and seeded calibration windows."""
from __future__ import annotations

import contextlib
import importlib.util
import sys
from importlib import resources
from pathlib import Path
from typing import Iterator

import torch

from streamquant.errors import UserError

DEFAULT_TEXT = "default"
BYTES_PER_TOKEN = 3.5   # English text under a Llama-family tokenizer: 4.0 on WikiText-2 with SmolLM2's (a bit fewer
                        # bytes per token errs toward more evaluation windows, i.e. more planned memory)


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as exc:  # transformers raises many types for a missing/broken tokenizer
        raise UserError(f"cannot load a tokenizer from {model_dir}: {str(exc).splitlines()[0]}") from exc


def read_text(source: str) -> str:
    """A text file path, 'default' (a small public-domain text shipped with the package), or a Hub dataset
    'name[:config]:split' when the `datasets` package is installed."""
    if source == DEFAULT_TEXT:
        return resources.files("streamquant").joinpath("data/default_calib.txt").read_text(encoding="utf-8")
    path = Path(source).expanduser()
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise UserError(f"data file {path} is not UTF-8 text") from exc
    if path.exists():
        raise UserError(f"data path {path} is a directory; pass a text file")
    if ":" in source and importlib.util.find_spec("datasets") is not None:
        return _hub_text(source)
    raise UserError(f"data file {path} does not exist (or pass 'name[:config]:split' with `datasets` installed)")


def text_bytes(source: str) -> int:
    """Size of a text source for the memory plan, without holding the text: a file's size, or a dataset's text
    column in its memory-mapped Arrow cache (loading it here also refuses a bad dataset before any work)."""
    if source == DEFAULT_TEXT:
        with resources.as_file(resources.files("streamquant").joinpath("data/default_calib.txt")) as path:
            return path.stat().st_size
    path = Path(source).expanduser()
    if path.is_file():
        return path.stat().st_size
    if not path.exists() and ":" in source and importlib.util.find_spec("datasets") is not None:
        ds, column = _hub_dataset(source)
        return ds.data.column(column).nbytes
    return 0   # read_text refuses it with the reason


def _hub_dataset(source: str):
    """(dataset, text column) for 'name[:config]:split': a Hub id or a local dataset folder."""
    import datasets

    name, *config, split = source.split(":")
    if not sys.stderr.isatty():   # no bars in logs and pipes, where a failed load must stay one error line
        datasets.disable_progress_bars()
    unreachable = not Path(name).expanduser().exists() and not _hub_reachable()
    try:
        with _hub_offline(unreachable):   # no network: the local cache only, not five retries per file
            ds = datasets.load_dataset(name, config[0] if config else None, split=split)
    except Exception as exc:
        from huggingface_hub import constants

        where = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hugging Face Hub is unreachable"
        why = (f"{where} and the dataset is not in the local cache; pass a text file or a local dataset folder"
               if unreachable else str(exc).splitlines()[0])
        raise UserError(f"cannot load dataset {source}: {why}") from exc
    return ds, "text" if "text" in ds.column_names else ds.column_names[0]


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connect to the Hub endpoint (already offline when HF_HUB_OFFLINE=1)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """huggingface_hub's and datasets' offline switches for one call (they read the environment at import)."""
    import datasets
    from huggingface_hub import constants

    if not offline:
        yield
        return
    saved = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


def _hub_text(source: str) -> str:
    ds, column = _hub_dataset(source)
    return "\n\n".join(ds[column])


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids exactly as `tokenizer(text).input_ids` with the tokenizer's defaults (comparable with others' PPL)."""
    ids = tokenizer(text, verbose=False).input_ids
    return torch.tensor(ids, dtype=torch.long)


PREFIX_MARGIN = 256   # ids past the ones kept that a prefix must also hold: the cut changes only its last few


def tokenize_prefix(tokenizer, text: str, tokens: int | None) -> torch.Tensor:
    """The first `tokens` ids of `tokenize(text)` (all of them for None), encoding only as much of the text as they
    need: a prefix cut at a line end, taken when a prefix twice as long starts with the same ids (a cut can only
    change the ids next to it); else the whole text. Evaluating 8 windows of 512 on WikiText-2 test encodes
    ~200 KB (both prefixes) of its 1.26 MB: 0.13 s instead of 1.17 s."""
    if tokens is None:
        return tokenize(tokenizer, text)
    chars = 16 * tokens   # English BPE averages ~4 characters a token
    while 2 * chars < len(text):
        short, long = (tokenize(tokenizer, text[: text.find("\n", n) + 1 or n]) for n in (chars, 2 * chars))
        if short.numel() >= tokens + PREFIX_MARGIN and torch.equal(short[:tokens], long[:tokens]):
            return short[:tokens]
        chars *= 4
    return tokenize(tokenizer, text)[:tokens]


CALIB_PIECE_CHARS = 4 << 20   # a fast tokenizer holds ~140 bytes per character while it encodes one call's text


def tokenize_in_pieces(tokenizer, text: str, piece: int = CALIB_PIECE_CHARS) -> torch.Tensor:
    """Token ids of a calibration text, encoded in pieces cut at line ends so the tokenizer's working set stays
    bounded however large the corpus. The ids differ from one call's only where a piece starts, which sampled
    calibration windows do not care about; a text within one piece gets exactly `tokenize`'s ids."""
    if len(text) <= piece:
        return tokenize(tokenizer, text)
    parts, start = [], 0
    while start < len(text):
        end = len(text) if start + piece >= len(text) else text.rfind("\n", start, start + piece) + 1
        if end <= start:                                   # one line longer than a piece
            end = start + piece
        ids = tokenizer(text[start:end], add_special_tokens=start == 0, verbose=False).input_ids
        parts.append(torch.tensor(ids, dtype=torch.long))
        start = end
    return torch.cat(parts)


def eval_windows(ids: torch.Tensor, seqlen: int, windows: int | None) -> torch.Tensor:
    """Non-overlapping windows of `seqlen` tokens from the start: [W, seqlen]."""
    if seqlen < 2:
        raise UserError(f"--seqlen must be at least 2 (got {seqlen})")
    available = ids.numel() // seqlen
    if available == 0:
        raise UserError(f"the data has {ids.numel()} tokens, fewer than one window of --seqlen {seqlen}")
    count = available if windows is None else windows
    if count < 1:
        raise UserError(f"--windows must be at least 1 (got {count})")
    if count > available:
        raise UserError(f"the data holds only {available} windows of {seqlen} tokens, --windows asked for {count}")
    return ids[: count * seqlen].view(count, seqlen).clone()


def eval_windows_of_text(tokenizer, text: str, seqlen: int, windows: int | None) -> torch.Tensor:
    """`eval_windows` of the text's ids, encoding only the text those windows need (`tokenize_prefix`)."""
    return eval_windows(tokenize_prefix(tokenizer, text, None if windows is None else windows * seqlen), seqlen,
                        windows)


def calibration_windows(ids: torch.Tensor, seqlen: int, samples: int, seed: int) -> torch.Tensor:
    """`samples` random windows of `seqlen` tokens, reproducible from `seed`: [samples, seqlen]."""
    if seqlen < 2:
        raise UserError(f"--seqlen must be at least 2 (got {seqlen})")
    if samples < 1:
        raise UserError(f"--samples must be at least 1 (got {samples})")
    if ids.numel() <= seqlen:
        raise UserError(f"the calibration data has {ids.numel()} tokens, not more than one window of {seqlen}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (samples,), generator=gen)
    return torch.stack([ids[s: s + seqlen] for s in starts.tolist()])
