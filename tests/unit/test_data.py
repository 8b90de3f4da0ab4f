"""Data pipeline: tokenizers, JSONL -> indexed-dataset preprocessing, GPT dataset building."""

import collections
import functools
import inspect
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
import torch

from megatron_mm.data.gpt_data import build_gpt_datasets, parse_blend
from megatron_mm.data.preprocess import preprocess_jsonl
from megatron_mm.data.tokenizer import build_tokenizer, train_sentencepiece
from megatron_mm.errors import UserError

REPO = Path(__file__).resolve().parents[2]
NON_ASCII_TEXTS = ["héllo wörld, naïve café ✓", "日本語のテキストと emoji 🙂 mixed in.", "Ελληνικά και русский текст."]


def write_jsonl(path: Path, texts: list[str], key: str = "text") -> Path:
    lines = [json.dumps({key: text}, ensure_ascii=False) + "\n" for text in texts]
    path.write_text("".join(lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """Real English (standard-library docstrings) plus a few non-ASCII documents, in a fixed order."""
    docs = []
    for module in (collections, functools, itertools, json, inspect, os.path):
        for name in sorted(dir(module)):
            doc = inspect.getdoc(getattr(module, name))
            if doc and len(doc) > 40 and doc not in docs:
                docs.append(doc)
    return docs[:200] + NON_ASCII_TEXTS


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def corpus(workdir, texts) -> Path:
    return write_jsonl(workdir / "corpus.jsonl", texts)


@pytest.fixture(scope="module")
def sentencepiece_model(workdir, corpus) -> str:
    return train_sentencepiece(str(corpus), "text", 400, str(workdir / "sp" / "tokenizer"))


@pytest.fixture(scope="module")
def tokenizer_json(workdir, texts) -> str:
    """A tiny byte-level BPE trained with the tokenizers library; its EOS is found by name."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    (workdir / "hf").mkdir(exist_ok=True)
    path = workdir / "hf" / "tokenizer.json"
    tokenizer.save(str(path))
    return str(path)


def read_documents(prefix: str) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    assert dataset.index.dtype == numpy.uint16  # vocab < 65500: Megatron-LM's smallest dtype
    assert list(dataset.document_indices) == list(range(len(dataset) + 1))  # one sequence per document
    return [dataset[i].tolist() for i in range(len(dataset))]


# --- tokenizers ---------------------------------------------------------------------------------


def test_sentencepiece_round_trip(sentencepiece_model):
    tokenizer = build_tokenizer("sentencepiece", sentencepiece_model)
    assert (tokenizer.vocab_size, tokenizer.eod, tokenizer.pad) == (400, 2, 2)
    for text in NON_ASCII_TEXTS:  # byte fallback: characters outside the vocabulary survive
        assert tokenizer.detokenize(tokenizer.tokenize(text)) == text


def test_huggingface_file_and_directory_agree(tokenizer_json, workdir, texts):
    from transformers import PreTrainedTokenizerFast

    from_file = build_tokenizer("huggingface", tokenizer_json)
    assert (from_file.vocab_size, from_file.eod, from_file.pad) == (400, 0, 1)
    directory = workdir / "hf_dir"
    PreTrainedTokenizerFast(tokenizer_file=tokenizer_json, eos_token="<|endoftext|>").save_pretrained(directory)
    from_directory = build_tokenizer("huggingface", str(directory))
    assert (from_directory.vocab_size, from_directory.eod, from_directory.pad) == (400, 0, 1)
    for text in texts[:20] + NON_ASCII_TEXTS:
        assert from_directory.tokenize(text) == from_file.tokenize(text)
        assert from_file.detokenize(from_file.tokenize(text)) == text


def test_build_tokenizer_errors(tmp_path):
    with pytest.raises(UserError, match="sentencepiece, huggingface"):
        build_tokenizer("gpt2bpe", "x")
    with pytest.raises(UserError, match="missing.model"):
        build_tokenizer("sentencepiece", str(tmp_path / "missing.model"))


# --- preprocessing --------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("tokenizer_type", ["sentencepiece", "huggingface"])
def test_preprocess_matches_tokenizer(tokenizer_type, workers, corpus, texts, sentencepiece_model, tokenizer_json,
                                      tmp_path):
    model = sentencepiece_model if tokenizer_type == "sentencepiece" else tokenizer_json
    tokenizer = build_tokenizer(tokenizer_type, model)
    # Small chunks so that several chunks are in flight across the workers.
    summary = preprocess_jsonl(str(corpus), ["text"], tokenizer_type, model, str(tmp_path / "out"),
                               workers=workers, append_eod=True, lines_per_chunk=16, progress=False)
    expected = [tokenizer.tokenize(text) + [tokenizer.eod] for text in texts]
    assert read_documents(summary["outputs"]["text"]) == expected
    assert summary["docs"] == len(texts) and summary["skipped"] == {}
    assert summary["tokens"] == sum(map(len, expected))
    assert summary["bytes"] == corpus.stat().st_size


BAD_LINES = {
    "malformed_json": [b'{"text": "unterminated', b"not json at all", b'{"text": "a",}'],
    "not_an_object": [b'["a list"]', b'"a string"'],
    "missing_key": [b'{"other": "text under another key"}'],
    "not_a_string": [b'{"text": 5}', b'{"text": null}', b'{"text": ["a", "b"]}'],
    "empty_document": [b'{"text": ""}', b'{"text": "   \\n\\t  "}'],
    "invalid_utf8": [b'{"text": "bad \xff\xfe bytes"}', b'{"text": "lone surrogate \\ud800"}'],
    "blank_line": [b"", b"   "],
}


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_lines_are_counted_and_skipped(workers, sentencepiece_model, tmp_path):
    good = ["First good document.", "Second — with a dash.", "Third one."]
    good_lines = [json.dumps({"text": text}, ensure_ascii=False).encode() for text in good]
    bad_lines = [line for lines in BAD_LINES.values() for line in lines]
    # Good documents at the start, middle and end, bad lines around them.
    lines = [good_lines[0], *bad_lines[:8], good_lines[1], *bad_lines[8:], good_lines[2]]
    corpus = tmp_path / "bad.jsonl"
    corpus.write_bytes(b"\n".join(lines))  # no final newline: the last line still counts

    summary = preprocess_jsonl(str(corpus), ["text"], "sentencepiece", sentencepiece_model, str(tmp_path / "out"),
                               workers=workers, lines_per_chunk=4, progress=False)
    assert summary["skipped"] == {reason: len(lines) for reason, lines in BAD_LINES.items()}
    assert summary["docs"] == 3 and summary["lines"] == len(lines)
    tokenizer = build_tokenizer("sentencepiece", sentencepiece_model)
    assert read_documents(summary["outputs"]["text"]) == [tokenizer.tokenize(text) for text in good]


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/preprocess_data.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_cli_writes_dataset(corpus, texts, sentencepiece_model, tmp_path):
    out = tmp_path / "cli" / "corpus"
    result = run_tool("--input", str(corpus), "--json-keys", "text", "--tokenizer-type", "sentencepiece",
                      "--tokenizer-model", sentencepiece_model, "--output-prefix", str(out), "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert f"docs written: {len(texts)}" in result.stdout
    tokenizer = build_tokenizer("sentencepiece", sentencepiece_model)
    assert read_documents(f"{out}_text_document") == [tokenizer.tokenize(text) for text in texts]  # no EOD


def test_cli_missing_files_fail_with_one_line(corpus, sentencepiece_model, tmp_path):
    common = ["--json-keys", "text", "--tokenizer-type", "sentencepiece", "--output-prefix", str(tmp_path / "o")]
    for args, missing in [
        (["--input", str(tmp_path / "nope.jsonl"), "--tokenizer-model", sentencepiece_model], "nope.jsonl"),
        (["--input", str(corpus), "--tokenizer-model", str(tmp_path / "nope.model")], "nope.model"),
    ]:
        result = run_tool(*args, *common)
        assert result.returncode != 0
        assert len(result.stderr.strip().splitlines()) == 1 and missing in result.stderr
        assert "not found" in result.stderr
    assert not list(tmp_path.glob("o_*"))


# --- GPT datasets ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_prefixes(workdir, texts, sentencepiece_model) -> tuple[str, str]:
    prefixes = []
    for name, part in (("a", texts[: len(texts) // 2]), ("b", texts[len(texts) // 2 :])):
        corpus = write_jsonl(workdir / f"{name}.jsonl", part)
        summary = preprocess_jsonl(str(corpus), ["text"], "sentencepiece", sentencepiece_model,
                                   str(workdir / "gpt" / name), append_eod=True, progress=False)
        prefixes.append(summary["outputs"]["text"])
    return prefixes[0], prefixes[1]


def assert_next_token_labels(dataset, seq_length):
    for i in range(min(len(dataset), 8)):
        sample = dataset[i]
        assert sample["tokens"].shape == sample["labels"].shape == (seq_length,)
        assert torch.equal(sample["labels"][:-1], sample["tokens"][1:])


def test_gpt_samples_are_windows_of_the_indexed_data(two_prefixes, sentencepiece_model, tmp_path):
    """A single-prefix build: each sample is seq_length+1 consecutive tokens of the shuffled documents."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tokenizer = build_tokenizer("sentencepiece", sentencepiece_model)
    seq_length = 32
    train, valid, test = build_gpt_datasets([two_prefixes[0]], "80,20,0", seq_length, 1234, (50, 5, 0), tokenizer,
                                            cache_dir=str(tmp_path / "cache"))
    assert test is None and len(train) >= 50 and len(valid) > 0
    assert_next_token_labels(train, seq_length)

    raw = IndexedDataset(two_prefixes[0])
    stream = numpy.concatenate([raw[int(doc)] for doc in train.document_index])
    starts = numpy.cumsum([0] + [len(raw[int(doc)]) for doc in train.document_index])
    for i in range(3):
        doc_position, offset = train.sample_index[train.shuffle_index[i]]
        begin = starts[doc_position] + offset
        sample = train[i]
        assert sample["tokens"].tolist() == stream[begin : begin + seq_length].tolist()
        assert sample["labels"].tolist() == stream[begin + 1 : begin + seq_length + 1].tolist()
    # Train documents come only from the first 80% of the documents.
    assert max(train.document_index) < int(round(0.8 * len(raw)))


def test_gpt_blend_follows_weights(two_prefixes, sentencepiece_model, tmp_path):
    tokenizer = build_tokenizer("sentencepiece", sentencepiece_model)
    blend = ["0.7", two_prefixes[0], "0.3", two_prefixes[1]]
    train, valid, _ = build_gpt_datasets(blend, "90,10,0", 16, 7, (100, 10, 0), tokenizer,
                                         cache_dir=str(tmp_path / "cache"))
    assert len(train) >= 100 and len(valid) > 0
    assert_next_token_labels(train, 16)
    assert_next_token_labels(valid, 16)
    share_of_first = numpy.mean(train.dataset_index[:100] == 0)
    assert abs(share_of_first - 0.7) <= 0.02


def test_gpt_build_under_torch_distributed(two_prefixes, sentencepiece_model, tmp_path):
    """Initialized torch.distributed (one gloo rank): same samples as without it."""
    import torch.distributed as dist

    tokenizer = build_tokenizer("sentencepiece", sentencepiece_model)
    args = (["0.5", two_prefixes[0], "0.5", two_prefixes[1]], "90,10,0", 16, 3, (20, 4, 0), tokenizer)
    expected = build_gpt_datasets(*args)[0]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        train = build_gpt_datasets(*args, cache_dir=str(tmp_path / "cache"))[0]
    finally:
        dist.destroy_process_group()
    assert all(torch.equal(train[i]["tokens"], expected[i]["tokens"]) for i in range(len(expected)))


def test_gpt_mock_data_needs_no_files():
    train, valid, test = build_gpt_datasets(None, "98,1,1", 16, 1, (10, 2, 0), None, mock=True, vocab_size=100)
    assert len(train) >= 10 and valid is not None
    assert_next_token_labels(train, 16)
    assert int(train[0]["tokens"].max()) < 100


def test_gpt_missing_prefix_is_named(sentencepiece_model, tmp_path):
    tokenizer = build_tokenizer("sentencepiece", sentencepiece_model)
    missing = str(tmp_path / "absent_text_document")
    with pytest.raises(UserError, match="absent_text_document"):
        build_gpt_datasets([missing], "98,1,1", 16, 1, (10, 1, 1), tokenizer)


def test_parse_blend_forms():
    assert parse_blend(["a", "b"]) == (["a", "b"], None)
    assert parse_blend(["0.7", "a", 0.3, "b"]) == (["a", "b"], [0.7, 0.3])
    assert parse_blend(["only"]) == (["only"], None)
    for bad in (["0.7", "a", "b"], ["0", "a"], []):
        with pytest.raises(ValueError):
            parse_blend(bad)
