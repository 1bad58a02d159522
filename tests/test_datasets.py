import importlib.util
import json

import pytest
import torch

from sagequant.calibration.datasets import (CalibrationDataError, as_token_batches, load_texts,
                                            tokenize_calibration)


class WordTokenizer:
    """One id per whitespace-separated word: int(word) for digits, else len(word)."""
    eos_token_id = 0

    def encode(self, text, add_special_tokens=True):
        return [int(w) if w.isdigit() else len(w) for w in text.split()]

    def __call__(self, text, **kwargs):
        return {"input_ids": self.encode(text, **kwargs)}


class NoEosTokenizer(WordTokenizer):
    eos_token_id = None


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


# ---- load_texts -------------------------------------------------------------------------------

def test_load_jsonl(tmp_path):
    lines = [json.dumps({"text": "first doc", "meta": {"pile_set_name": "x"}}), "",
             json.dumps({"text": "second\ndoc"}), json.dumps({"text": "   "})]
    assert load_texts(write(tmp_path / "d.jsonl", "\n".join(lines))) == ["first doc", "second\ndoc"]
    assert load_texts(write(tmp_path / "d.json", lines[0])) == ["first doc"]


def test_load_plain_paragraphs(tmp_path):
    text = "\n\npara one\ncontinues\n\n\n  \npara two\n\n"
    assert load_texts(write(tmp_path / "d.txt", text)) == ["para one\ncontinues", "para two"]


def test_load_plain_lines_without_blank_lines(tmp_path):
    assert load_texts(write(tmp_path / "d.cor", "one\ntwo\nthree\n")) == ["one", "two", "three"]


