"""Calibration files, token windows and data-free samples, on real files and a tiny real model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from models import build_model, build_tokenizer
from workbench.quantization.calibration import (
    PREVIEW_CHARACTERS,
    TOP_P,
    _sample_top_p,
    preview,
    read_texts,
    self_written_samples,
    token_samples,
)
from workbench.errors import JobCancelled, WorkbenchError


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def model_and_tokenizer(tmp_path_factory):
    path = build_model(tmp_path_factory.mktemp("model"))
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8", newline="")
    return path


def jsonl(*records: object) -> str:
    return "\n".join(json.dumps(r) for r in records) + "\n"


# Reading files


def test_txt_paragraphs_split_on_blank_lines(tmp_path):
    path = write(tmp_path / "a.txt", "First paragraph\nstill first.\n\n\n  Second.  \r\n\r\nThird\n   \nFourth\n\n")
    assert read_texts(path) == ["First paragraph\nstill first.", "Second.", "Third", "Fourth"]


def test_txt_accepts_utf8_bom_and_non_ascii(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffCafé crème\n\nnaïve – ok".encode())
    assert read_texts(path) == ["Café crème", "naïve – ok"]


def test_jsonl_takes_text_prompt_and_messages(tmp_path):
    path = write(
        tmp_path / "a.jsonl",
        jsonl(
            {"text": "plain text", "id": 1},
            {"prompt": "Question?", "completion": "Answer."},
            {"prompt": "Ask", "response": "Reply"},
            {"prompt": "Only a prompt"},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "parts"}]}]},
        )
        + "\n   \n"
        + json.dumps({"text": "after blank lines"}),
    )
    assert read_texts(path) == [
        "plain text",
        "Question?\nAnswer.",
        "Ask\nReply",
        "Only a prompt",
        "Hi\nHello",
        "parts",
        "after blank lines",
    ]


def test_jsonl_keeps_line_separator_characters_inside_strings(tmp_path):
    path = write(tmp_path / "a.jsonl", '{"text": "one\u2028two"}\n')
    assert read_texts(path) == ["one\u2028two"]


def test_csv_text_column_any_case(tmp_path):
    path = write(tmp_path / "a.csv", 'id,Text,label\n1,"Hello, world",pos\n2,"He said ""hi""\nthen left",neg\n3,,pos\n')
    assert read_texts(path) == ["Hello, world", 'He said "hi"\nthen left']


def test_csv_sniffs_semicolons_and_uses_the_only_text_column(tmp_path):
    path = write(tmp_path / "a.csv", "id;score;sentence\n1;0.5;The first sentence.\n2;0.7;The second one.\n")
    assert read_texts(path) == ["The first sentence.", "The second one."]


def test_csv_single_column_with_commas_inside_quotes_and_blank_lines(tmp_path):
    path = write(tmp_path / "a.csv", '\ncontent\n"Hello, world, again"\n\n"Bye"\n')
    assert read_texts(path) == ["Hello, world, again", "Bye"]


def test_json_list_of_strings_and_objects(tmp_path):
    strings = write(tmp_path / "s.json", json.dumps(["one", " ", "two"]))
    objects = write(tmp_path / "o.json", json.dumps([{"text": "a"}, {"prompt": "b", "response": "c"}]))
    wrapped = write(tmp_path / "w.json", json.dumps({"version": 1, "samples": ["x", {"text": "y"}]}))
    assert read_texts(strings) == ["one", "two"]
    assert read_texts(objects) == ["a", "b\nc"]
    assert read_texts(wrapped) == ["x", "y"]


def test_extension_is_case_insensitive(tmp_path):
    assert read_texts(write(tmp_path / "A.TXT", "hello")) == ["hello"]


# Bad input


def error_for(path: Path) -> str:
    with pytest.raises(WorkbenchError) as caught:
        read_texts(path)
    return str(caught.value)


def test_missing_file(tmp_path):
    assert "not found" in error_for(tmp_path / "nope.txt")


def test_folder_instead_of_file(tmp_path):
    assert "folder" in error_for(tmp_path)


def test_unsupported_extension_lists_supported_ones(tmp_path):
    message = error_for(write(tmp_path / "a.parquet", "text"))
    assert all(ext in message for ext in (".txt", ".jsonl", ".csv", ".json"))


def test_empty_file(tmp_path):
    assert "empty" in error_for(write(tmp_path / "a.txt", ""))
    assert "empty" in error_for(write(tmp_path / "b.txt", "\n \n\t\n"))


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("header_only.csv", "id,text\n"),
        ("empty_texts.jsonl", jsonl({"text": ""}, {"text": "  "})),
        ("empty_list.json", "[]"),
    ],
)
def test_no_text_found(tmp_path, name, content):
    assert "No text found" in error_for(write(tmp_path / name, content))


def test_binary_file_with_nul_bytes(tmp_path):
    # Mostly readable, like a database or pickle with string tables: the NUL bytes give it away.
    path = tmp_path / "model.txt"
    path.write_bytes(b"readable table of names " * 100 + b"\x00\x00\x00\x08payload")
    assert "binary" in error_for(path)


def test_binary_file_without_nul_bytes(tmp_path):
    path = tmp_path / "noise.csv"
    path.write_bytes(bytes(b for b in np.random.default_rng(0).integers(1, 256, 4000, dtype=np.uint8)))
    assert "binary" in error_for(path)


def test_utf16_file_says_to_save_as_utf8(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes("hello\n\nworld".encode("utf-16"))
    message = error_for(path)
    assert "binary" in message and "UTF-16" in message and "UTF-8" in message


def test_latin1_file_names_the_byte_offset(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes("line one\nCaf\xe9 au lait".encode("latin-1"))
    message = error_for(path)
    assert "UTF-8" in message and "offset 12" in message and "line 2" in message and "0xe9" in message


def test_utf8_offset_counts_the_bom(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"\xef\xbb\xbfab\xff")
    assert "offset 5" in error_for(path)


def test_jsonl_invalid_json_names_the_line(tmp_path):
    path = write(tmp_path / "a.jsonl", jsonl({"text": "ok"}) + "\n" + '{"text": "unterminated\n')
    message = error_for(path)
    assert "line 3" in message and "not valid JSON" in message and '"text"' in message


def test_jsonl_missing_keys_names_the_line_and_keys(tmp_path):
    path = write(tmp_path / "a.jsonl", jsonl({"text": "ok"}, {"question": "q", "answer": "a"}))
    message = error_for(path)
    assert "line 2" in message and "'question'" in message and '"prompt"' in message


def test_jsonl_line_that_is_not_an_object(tmp_path):
    assert "line 1" in error_for(write(tmp_path / "a.jsonl", '"just a string"\n'))


def test_csv_without_a_clear_text_column_lists_columns(tmp_path):
    path = write(tmp_path / "a.csv", "question,answer\nWhy?,Because.\n")
    message = error_for(path)
    assert "'question', 'answer'" in message and '"text"' in message


def test_csv_unclosed_quote_names_the_line(tmp_path):
    # An unclosed quote swallows the rest of the file into one field, past the csv module's limit.
    path = write(tmp_path / "a.csv", 'text\n"ok"\n"unclosed\n' + "more words, " * 20000 + "\n")
    message = error_for(path)
    assert "line 3" in message and "quotes" in message


def test_json_invalid_names_line_and_column(tmp_path):
    message = error_for(write(tmp_path / "a.json", '[\n  "a",\n  "b"\n  "c"\n]'))
    assert "line 4" in message and "column 3" in message


def test_json_object_without_a_list(tmp_path):
    message = error_for(write(tmp_path / "a.json", json.dumps({"rows": ["a"]})))
    assert "'rows'" in message and "'samples'" in message


def test_json_bad_item_is_named(tmp_path):
    assert "item 2" in error_for(write(tmp_path / "a.json", json.dumps(["ok", 42])))


# Preview


def test_preview_counts_and_cuts(tmp_path, tokenizer):
    long = "word " * 100
    path = write(tmp_path / "a.txt", f"{long}\n\nshort one\n\nthird\n\nfourth")
    result = preview(path, tokenizer)
    assert (result.format, result.samples, result.path) == ("txt", 4, path)
    assert result.characters == len(long.strip()) + len("short one") + len("third") + len("fourth")
    assert result.first_samples[1:] == ("short one", "third")
    assert result.first_samples[0].endswith("…") and len(result.first_samples[0]) <= PREVIEW_CHARACTERS + 1
    expected_tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in read_texts(path))
    assert result.tokens == expected_tokens > 0


def test_preview_without_tokenizer(tmp_path):
    result = preview(write(tmp_path / "a.jsonl", jsonl({"text": "x"})))
    assert result.tokens is None and result.format == "jsonl" and result.first_samples == ("x",)


# Token windows


def test_token_samples_joins_with_eos_and_cuts_windows(tokenizer):
    texts = ["The quick brown fox jumps over the lazy dog."] * 3
    ids = tokenizer(texts[0], add_special_tokens=False)["input_ids"]
    stream = ids + [tokenizer.eos_token_id] + ids + [tokenizer.eos_token_id] + ids
    windows = token_samples(texts, tokenizer, n_samples=10, seq_len=8)
    assert windows.dtype == np.int64
    assert windows.shape == (len(stream) // 8, 8)
    assert windows.ravel().tolist() == stream[: windows.size]


def test_token_samples_spreads_windows_over_the_text(tokenizer):
    # Each text is one token id repeated, so a window tells where in the text it came from.
    texts = [f"{digit}" * 64 for digit in "0123456789"]
    all_windows = token_samples(texts, tokenizer, n_samples=1000, seq_len=4)
    chosen = token_samples(texts, tokenizer, n_samples=5, seq_len=4)
    assert chosen.shape == (5, 4)
    rows = [int(np.flatnonzero((all_windows == row).all(axis=1))[0]) for row in chosen]
    assert rows[0] == 0 and rows[-1] >= len(all_windows) * 3 // 4
    assert rows == sorted(rows) and len(set(rows)) == 5


def test_token_samples_not_enough_tokens(tokenizer):
    found = len(tokenizer("short", add_special_tokens=False)["input_ids"])
    with pytest.raises(WorkbenchError) as caught:
        token_samples(["short"], tokenizer, n_samples=4, seq_len=256)
    assert f"has {found} tokens" in str(caught.value) and "needs 256" in str(caught.value)


def test_token_samples_rejects_zero_sizes(tokenizer):
    with pytest.raises(WorkbenchError):
        token_samples(["text"], tokenizer, n_samples=0, seq_len=4)


# Data-free samples


def test_top_p_sampling_follows_the_nucleus():
    # Tokens 0 and 2 have 0.96 >= TOP_P of more likely rivals, so they are out; 1 and 3 keep 0.6 : 0.36.
    probs = torch.tensor([0.03, 0.6, 0.01, 0.36])
    assert probs[1] + probs[3] >= TOP_P > probs[1]
    drawn = _sample_top_p(probs.log().expand(20000, 4), torch.Generator().manual_seed(0))
    counts = torch.bincount(drawn, minlength=4)
    assert counts[0] == counts[2] == 0
    assert abs(counts[1] / 20000 - 0.6 / 0.96) < 0.015


def test_top_p_sampling_keeps_a_sure_token():
    logits = torch.full((3, 50), -30.0)
    logits[:, 7] = 30.0
    assert _sample_top_p(logits, torch.Generator().manual_seed(0)).tolist() == [7, 7, 7]


def test_self_written_samples_shape_start_and_progress(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    reports = []
    samples = self_written_samples(model, tokenizer, 4, 24, seed=1, progress=lambda f, m: reports.append(f))
    assert samples.shape == (4, 24) and samples.dtype == np.int64
    assert (samples[:, 0] == tokenizer.bos_token_id).all()
    assert not np.isin(samples[:, 1], tokenizer.all_special_ids).any()
    assert len(set(samples[:, 1].tolist())) > 1
    assert ((samples >= 0) & (samples < len(tokenizer))).all()
    assert reports == sorted(reports) and reports[-1] == 1.0 and len(reports) >= 20


def test_self_written_samples_follow_the_model(model_and_tokenizer):
    # Tokens sampled from the model are far likelier under it than uniform random tokens.
    model, tokenizer = model_and_tokenizer
    samples = torch.from_numpy(self_written_samples(model, tokenizer, 4, 32, seed=0))
    random = samples.clone()
    random[:, 2:] = torch.randint(3, len(tokenizer), (4, 30), generator=torch.Generator().manual_seed(0))

    def mean_log_likelihood(tokens):
        with torch.no_grad():
            logits = model(input_ids=tokens).logits[:, 1:-1]
        return torch.log_softmax(logits, -1).gather(-1, tokens[:, 2:, None]).mean().item()

    assert mean_log_likelihood(samples) > mean_log_likelihood(random) + 1.0


def test_self_written_samples_deterministic_per_seed(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    first = self_written_samples(model, tokenizer, 3, 16, seed=7)
    again = self_written_samples(model, tokenizer, 3, 16, seed=7)
    other = self_written_samples(model, tokenizer, 3, 16, seed=8)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_self_written_samples_cancel(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    calls = []

    def cancelled():
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(JobCancelled):
        self_written_samples(model, tokenizer, 2, 64, cancelled=cancelled)
    assert len(calls) == 4


def test_self_written_samples_restores_training_mode(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    model.train()
    try:
        self_written_samples(model, tokenizer, 1, 4)
        assert model.training
    finally:
        model.eval()


def test_self_written_samples_refuses_longer_than_the_model(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(WorkbenchError) as caught:
        self_written_samples(model, tokenizer, 1, model.config.max_position_embeddings + 1)
    assert str(model.config.max_position_embeddings) in str(caught.value)
