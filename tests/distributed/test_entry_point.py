"""The `python -m megatron_mm.pretrain` contract: bad configs fail fast with one clear line, printed
once (launch/torchrun.sh checks them before torchrun starts); a clean run prints its log lines and no
warnings; a real corpus (tokenizer trained here, preprocessed by the tool) trains with falling loss
and leaves TensorBoard logs, a loss PNG and a resolved config beside the checkpoint."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import TINY_CONFIG
from megatron_mm.runtime.distributed import free_port

ROOT = Path(__file__).resolve().parents[2]


def pretrain(nproc: int, *args: str, cwd: Path = ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           "-m", "megatron_mm.pretrain", *args]
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


@pytest.mark.parametrize("override, message", [
    ("parallel.tp=3", "error: world size 2 is not divisible by tp*pp*cp = 3*1*1 = 3"),
    ("model.num_query_groups=1", "error: model.num_query_groups=1 is not divisible by parallel.tp=2"),
    ("parallel.tpp=2", "error: unknown key 'parallel.tpp'; did you mean 'parallel.tp'?"),
    ("data.mock=false", "error: data.blend is empty"),
])
def test_bad_config_one_line_once_under_torchrun(override, message):
    result = pretrain(2, "--config", str(TINY_CONFIG), "parallel.tp=2", override)
    assert result.returncode != 0
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, result.stderr  # local rank 0's; rank 1 found the same and kept quiet
    assert error_lines[0].startswith(message), error_lines
    # torchrun reports the failed children with its own traceback; none comes from our ranks.
    assert f'File "{ROOT / "megatron_mm"}' not in result.stderr
    assert "exitcode  : 2" in result.stderr  # rank 0 failed with our code, not torchrun's SIGTERM


def launch_script(*args: str, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port()), **env}
    return subprocess.run([str(ROOT / "launch" / "torchrun.sh"), *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)


def test_launch_script_bad_override_is_one_line_and_exit_2():
    result = launch_script(str(TINY_CONFIG), "parallel.tp=3", NPROC="2")
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == ["error: world size 2 is not divisible by tp*pp*cp = 3*1*1 = 3"]
    assert result.stdout == ""


def test_dry_run_checks_the_layout_for_the_asked_ranks(tmp_path):
    out = tmp_path / "run"
    fits = launch_script(str(TINY_CONFIG), "parallel.tp=2", f"train.output_dir={out}", DRY_RUN="1",
                         NPROC="4", NNODES="2")
    assert fits.returncode == 0, fits.stderr
    assert fits.stderr == ""
    assert fits.stdout.splitlines() == [
        "dry run: config and layout valid for 8 rank(s) (nothing built)",
        "layout: tp 2 x pp 1 x cp 1 x dp 4 (ep 1, vpp -); global batch 8 = dp 4 x 1 micro-batches of 2"]
    assert not out.exists()
    # 8 ranks at dp 4 cannot split a global batch of 8 into micro-batches of 4.
    too_big = launch_script(str(TINY_CONFIG), "parallel.tp=2", "train.micro_batch_size=4", DRY_RUN="1",
                            NPROC="4", NNODES="2")
    assert too_big.returncode == 2
    assert too_big.stderr.splitlines() == [
        "error: train.global_batch_size=8 is not divisible by micro_batch_size*data_parallel = 4*4"]


def test_clean_run_prints_its_log_and_no_warnings(tmp_path):
    out = tmp_path / "run"
    common = ("--config", str(TINY_CONFIG), "parallel.tp=2", f"train.output_dir={out}", "train.log_interval=2")
    first = pretrain(2, *common, "train.train_iters=2")
    resumed = pretrain(2, *common, "train.train_iters=4")  # loading adds dist_checkpointing's warnings
    for result in (first, resumed):
        assert result.returncode == 0, result.stderr[-4000:]
        lines = (result.stdout + result.stderr).splitlines()
        assert [line for line in lines if "warn" in line.lower()] == [], result.stderr
        assert result.stderr == "", result.stderr
    assert first.stdout.splitlines()[0].startswith("iter      2/2 | loss ")
    assert f"saved checkpoint {out / 'checkpoints' / 'iter_0000002'}" in first.stdout.splitlines()
    assert resumed.stdout.splitlines()[0] == f"resumed from {out / 'checkpoints' / 'iter_0000002'} at iteration 2"
    assert any(line.startswith("iter      4/4 | loss ") for line in resumed.stdout.splitlines())


def test_missing_data_path_fails_before_building(tmp_path):
    result = pretrain(1, "--config", str(TINY_CONFIG), "data.mock=false",
                      f"data.blend=[{tmp_path / 'nothing_text_document'}]", f"data.tokenizer_model={tmp_path / 't.model'}")
    assert result.returncode != 0  # torchrun exits 1 whatever its children's code (ours: 2)
    assert f"error: data path not found: {tmp_path / 'nothing_text_document'}.bin/.idx" in result.stderr


def test_real_corpus_trains_and_leaves_artifacts(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    docs = [f"The {animal} number {i} sat on the {thing}. It was {colour} and {animal}s like {thing}s."
            for i in range(300) for animal, thing, colour in [("cat", "mat", "red"), ("dog", "log", "blue")]]
    corpus.write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n")
    run = lambda *cmd: subprocess.run([sys.executable, *cmd], cwd=ROOT, check=True, capture_output=True, text=True)
    run("tools/train_tokenizer.py", "--input", str(corpus), "--json-key", "text", "--vocab-size", "300",
        "--output-prefix", str(tmp_path / "tok"))
    run("tools/preprocess_data.py", "--input", str(corpus), "--json-keys", "text", "--tokenizer-type", "sentencepiece",
        "--tokenizer-model", str(tmp_path / "tok.model"), "--output-prefix", str(tmp_path / "corpus"),
        "--workers", "1", "--append-eod", "--no-progress")
    out = tmp_path / "run"
    result = pretrain(2, "--config", str(TINY_CONFIG), "parallel.pp=2", "data.mock=false", "model.vocab_size=null",
                      f"data.blend=[{tmp_path / 'corpus_text_document'}]", f"data.tokenizer_model={tmp_path / 'tok.model'}",
                      "data.split=90,10,0", "train.train_iters=30", "train.eval_interval=15", "train.save_interval=30",
                      "train.log_interval=5", "train.lr=3e-3", "train.tensorboard=true", f"train.output_dir={out}")
    assert result.returncode == 0, result.stderr[-4000:]
    history = json.loads((out / "loss_history.json").read_text())
    train_losses = [loss for _, loss in history["train_loss"]]
    assert len(train_losses) == 30 and len(history["valid_loss"]) == 2
    assert sum(train_losses[-5:]) / 5 < 0.7 * sum(train_losses[:5]) / 5
    assert history["valid_loss"][1][1] < history["valid_loss"][0][1]
    assert (out / "loss.png").stat().st_size > 1000
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    saved = yaml.safe_load((out / "checkpoints" / "iter_0000030" / "config.yaml").read_text())
    assert saved["model"]["vocab_size"] == 300 and saved["parallel"]["pp"] == 2
    assert "TensorBoard logs:" in result.stdout and "iter     30/30" in result.stdout
