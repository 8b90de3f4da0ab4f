"""export-hf of a run trained from scratch (a sentencepiece tokenizer made by tools/train_tokenizer.py,
data by tools/preprocess_data.py, no HuggingFace import): transformers loads the exported tokenizer,
which encodes text to our tokenizer's ids, the config names its BOS/EOS ids, and the exported model
gives our logits over the tokenizer's vocabulary (the embedding padding trimmed). A run whose
tokenizer is a HuggingFace directory or a bare tokenizer.json exports that one."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from megatron_mm.runtime.distributed import free_port

TEXTS = ["the quick brown fox jumps over the lazy dog", "  leading, trailing  and  double  spaces ",
         "Ünïcödé café\ttabs\nand newlines", "characters it never saw: 字 🙂", "digits 1234567890", ""]


def _run(command: list[str], **env) -> subprocess.CompletedProcess:
    full_env = {key: value for key, value in os.environ.items() if key not in ("MASTER_ADDR", "MASTER_PORT")}
    full_env.update(OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1", **env)
    result = subprocess.run(command, capture_output=True, text=True, env=full_env, timeout=600)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


@pytest.fixture(scope="module")
def scratch_run(tmp_path_factory):
    """(run directory, sentencepiece model): two training steps of a tiny Llama on its own corpus."""
    work = tmp_path_factory.mktemp("scratch")
    words = "the quick brown fox jumps over lazy dog café naïve 42 2024 hello world tokens".split()
    generator = random.Random(0)
    with open(work / "corpus.jsonl", "w") as corpus:
        for _ in range(400):
            corpus.write(json.dumps({"text": " ".join(generator.choice(words) for _ in range(30))}) + "\n")
    tools = ROOT / "tools"
    _run([sys.executable, str(tools / "train_tokenizer.py"), "--input", str(work / "corpus.jsonl"),
          "--vocab-size", "300", "--output-prefix", str(work / "tok")])
    _run([sys.executable, str(tools / "preprocess_data.py"), "--input", str(work / "corpus.jsonl"), "--json-keys", "text",
          "--tokenizer-type", "sentencepiece", "--tokenizer-model", str(work / "tok.model"),
          "--output-prefix", str(work / "corpus"), "--workers", "1", "--append-eod"])
    run = work / "run"
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={free_port()}",
          "-m", "megatron_mm.pretrain", "--config", str(ROOT / "examples" / "configs" / "tiny_llama3.yaml"),
          "parallel.tp=1", "parallel.pp=1", f"data.blend=[{work / 'corpus_text_document'}]",
          f"data.tokenizer_model={work / 'tok.model'}", "data.seq_length=32", "train.precision=fp32",
          "train.micro_batch_size=2", "train.global_batch_size=2", "train.train_iters=2", "train.lr_warmup_iters=0",
          "train.eval_interval=0", "train.save_interval=2", "train.tensorboard=false", f"train.output_dir={run}"])
    return run, work / "tok.model"


def _with_tokenizer(run, target, tokenizer_type: str, tokenizer_model) -> object:
    """A copy of the run's checkpoint whose config names another tokenizer."""
    from megatron_mm.checkpoint.hf import resolve_checkpoint
    from megatron_mm.config import load_config

    shutil.copytree(resolve_checkpoint(run), target)
    cfg = load_config(target / "config.yaml")
    cfg.data.tokenizer_type, cfg.data.tokenizer_model = tokenizer_type, str(tokenizer_model)
    cfg.save(target / "config.yaml")
    return target


@pytest.mark.parametrize("kind", ["sentencepiece", "huggingface-directory", "tokenizer.json"])
def test_scratch_run_exports_its_tokenizer(scratch_run, tmp_path, kind):
    import sentencepiece
    from transformers import AutoTokenizer

    from megatron_mm.checkpoint.hf import export_hf
    from megatron_mm.data.tokenizer import build_tokenizer

    run, sentencepiece_model = scratch_run
    checkpoint, tokenizer_type, tokenizer_model = run, "sentencepiece", sentencepiece_model
    if kind != "sentencepiece":  # the sentencepiece model as transformers saves it, then used as a run's tokenizer
        AutoTokenizer.from_pretrained(str(export_hf(run, tmp_path / "first"))).save_pretrained(tmp_path / "tokenizer")
        tokenizer_type = "huggingface"
        tokenizer_model = tmp_path / "tokenizer" / ("tokenizer.json" if kind == "tokenizer.json" else "")
        checkpoint = _with_tokenizer(run, tmp_path / "checkpoint", tokenizer_type, tokenizer_model)
    exported = export_hf(checkpoint, tmp_path / "exported")

    ours = build_tokenizer(tokenizer_type, str(tokenizer_model))
    theirs = AutoTokenizer.from_pretrained(str(exported))
    for text in TEXTS:
        assert theirs(text)["input_ids"] == ours.tokenize(text), text
    pieces = sentencepiece.SentencePieceProcessor(model_file=str(sentencepiece_model))
    assert (theirs.bos_token_id, theirs.eos_token_id) == (pieces.bos_id(), ours.eod)
    config = json.loads((exported / "config.json").read_text())
    generation = json.loads((exported / "generation_config.json").read_text())
    for fields in (config, generation):
        assert (fields["bos_token_id"], fields["eos_token_id"]) == (pieces.bos_id(), pieces.eos_id())
    assert config["vocab_size"] == pieces.get_piece_size()


def test_scratch_run_exports_the_unpadded_model(scratch_run, tmp_path):
    """The run's embedding is padded (300 -> 384 rows); the export is the 300-entry model, and
    transformers computes our logits with it."""
    from megatron_mm.checkpoint.hf import export_hf, resolve_checkpoint
    from megatron_mm.training.hf_parity import hf_logits, logit_difference, our_logits
    from megatron_mm.config import load_config

    run, sentencepiece_model = scratch_run
    checkpoint = resolve_checkpoint(run)
    model_cfg = load_config(checkpoint / "config.yaml").model
    assert model_cfg.padded_vocab_size() > model_cfg.vocab_size == 300
    exported = export_hf(run, tmp_path / "exported")
    tokens = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    _, relative = logit_difference(our_logits(checkpoint, tokens), hf_logits(exported, tokens))
    assert relative < 1e-4
