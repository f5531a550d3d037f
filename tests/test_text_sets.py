"""The text sets (model_patches.text_sets): the held-out news text and the varied calibration
texts load from the installed packages, keep their roles (news is never calibration text),
and tokenize deterministically; the Wikipedia streams are unchanged by the registry."""

from __future__ import annotations

import pytest

from model_patches import text_sets as T


@pytest.fixture(scope="module")
def tok(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model_dir))


def test_roles():
    assert set(T.TEXTS) == {"calibration", "evaluation", "news", "python-docs", "newsgroups"}
    assert T.EVALUATION_TEXTS == ("evaluation", "news")
    assert set(T.VARIED_TEXTS) <= set(T.CALIBRATION_TEXTS)
    assert not set(T.CALIBRATION_TEXTS) & set(T.EVALUATION_TEXTS)


def test_news_loads():
    news = T.news_articles()
    assert len(news) == 293 and len(set(news)) == 293         # 300 lines, 7 duplicates dropped
    assert news[0].startswith("Hundreds of people have been forced to vacate their homes")
    assert all("\n" not in a and len(a) > 200 for a in news)
    assert T.TEXTS["news"].documents() == news


def test_varied_texts_load():
    docs = T.python_docs()
    assert len(docs) > 50 and "assert" in docs[0].split("\n")[0]          # sorted by topic
    assert any(">>> " in d for d in docs)                                   # code examples
    posts = T.newsgroup_posts()
    assert len(posts) == 200 and len(set(posts)) == 200
    for p in posts:
        head, _, body = p.partition("\n\n")
        assert "Subject: " in head and body
        assert {h.split(":")[0] for h in head.split("\n")} <= set(T.NEWSGROUP_HEADERS)


def _pieces(text: str, size: int = 80) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text) - size, len(text) // 3)]


def test_news_is_disjoint_from_all_calibration_text():
    calibration = "\n".join(d for name in T.CALIBRATION_TEXTS for d in T.TEXTS[name].documents())
    wiki_eval = "\n".join(T.TEXTS["evaluation"].documents())
    for article in T.news_articles():
        for piece in _pieces(article):
            assert piece not in calibration and piece not in wiki_eval, piece


def test_token_streams(tok):
    news = T.token_stream(tok, "news")
    want = []
    for a in T.news_articles():                 # BOS, the article, EOS: by hand
        want += [tok.bos_token_id, *tok(a, add_special_tokens=False)["input_ids"], tok.eos_token_id]
    assert news == want and len(news) > 60_000
    assert news.count(tok.bos_token_id) == 293
    T.news_articles.cache_clear()               # read the file again: the same text
    assert T.TEXTS["news"].documents() == T.news_articles() and T.token_stream(tok, "news") == news
    # the Wikipedia streams are the articles as before: "title\n\nbody" between BOS and EOS
    cal, ev = T.split()
    title, body = ev[0]
    first = [tok.bos_token_id, *tok(f"{title}\n\n{body}", add_special_tokens=False)["input_ids"],
             tok.eos_token_id]
    assert T.token_stream(tok, "evaluation")[:len(first)] == first
    assert T.token_stream(tok, "calibration").count(tok.bos_token_id) == len(cal)
    for name in T.VARIED_TEXTS:
        assert len(T.token_stream(tok, name)) > 50_000
    with pytest.raises(ValueError, match="unknown text"):
        T.token_stream(tok, "wiki")
