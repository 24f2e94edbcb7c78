from pathlib import Path

import pytest

from armor_solver import data


def test_wikipedia_split_is_disjoint_and_deterministic():
    a, b = data.load_wikipedia(), data.load_wikipedia()
    assert a.calibration == b.calibration and a.held_out == b.held_out
    assert not set(a.calibration) & set(a.held_out)
    frac = len(a.held_out) / (len(a.held_out) + len(a.calibration))
    assert 0.05 < frac < 0.15, frac


def test_text_file_split_never_overlaps(solver_text_file, solver_tokenizer):
    corpus = data.load_text_file(solver_text_file)
    text = Path(solver_text_file).read_text(encoding="utf-8").strip()
    calib, held = corpus.calibration[0], corpus.held_out[0]
    assert text.startswith(calib) and text.endswith(held)
    assert len(calib) + len(held) <= len(text)
    assert not calib[-1].isspace() and not held[0].isspace()  # the cut falls on whitespace
    ids = data.calibration_ids(solver_tokenizer, corpus, 3, 50)
    assert ids.shape == (3, 50)
    # calibration windows are the first tokens of the calibration text, consecutive
    first = solver_tokenizer(calib[:400], add_special_tokens=False)["input_ids"][:150]
    assert ids.flatten()[:150].tolist() == first


def test_empty_file_is_refused(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("  \n")
    with pytest.raises(data.CorpusError, match="empty"):
        data.load_corpus(str(path))


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(data.CorpusError, match="no such file"):
        data.load_corpus(str(tmp_path / "nope.txt"))


def test_too_short_corpus_names_the_numbers(tmp_path, solver_tokenizer):
    path = tmp_path / "short.txt"
    path.write_text("a short text. " * 20)
    corpus = data.load_corpus(str(path))
    with pytest.raises(data.CorpusError, match=r"4 windows of 128 tokens need 512"):
        data.calibration_ids(solver_tokenizer, corpus, 4, 128)
    with pytest.raises(data.CorpusError, match="held-out"):
        data.evaluation_ids(solver_tokenizer, corpus, 4, 128)
