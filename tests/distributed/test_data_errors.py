"""Bad data stops `python -m megatron_mm.pretrain` at TP2 with one error line naming the file: token
ids beyond the model's vocabulary (which the vocabulary-parallel embedding would otherwise mask to
zero and train on), a truncated .bin, a sentencepiece model given as a Hugging Face tokenizer."""

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_CONFIG
from megatron_mm.runtime.distributed import free_port

ROOT = Path(__file__).resolve().parents[2]


def pretrain_tp2(*overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "megatron_mm.pretrain", "--config", str(TINY_CONFIG), "parallel.tp=2", *overrides]
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """Two sentencepiece models (400 and 800 pieces) and the corpus preprocessed with the larger one."""
    from megatron_mm.data.preprocess import preprocess_jsonl
    from megatron_mm.data.tokenizer import train_sentencepiece

    work = tmp_path_factory.mktemp("data_errors")
    texts = [doc for name in sorted(dir(os)) if (doc := inspect.getdoc(getattr(os, name))) and len(doc) > 40]
    corpus = work / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in dict.fromkeys(texts)), encoding="utf-8")
    small = train_sentencepiece(str(corpus), "text", 400, str(work / "small"))
    large = train_sentencepiece(str(corpus), "text", 800, str(work / "large"))
    prefix = preprocess_jsonl(str(corpus), ["text"], "sentencepiece", large, str(work / "corpus"), append_eod=True,
                              progress=False)["outputs"]["text"]
    return {"work": work, "small": small, "large": large, "prefix": prefix}


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one error line every reporting rank printed; no traceback from our code."""
    assert result.returncode != 0, result.stdout[-2000:]
    lines = {line for line in result.stderr.splitlines() if line.startswith("error:")}
    assert len(lines) == 1, result.stderr[-4000:]
    assert f'File "{ROOT / "megatron_mm"}' not in result.stderr
    return lines.pop()


def test_ids_beyond_the_vocabulary_stop_tp2_training(data, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(data["prefix"])
    largest = max(int(dataset[i].max()) for i in range(len(dataset)))
    assert largest >= 400  # the larger tokenizer's ids exceed the smaller model's vocabulary
    result = pretrain_tp2("data.mock=false", f"data.blend=[{data['prefix']}]", "data.tokenizer_type=sentencepiece",
                          f"data.tokenizer_model={data['small']}", "model.vocab_size=400",
                          f"train.output_dir={tmp_path / 'run'}")
    line = error_line(result)
    assert line.startswith(f"error: {data['prefix']}: largest token id {largest} is outside the model's vocabulary "
                           f"(model.vocab_size=400)"), line


def test_truncated_bin_and_wrong_tokenizer_type_stop_tp2_training(data, tmp_path):
    cut = tmp_path / "cut_text_document"
    Path(f"{cut}.idx").write_bytes(Path(f"{data['prefix']}.idx").read_bytes())
    whole = Path(f"{data['prefix']}.bin").read_bytes()
    Path(f"{cut}.bin").write_bytes(whole[:len(whole) // 2])
    common = ("data.mock=false", "model.vocab_size=800", f"train.output_dir={tmp_path / 'run'}")
    truncated = pretrain_tp2(*common, f"data.blend=[{cut}]", "data.tokenizer_type=sentencepiece",
                             f"data.tokenizer_model={data['large']}")
    assert error_line(truncated).startswith(f"error: {cut}.bin is truncated: {len(whole) // 2} bytes")
    wrong_type = pretrain_tp2(*common, f"data.blend=[{data['prefix']}]", "data.tokenizer_type=huggingface",
                              f"data.tokenizer_model={data['large']}")
    assert error_line(wrong_type) == (f"error: {data['large']} is a sentencepiece model, not a Hugging Face "
                                      f"tokenizer: use tokenizer type sentencepiece")
