"""README.md's bash blocks, run as written in a scratch directory, one after another.

The scratch directory links the repository's tools, examples, launch scripts, Makefile and .venv, and
holds the inputs the README assumes: corpus.jsonl from examples/make_tiny_corpus.py, the published
configs' tokenizers (tokenizers/llama3, tokenizers/qwen3: small BPE tokenizers saved by transformers)
and Qwen3-8B (a tiny Qwen3 made with transformers' own config class, with such a tokenizer). Commands
change only through SUBSTITUTIONS, the ways the README documents to shorten a run or to check a
cluster launch without a cluster (DRY_RUN=1), and each command's result is checked by EXPECTED.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_mm.runtime.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
LINKED = ("Makefile", "setup.py", "pyproject.toml", "csrc", ".venv", "examples", "tools", "launch")
TINY_QWEN3_VOCAB = 32000  # the fine-tune reads data/corpus, made with the README's 32000-piece tok.model

# (pattern, replacement or None for not run, why); every one must apply to some README command.
SUBSTITUTIONS = [
    (r"^make test$", None, "the suite this test is part of"),
    (r"^make quickstart$", "make -o .venv/.installed quickstart QUICKSTART_ITERS=21",
     "the documented short quickstart; -o: the .venv running this test is used as it is"),
    (r"^NPROC=8 (launch/torchrun\.sh examples/configs/)", r"DRY_RUN=1 NPROC=8 \1", "8 GPUs: checked up to the layout"),
    (r"^sbatch --nodes (\d+) launch/slurm\.sbatch ", r"DRY_RUN=1 NNODES=\1 NPROC=8 launch/torchrun.sh ",
     "the check slurm.sbatch runs before srun, for its default 8 GPUs per node"),
    (r"^NPROC=8 (launch/torchrun\.sh ckpt/.*)$", r"NPROC=4 \1 train.train_iters=2",
     "4 CPU ranks (the imported TP 4 at DP 1), 2 steps"),
    (r"^(NPROC=2 launch/torchrun\.sh examples/configs/tiny_.*)$", r"\1 train.train_iters=2", "2 steps"),
]

# (pattern of the README command, regex its stdout must match or None, files it must leave)
EXPECTED = [
    (r"^make quickstart", r"loss [0-9.]+ at iteration 1 -> [0-9.]+ at iteration 21",
     ["outputs/quickstart/checkpoints/iter_0000014", "outputs/quickstart/checkpoints/iter_0000021",
      "outputs/quickstart/loss.png"]),
    (r"tools/train_tokenizer\.py", r"vocab_size=32000", ["tok.model"]),
    (r"tools/preprocess_data\.py", None, ["data/corpus_text_document.bin", "data/corpus_text_document.idx"]),
    (r"launch/torchrun\.sh examples/configs/llama3_8b\.yaml", r"^dry run: config and layout valid for 8 rank\(s\)",
     []),
    (r"launch/torchrun\.sh examples/configs/qwen3_8b\.yaml",
     r"^dry run: config and layout valid for 8 rank\(s\).*\nlayout: tp 4 x pp 1 x cp 1 x dp 2", []),
    (r"^sbatch .*llama3_70b\.yaml", r"^dry run: config and layout valid for 32 rank\(s\)", []),
    (r"import-hf --hf-dir Qwen3-8B", r"wrote ckpt/qwen3_8b", ["ckpt/qwen3_8b/config.yaml"]),
    (r"tools/check_hf_parity\.py", r"tp=2 pp=2 ep=1: max abs logit difference .*: ok", []),
    (r"launch/torchrun\.sh ckpt/qwen3_8b/config\.yaml", r"initialised weights from ckpt/qwen3_8b",
     ["runs/qwen3/checkpoints/iter_0000002"]),
    (r"export-hf --checkpoint runs/qwen3", r"wrote Qwen3-8B-tuned",
     ["Qwen3-8B-tuned/config.json", "Qwen3-8B-tuned/tokenizer.json"]),
    (r"megatron_mm\.data\.synthetic_mm", None, ["data/synthetic/manifest.jsonl"]),
    (r"tools/preprocess_mm_data\.py", None, ["data/synthetic_mm.bin", "data/synthetic_mm.idx"]),
    (r"launch/torchrun\.sh examples/configs/tiny_qwen2_vl\.yaml", r"iter +2/2 \| loss", []),
]


def readme_commands() -> list[str]:
    """Each command of the bash blocks: continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            command = re.sub(r"\s+#\s.*$", "", line).strip()
            if command and not command.startswith("#"):
                commands.append(" ".join(command.split()))
    return commands


