"""Real text for calibration and evaluation, all of it shipped in installed packages (nothing
is downloaded). Each text set is a named list of documents (:data:`TEXTS`) with a role:
calibration text may be read by the converter, evaluation text only by the benchmarks.

=============  ===========  ===============================================================
name           role         source
=============  ===========  ===============================================================
calibration    calibration  the 103 Wikipedia articles of the ``gensim`` package
evaluation     evaluation   (enwiki-...-shortened.bz2), split BY ARTICLE with a fixed rule,
                            sha1(title) mod 3 == 0 -> evaluation; wiki markup stripped
news           evaluation   ``gensim``'s lee_background.cor: 300 Australian news articles
                            of 2000-01 (ABC news-mail; the Lee, Pincombe & Welsh 2005
                            document-similarity corpus), one per line; 7 duplicate lines
                            dropped. A second held-out KIND of text: short news reports, not
                            encyclopaedia prose, from a source no calibration text comes
                            from, so a calibration that over-fits Wikipedia's style shows
                            up as a gap between the two held-out perplexities
python-docs    calibration  the Python language reference shipped with the interpreter
                            (``pydoc_data.topics``: 79 topics of prose, grammar and code
                            examples; its exact text follows the Python version)
newsgroups     calibration  ``gensim``'s mini_newsgroup: 200 Usenet posts of 1993
                            (20 Newsgroups, alt.atheism and sci.space): informal forum
                            e-mail with quoted replies and signatures; only the From,
                            Subject, Newsgroups, Organization headers are kept
=============  ===========  ===============================================================

python-docs and newsgroups are the VARIED calibration texts (:data:`VARIED_TEXTS`): not
encyclopaedia prose and not any evaluation text; calibration uses them only when asked
(model_patches.conversion.calibration_data, ``varied_mix``). ``gensim`` is installed with
--no-deps and never imported (it needs scipy): its data files are read directly.
"""

from __future__ import annotations

import bz2
import functools
import hashlib
import pickletools
import re
import xml.etree.ElementTree as ET
import zlib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

GENSIM_DATA = "gensim/test/test_data/"
DATA_FILE = GENSIM_DATA + "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_FILE = GENSIM_DATA + "lee_background.cor"
NEWSGROUPS_FILE = GENSIM_DATA + "mini_newsgroup"
MIN_CHARS = 1500


class DataUnavailable(RuntimeError):
    """A package that ships the text is not installed (or lacks the file)."""


def data_path(file: str = DATA_FILE) -> Path:
    """Path of a data file of the gensim package (default: the Wikipedia sample)."""
    try:
        path = Path(metadata.distribution("gensim").locate_file(file))
    except metadata.PackageNotFoundError:
        raise DataUnavailable("the 'gensim' package (sample text) is not installed; "
                              "run: pip install --no-deps gensim==4.4.0") from None
    if not path.is_file():
        raise DataUnavailable(f"{path} is missing from the gensim package")
    return path


_PATTERNS = [
    (re.compile(r"<!--.*?-->", re.S), ""),
    (re.compile(r"<ref[^>/]*/>", re.S), ""),
    (re.compile(r"<ref.*?</ref>", re.S), ""),
    (re.compile(r"\{\|.*?\|\}", re.S), ""),                          # tables
    (re.compile(r"\[\[(?:File|Image|Category|[a-z]{2,3}(?:-[a-z]+)?):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", re.S), ""),
    (re.compile(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]"), r"\1"),          # [[a|b]] -> b
    (re.compile(r"\[https?://[^\s\]]+ ?([^\]]*)\]"), r"\1"),          # [url text] -> text
    (re.compile(r"'{2,}"), ""),
    (re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M), r"\1"),
    (re.compile(r"<[^>]+>"), ""),
    (re.compile(r"&nbsp;"), " "),
    (re.compile(r"^[*#:;]+\s*", re.M), ""),
    (re.compile(r"\n{3,}"), "\n\n"),
]


def _strip_templates(text: str) -> str:
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith("{{", i):
            depth, i = depth + 1, i + 2
        elif text.startswith("}}", i) and depth:
            depth, i = depth - 1, i + 2
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


def clean_wikitext(text: str) -> str:
    text = _strip_templates(text)
    for pat, rep in _PATTERNS:
        text = pat.sub(rep, text)
    return text.strip()