def test_load_missing_file(tmp_path):
    with pytest.raises(CalibrationDataError, match="not found.*nope.jsonl"):
        load_texts(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("name,text", [("e.jsonl", ""), ("e.txt", " \n\n \n"),
                                       ("e.jsonl", '{"text": ""}\n')])
def test_load_empty(tmp_path, name, text):
    with pytest.raises(CalibrationDataError, match="no usable text"):
        load_texts(write(tmp_path / name, text))


def test_load_invalid_json_names_line(tmp_path):
    path = write(tmp_path / "bad.jsonl", '{"text": "ok"}\n\n{"text": oops}\n')
    with pytest.raises(CalibrationDataError, match=r"bad\.jsonl:3: not valid JSON"):
        load_texts(path)


@pytest.mark.parametrize("record", ['{"content": "x"}', '{"text": 5}', '["text"]'])
def test_load_record_without_text(tmp_path, record):
    path = write(tmp_path / "bad.jsonl", '{"text": "ok"}\n' + record + "\n")
    with pytest.raises(CalibrationDataError, match=r"bad\.jsonl:2: .*'text'"):
        load_texts(path)


# ---- tokenize_calibration ---------------------------------------------------------------------

def test_windows_are_consecutive_with_eos_between_texts():
    texts = ["1 2 3", "4 5", "6 7 8 9"]  # stream: 1 2 3 0 4 5 0 6 7 8 9
    out = tokenize_calibration(texts, WordTokenizer(), num_samples=3, seq_len=3)
    assert out.dtype == torch.long
    assert out.tolist() == [[1, 2, 3], [0, 4, 5], [0, 6, 7]]


def test_windows_without_eos():
    out = tokenize_calibration(["1 2 3", "4 5"], NoEosTokenizer(), num_samples=5, seq_len=2)
    assert out.tolist() == [[1, 2], [3, 4]]  # short text: only the full windows


def test_windows_are_deterministic():
    texts = [" ".join(str(i) for i in range(1, 50))] * 3
    a = tokenize_calibration(texts, WordTokenizer(), 4, 16, seed=0)
    b = tokenize_calibration(texts, WordTokenizer(), 4, 16, seed=1)
    assert a.shape == (4, 16) and torch.equal(a, b)


def test_too_short_for_one_window():
    with pytest.raises(CalibrationDataError, match="has 5 tokens.*seq_len=8"):
        tokenize_calibration(["1 2 3", "4"], WordTokenizer(), num_samples=2, seq_len=8)


def test_no_texts():
    with pytest.raises(CalibrationDataError, match="empty"):
        tokenize_calibration([], WordTokenizer(), 1, 4)


# ---- as_token_batches -------------------------------------------------------------------------

def test_batches_from_strings():
    out = as_token_batches(["1 2 3 4 5"], WordTokenizer(), num_samples=8, seq_len=2)
    assert [b.tolist() for b in out] == [[[1, 2]], [[3, 4]]]


def test_batches_from_file(tmp_path):
    path = write(tmp_path / "d.jsonl", json.dumps({"text": "1 2 3 4 5 6"}))
    out = as_token_batches(str(path), WordTokenizer(), num_samples=2, seq_len=3)
    assert [b.tolist() for b in out] == [[[1, 2, 3]], [[4, 5, 6]]]
    assert as_token_batches(path, WordTokenizer(), num_samples=1, seq_len=3)[0].shape == (1, 3)


def test_batches_from_2d_tensor():
    data = torch.arange(12, dtype=torch.int32).view(3, 4)
    out = as_token_batches(data)
    assert len(out) == 3
    assert all(b.shape == (1, 4) and b.dtype == torch.long for b in out)
    assert torch.equal(torch.cat(out), data.long())


def test_batches_from_tensor_list():
    out = as_token_batches([torch.tensor([1, 2, 3]), torch.ones(2, 5, dtype=torch.long)])
    assert [tuple(b.shape) for b in out] == [(1, 3), (2, 5)]
    assert all(b.dtype == torch.long for b in out)


@pytest.mark.parametrize("data,match", [
    ([], "empty"),
    (["1 2 3"], "tokenizer is required"),
    (torch.rand(2, 4), "integers"),
    ([torch.tensor([1.0, 2.0])], "integers"),
    (torch.tensor([[1, -2, 3]]), "negative token id -2"),
    ([torch.tensor([1, 2]), "text"], "item 1"),
    ([torch.zeros(1, 2, 3, dtype=torch.long)], "item 0"),
    (torch.zeros(1, 2, 3, dtype=torch.long), "1-D or 2-D"),
    (42, "unsupported type int"),
])
def test_batches_errors(data, match):
    with pytest.raises(CalibrationDataError, match=match):
        as_token_batches(data)


def test_batches_from_file_needs_tokenizer(tmp_path):
    path = write(tmp_path / "d.txt", "some text")
    with pytest.raises(CalibrationDataError, match="tokenizer is required"):
        as_token_batches(path)


# ---- real text shipped in the gensim wheel ----------------------------------------------------

needs_gensim = pytest.mark.skipif(importlib.util.find_spec("gensim") is None,
                                  reason="pip install --no-deps gensim==4.4.0")


@needs_gensim
def test_wikipedia_prose_is_clean_and_large():
    from sagequant.calibration.real_data import wikipedia_prose

    articles = wikipedia_prose()
    # 206 pages, of which 100 are redirects.
    assert len(articles) > 100
    assert sum(map(len, articles)) > 1_500_000
    text = "\n".join(articles)
    for residue in ("{{", "}}", "[[", "]]", "<ref", "{|", "|}", "&nbsp;", "'''"):
        assert residue not in text, residue
    assert articles[0].startswith("Anarchism is a political philosophy")


@needs_gensim
def test_evaluation_text_is_the_lee_corpus():
    from sagequant.calibration.real_data import evaluation_text

    text = evaluation_text()
    lines = [line for line in text.splitlines() if line.strip()]
    # 300 articles; `wc -l` reports 299 because the last line has no trailing newline.
    assert text.count("\n") == 299 and len(lines) == 300
    assert lines[0].startswith("Hundreds of people have been forced to vacate their homes")


def test_strip_wiki_markup_nested_constructs():
    from sagequant.calibration.real_data import strip_wiki_markup

    filler = " Padding words keep this paragraph above the minimum length for prose."
    wikitext = (
        "{{Infobox|a={{nested|{{deeper}}}}|b=x}}\n"
        "== Heading ==\n"
        "'''Bold''' and ''italic'' [[Target page|label]] and [[Plain]]"
        "<ref name=\"a\">{{cite web|url=http://x}}</ref><ref name=\"b\"/><!-- note -->"
        " [http://example.com an external label] [http://bare.example]"
        "[[File:X.jpg|thumb|A [[nested]] caption]][[Category:Things]]."
        " 5&nbsp;km <span>kept</span> {| class=\"t\"\n| {{cell}} ||\n{|\n|inner\n|}\n|}" + filler
        + "\n\n* short bullet\n\n[[de:Anarchismus]]\n")
    assert strip_wiki_markup(wikitext) == (
        "Bold and italic label and Plain an external label . 5 km kept" + filler)