def substituted(command: str) -> str | None:
    for pattern, replacement, _ in SUBSTITUTIONS:
        if re.search(pattern, command):
            return None if replacement is None else re.sub(pattern, replacement, command)
    return command


def expectation(command: str) -> tuple[str | None, list[str]]:
    matches = [(stdout, files) for pattern, stdout, files in EXPECTED if re.search(pattern, command)]
    assert len(matches) == 1, f"{command!r}: {len(matches)} entries of EXPECTED match it"
    return matches[0]


COMMANDS = readme_commands()


def _hf_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=1000, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")


def make_inputs(work: Path, env: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    for name in LINKED:
        (work / name).symlink_to(ROOT / name)
    subprocess.run([sys.executable, "examples/make_tiny_corpus.py", "--output", "corpus.jsonl"], cwd=work, env=env,
                   check=True, capture_output=True)
    texts = [json.loads(line)["text"] for line in (work / "corpus.jsonl").read_text().splitlines()]
    tokenizer = _hf_tokenizer(texts)
    for name in ("llama3", "qwen3"):
        tokenizer.save_pretrained(work / "tokenizers" / name)
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=TINY_QWEN3_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, head_dim=16, max_position_embeddings=256,
                         tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(config).save_pretrained(work / "Qwen3-8B")
    tokenizer.save_pretrained(work / "Qwen3-8B")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> tuple[Path, dict[str, subprocess.CompletedProcess]]:
    """Every README command run in order in one scratch directory (a failure does not stop the rest)."""
    work = tmp_path_factory.mktemp("readme")
    env = {key: value for key, value in os.environ.items()
           if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PYTHONPATH")}
    # `python` is the interpreter running the suite; dynamo off as in the other torchrun tests.
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1",
               TORCHDYNAMO_DISABLE="1")
    make_inputs(work, env)
    ran = {}
    for command in COMMANDS:
        run_as = substituted(command)
        if run_as is not None:
            port = str(free_port())  # launch/torchrun.sh's default 29500 may be taken by another run
            ran[command] = subprocess.run(["bash", "-c", run_as], cwd=work, env={**env, "MASTER_PORT": port},
                                          capture_output=True, text=True, timeout=600)
    return work, ran


def test_readme_commands_are_all_covered():
    assert "make test" in COMMANDS and "make quickstart" in COMMANDS
    for pattern, _, why in SUBSTITUTIONS:
        assert any(re.search(pattern, command) for command in COMMANDS), f"no README command for {pattern!r} ({why})"
    for command in COMMANDS:
        if substituted(command) is not None:
            expectation(command)


@pytest.mark.parametrize("command", [c for c in COMMANDS if substituted(c) is not None],
                         ids=lambda command: command[:70])
def test_readme_command(results, command):
    work, ran = results
    result = ran[command]
    output = f"$ {substituted(command)}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    assert result.returncode == 0, output
    assert "Traceback" not in result.stderr, output
    stdout_pattern, files = expectation(command)
    if stdout_pattern is not None:
        assert re.search(stdout_pattern, result.stdout, re.M), output
    for name in files:
        assert (work / name).exists(), f"{name} missing\n{output}"