@functools.lru_cache(maxsize=1)
def articles() -> tuple[tuple[str, str], ...]:
    """(title, plain text) of every main-namespace, non-redirect article of useful length."""
    out = []
    with bz2.open(data_path()) as fh:
        for _, el in ET.iterparse(fh):
            if not el.tag.endswith("}page"):
                continue
            ns = el.find("{*}ns")
            title = el.findtext("{*}title") or ""
            text = el.findtext("{*}revision/{*}text") or ""
            el.clear()
            if (ns is not None and ns.text != "0") or text.lstrip().upper().startswith("#REDIRECT"):
                continue
            body = clean_wikitext(text)
            if len(body) >= MIN_CHARS:
                out.append((title, body))
    return tuple(out)


def is_eval_article(title: str) -> bool:
    return int(hashlib.sha1(title.encode()).hexdigest(), 16) % 3 == 0


def split() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(calibration articles, evaluation articles), disjoint by article."""
    arts = articles()
    return ([a for a in arts if not is_eval_article(a[0])], [a for a in arts if is_eval_article(a[0])])


@functools.lru_cache(maxsize=1)
def news_articles() -> tuple[str, ...]:
    """The Lee background corpus: one news article per line, duplicates dropped (first kept)."""
    lines = data_path(NEWS_FILE).read_text(encoding="utf-8").splitlines()
    return tuple(dict.fromkeys(s for s in (line.strip() for line in lines) if s))


@functools.lru_cache(maxsize=1)
def python_docs() -> tuple[str, ...]:
    """The Python language reference topics shipped with the interpreter, sorted by topic."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise DataUnavailable("this Python lacks pydoc_data (the Python reference "
                              "topics)") from None
    return tuple(topics[k].strip() for k in sorted(topics))


NEWSGROUP_HEADERS = ("From", "Subject", "Newsgroups", "Organization")


@functools.lru_cache(maxsize=1)
def newsgroup_posts() -> tuple[str, ...]:
    """The 200 Usenet posts of gensim's mini_newsgroup (a zlib-compressed protocol-0 pickle of
    a scikit-learn Bunch). The post texts are its unicode string constants, read with
    pickletools (nothing is unpickled); of the headers only NEWSGROUP_HEADERS are kept."""
    raw = zlib.decompress(data_path(NEWSGROUPS_FILE).read_bytes())
    out = []
    for op, arg, _ in pickletools.genops(raw):
        if op.name != "UNICODE" or "Subject:" not in arg:
            continue
        head, _, body = arg.partition("\n\n")
        keep = [h for h in head.split("\n") if h.split(":", 1)[0] in NEWSGROUP_HEADERS]
        out.append("\n".join(keep) + "\n\n" + body.strip())
    return tuple(out)


def _wiki(which: int) -> Callable[[], tuple[str, ...]]:
    return lambda: tuple(f"{title}\n\n{body}" for title, body in split()[which])


@dataclass(frozen=True)
class TextSet:
    role: str                                   # "calibration" or "evaluation"
    description: str                            # one line, for reports
    documents: Callable[[], tuple[str, ...]]    # the documents, in a fixed order


TEXTS: dict[str, TextSet] = {
    "calibration": TextSet("calibration", "Wikipedia (gensim sample), calibration articles",
                           _wiki(0)),
    "evaluation": TextSet("evaluation", "Wikipedia (gensim sample), held-out articles "
                          "(sha1(title) mod 3 == 0)", _wiki(1)),
    "news": TextSet("evaluation", "Australian news (ABC news-mail, 2000-01; gensim's Lee "
                    "background corpus)", news_articles),
    "python-docs": TextSet("calibration", "the Python language reference (pydoc_data.topics)",
                           python_docs),
    "newsgroups": TextSet("calibration", "Usenet posts of 1993 (gensim's mini_newsgroup: "
                          "alt.atheism, sci.space)", newsgroup_posts),
}
CALIBRATION_TEXTS = tuple(k for k, t in TEXTS.items() if t.role == "calibration")
EVALUATION_TEXTS = tuple(k for k, t in TEXTS.items() if t.role == "evaluation")
VARIED_TEXTS = ("python-docs", "newsgroups")

_STREAMS: dict[tuple[str, int, str], list[int]] = {}


def token_stream(tokenizer, which: str) -> list[int]:
    """All documents of one text set of TEXTS ('calibration', 'evaluation', 'news',
    'python-docs', 'newsgroups') tokenized and concatenated, each document preceded by BOS
    (when the tokenizer has one) and followed by EOS. Cached per tokenizer and text."""
    if which not in TEXTS:
        raise ValueError(f"unknown text {which!r} (one of {', '.join(TEXTS)})")
    key = (getattr(tokenizer, "name_or_path", ""), len(tokenizer), which)
    if key in _STREAMS:
        return _STREAMS[key]
    ids: list[int] = []
    for doc in TEXTS[which].documents():
        if tokenizer.bos_token_id is not None:
            ids.append(tokenizer.bos_token_id)
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    _STREAMS[key] = ids
    return ids
