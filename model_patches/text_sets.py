"""Real English text for calibration and evaluation: the 103 Wikipedia articles shipped in
the `gensim` package (installed with --no-deps; only the data file is read).

Articles are split BY ARTICLE into a calibration set and an evaluation set (a fixed,
documented rule: sha1(title) mod 3 == 0 -> evaluation), so calibration never sees
evaluation text. Wiki markup is stripped to plain prose.
"""

from __future__ import annotations

import bz2
import functools
import hashlib
import re
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path

DATA_FILE = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
MIN_CHARS = 1500


class DataUnavailable(RuntimeError):
    """The gensim data package is not installed."""


def data_path() -> Path:
    try:
        path = Path(metadata.distribution("gensim").locate_file(DATA_FILE))
    except metadata.PackageNotFoundError:
        raise DataUnavailable("the 'gensim' package (Wikipedia sample text) is not installed; "
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


_STREAMS: dict[tuple[str, int, str], list[int]] = {}


def token_stream(tokenizer, which: str) -> list[int]:
    """All articles of one split ('calibration' or 'evaluation') tokenized and concatenated,
    each article preceded by BOS (when the tokenizer has one) and separated by EOS."""
    key = (getattr(tokenizer, "name_or_path", ""), len(tokenizer), which)
    if key in _STREAMS:
        return _STREAMS[key]
    cal, ev = split()
    arts = cal if which == "calibration" else ev
    ids: list[int] = []
    for title, body in arts:
        if tokenizer.bos_token_id is not None:
            ids.append(tokenizer.bos_token_id)
        ids.extend(tokenizer(f"{title}\n\n{body}", add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    _STREAMS[key] = ids
    return ids
