"""The tokenizer family of the components harness: the metrics against counts made by hand, the samples file, the
tables (every language, every available tokenizer, a reason for each missing one), and the quick run end to end
with its plot, offline."""
import re

import matplotlib.image
import pytest

import bpe
import hub
from components import compare, tokenizers
from components.plots import tokenizer_figure
from conftest import shared_file
from errors import BadInput

LANGUAGES = ["English", "German", "French", "Spanish", "Russian", "Chinese", "Japanese", "Korean", "Arabic", "Hindi",
             "Python code"]


class Fixed:
    """A tokenizer with known splits: each word and each space is one token."""
    vocab_size = 99

    def encode(self, text, allowed_special="none_raise"):
        return [0 for _ in re.findall(r"\S+|\s", text)]


def test_metrics_by_hand():
    # "héllo wörld": 11 characters, 13 UTF-8 bytes (é and ö take 2), 2 words; bytes-only BPE: a token per byte
    m = tokenizers.metrics("héllo wörld", 13, "spaces")
    assert (m["chars"], m["bytes"], m["words"]) == (11, 13, 2)
    assert m["tokens_per_char"] == pytest.approx(13 / 11) and m["tokens_per_word"] == 6.5
    assert m["bytes_per_token"] == 1.0
    assert len(bpe.train("", 256, pattern=None).encode("héllo wörld")) == 13
    # Chinese: a word is a letter or digit; the full-width comma and stop are not; 3 tokens of 4 words
    m = tokenizers.metrics("我们，好。1", 3, "characters")
    assert m["words"] == 4 and m["tokens_per_word"] == 0.75 and m["bytes_per_token"] == pytest.approx(16 / 3)
    assert tokenizers.count_words("빵집 주인은  문을\n엽니다", "spaces") == 4
    with pytest.raises(ValueError, match="word rule"):
        tokenizers.count_words("x", "syllables")


def test_samples_cover_every_language():
    samples = tokenizers.load_samples()
    assert [s["name"] for s in samples] == LANGUAGES
    assert {s["name"] for s in samples if s["words"] == "characters"} == {"Chinese", "Japanese"}
    assert all(tokenizers.count_words(s["text"], s["words"]) >= 40 for s in samples)   # a few sentences each


def test_tables_have_every_language_and_tokenizer_and_a_reason_for_the_missing():
    gpt2 = bpe.load(shared_file("gpt2", "encoder.json").parent)
    toks = {"GPT-2": (gpt2, "gpt2 dir", None), "fixed": (Fixed(), "test", None),
            "Gated": (None, "owner/gated", "owner/gated@main: a gated repo; request access on its hub page")}
    rows = tokenizers.measure(toks, tokenizers.load_samples())
    english = next(r for r in rows if r["tokenizer"] == "fixed" and r["sample"] == "English")
    assert english["tokens"] == 2 * english["words"] - 1   # words and the single spaces between them
    assert english["bytes_per_token"] == pytest.approx(english["bytes"] / english["tokens"])
    lines = tokenizers.tables(rows)
    reason = "unavailable: owner/gated@main: a gated repo; request access on its hub page"
    assert f"| Gated | owner/gated | {reason} |" in lines
    headers = [line for line in lines if line.startswith("| sample |")]
    assert len(headers) == 3 and all(line == "| sample | words | GPT-2 | fixed |" for line in headers)
    for language in LANGUAGES:
        assert sum(line.startswith(f"| {language} |") for line in lines) == 3
    gpt2_english = next(r for r in rows if r["tokenizer"] == "GPT-2" and r["sample"] == "English")
    assert gpt2_english["tokens"] == len(gpt2.to_tiktoken().encode_ordinary(tokenizers.load_samples()[0]["text"]))
    assert f"{gpt2_english['bytes_per_token']:.2f}" in next(line for line in lines if line.startswith("| English"))


def test_unavailable_tokenizer_is_a_reason(tmp_path, monkeypatch):
    def gated(repo_id, **kwargs):
        raise hub.HubError(f"{repo_id}@main: a gated repo; log in")
    monkeypatch.setattr(hub, "download", gated)
    tok, reason = tokenizers.load_official("meta-llama/Llama-3.2-1B")
    assert tok is None and "a gated repo" in reason and "meta-llama/Llama-3.2-1B" in reason
    tok, reason = tokenizers.load_official(str(tmp_path / "missing") + "/")
    assert tok is None and "no such directory" in reason


def test_quick_run_writes_the_table_and_the_plot(tmp_path, monkeypatch, capsys):
    def offline(repo_id, **kwargs):
        raise hub.HubError(f"{repo_id}@main: no network, and the hub cache lacks its files")
    monkeypatch.setattr(hub, "download", offline)
    monkeypatch.setitem(compare.TOKENIZER_SETTINGS, True, dict(corpus_bytes=60_000, vocab_size=400))
    monkeypatch.setattr(tokenizers, "SHAKESPEARE", tmp_path / "absent.txt")   # the same corpus on every machine
    gpt2_dir = shared_file("gpt2", "encoder.json").parent
    compare.main(["tokenizer", "--quick", "--out", str(tmp_path), "--tokenizer_dir", f"GPT-2={gpt2_dir}"])
    report = (tmp_path / "tokenizer.md").read_text()
    table, out = [line for line in report.splitlines() if line.startswith("|")], capsys.readouterr().out
    assert table and all(line in out for line in table)   # printed, and written
    assert "![tokenizer_bytes_per_token.png](tokenizer_bytes_per_token.png)" in report
    for name in ("GPT-2", "bpe.py BPE 400", "SentencePiece unigram 400", "SentencePiece BPE 400"):
        assert f"| {name} |" in report.split("**")[0] and name in report.split("**")[2]
    for name in ("Llama 3", "Qwen 3", "DeepSeek-V3"):
        assert f"| {name} | {tokenizers.OFFICIAL[name]} | unavailable: " in report
    assert all(f"| {language} |" in report for language in LANGUAGES)
    image = matplotlib.image.imread(tmp_path / "tokenizer_bytes_per_token.png")
    assert image.shape[0] > 300 and image.shape[1] > 600


def test_plot_title_names_the_extremes():
    rows = [dict(tokenizer=t, sample=s, bytes_per_token=v) for t, s, v in
            [("a", "English", 4.0), ("a", "Hindi", 2.0), ("b", "English", 1.0), ("b", "Hindi", 1.0)]]
    title = tokenizer_figure(rows + [dict(tokenizer="c", reason="offline")]).axes[0].get_title()
    assert "most on average: a (3.00 bytes per token); least: b (1.00)" in title


def test_bad_tokenizer_dir_flag():
    with pytest.raises(BadInput, match="--tokenizer_dir GPT-2: expected NAME=DIR"):
        compare.main(["tokenizer", "--tokenizer_dir", "GPT-2"])
    with pytest.raises(BadInput, match="--tokenizer_dir is for the tokenizer family"):
        compare.main(["ffn", "--tokenizer_dir", "GPT-2=x"])
