"""Calibration text of any size: tokenized in pieces (bounded tokenizer memory), losslessly, and planned for."""
from __future__ import annotations

import pytest

from conftest import last_json, run_cli
from streamquant.data import load_tokenizer, tokenize, tokenize_in_pieces, tokenize_prefix

GIB = 1 << 30


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    return load_tokenizer(tiny_models["llama"])   # byte-level BPE with a <s> post-processor


def test_text_within_one_piece_is_tokenized_exactly(tokenizer, eval_text):
    text = eval_text.read_text(encoding="utf-8")
    assert tokenize_in_pieces(tokenizer, text, piece=len(text)).tolist() == tokenize(tokenizer, text).tolist()


def test_pieces_lose_and_repeat_nothing(tokenizer, eval_text):
    """Cut into ~5000-character pieces at line ends: decoding gives back the text exactly, one <s> opens the stream,
    and the ids differ from one call's only near the cuts (a handful of tokens per piece)."""
    text = eval_text.read_text(encoding="utf-8")
    whole = tokenize(tokenizer, text)
    pieces = tokenize_in_pieces(tokenizer, text, piece=5000)
    assert tokenizer.decode(pieces[1:].tolist()) == text        # WikiText's literal "<unk>" decodes as itself
    bos = tokenizer.bos_token_id
    assert pieces[0] == bos and int((pieces == bos).sum()) == int((whole == bos).sum()) == 1
    cuts = len(text) // 5000 + 1
    assert abs(pieces.numel() - whole.numel()) <= 4 * cuts


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_an_evaluation_prefix_has_exactly_the_whole_texts_first_ids(tokenizer, smollm2, eval_text, which):
    """Evaluation encodes only the text its windows need; its ids are the whole text's, <s> included, whatever the
    count asked (one window of 48, eight of 512, more than the text holds, all)."""
    tok = tokenizer if which == "tiny" else load_tokenizer(smollm2)
    text = eval_text.read_text(encoding="utf-8")
    whole = tokenize(tok, text)
    for tokens in (48, 4096, whole.numel() - 10):
        assert tokenize_prefix(tok, text, tokens).tolist() == whole[:tokens].tolist(), tokens
    assert tokenize_prefix(tok, text, whole.numel() + 1).tolist() == whole.tolist()   # too few: all there is
    assert tokenize_prefix(tok, text, None).tolist() == whole.tolist()


def test_a_line_longer_than_a_piece_is_cut_anyway(tokenizer):
    text = "word " * 3000                                   # 15000 characters, no line end
    pieces = tokenize_in_pieces(tokenizer, text, piece=4000)
    assert tokenizer.decode(pieces[1:].tolist()) == text


def test_a_large_calibration_corpus_is_planned_by_the_piece(tiny_models, eval_text, tmp_path):
    """20 MB of calibration text: the plan's load stage holds one piece's tokenizer state plus the text and its ids
    (~0.7 GB), not 150 bytes for every character of the corpus (3 GB)."""
    big = tmp_path / "big.txt"
    text = eval_text.read_text(encoding="utf-8")
    big.write_text(text * (20_000_000 // len(text) + 1), encoding="utf-8")

    def load_stage(calib) -> int:
        res = run_cli("run", str(tiny_models["llama"]), "--calib", str(calib), "--samples", "2", "--seqlen", "32",
                      "--dry-run", "--json")
        assert res.returncode == 0, res.stderr
        return last_json(res.stdout)["stages"]["load"]["host_bytes"]

    extra = load_stage(big) - load_stage(eval_text)
    assert 0.5 * GIB < extra < 1.0 * GIB, extra / GIB
