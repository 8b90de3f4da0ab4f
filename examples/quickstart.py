"""The CPU quickstart, end to end on a fresh clone, no downloads:

1. build a small English corpus from the Python standard library's docstrings,
2. train a sentencepiece tokenizer on it, 3. preprocess it into an indexed dataset,
4. pretrain a tiny Llama with TP=2 x PP=2 on 4 gloo ranks, stopping (and saving) part-way,
5. resume from that checkpoint to the end, 6. say where the TensorBoard logs and the loss PNG are.

    python examples/quickstart.py [--iters 300] [--nproc 4]     (make quickstart [QUICKSTART_ITERS=300])

Data (data/quickstart, the paths examples/configs/tiny_llama3.yaml reads) and outputs are written under
the current directory, the repository root when run by make.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path("data") / "quickstart"
CONFIG = ROOT / "examples" / "configs" / "tiny_llama3.yaml"


def run(*cmd: str) -> None:
    print("+", " ".join(cmd), flush=True)
    returncode = subprocess.run(cmd).returncode
    if returncode:
        sys.exit(returncode)  # the command has said why; a traceback from here would only bury it


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--nproc", type=int, default=4, help="ranks (the config asks for TP=2 x PP=2)")
    parser.add_argument("--output-dir", default="outputs/quickstart")
    args = parser.parse_args()
    py = sys.executable
    DATA.mkdir(parents=True, exist_ok=True)

    corpus, tokenizer = DATA / "corpus.jsonl", DATA / "tokenizer.model"
    if not corpus.exists():
        run(py, str(ROOT / "examples" / "make_tiny_corpus.py"), "--output", str(corpus))
    if not tokenizer.exists():
        run(py, str(ROOT / "tools" / "train_tokenizer.py"), "--input", str(corpus), "--json-key", "text",
            "--vocab-size", "4000", "--output-prefix", str(DATA / "tokenizer"))
    if not (DATA / "corpus_text_document.idx").exists():
        run(py, str(ROOT / "tools" / "preprocess_data.py"), "--input", str(corpus), "--json-keys", "text",
            "--tokenizer-type", "sentencepiece", "--tokenizer-model", str(tokenizer),
            "--output-prefix", str(DATA / "corpus"), "--workers", "2", "--append-eod")

    output_dir = Path(args.output_dir)
    # --standalone: a free local rendezvous port, so a second quickstart on the machine does not clash
    pretrain = [py, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                "-m", "megatron_mm.pretrain", "--config", str(CONFIG), f"train.output_dir={output_dir}",
                f"train.train_iters={args.iters}"]
    # First run stops (with a checkpoint) two thirds of the way; the second resumes from it.
    if output_dir.exists():  # a fresh run each time: the resume below must find this run's checkpoint
        shutil.rmtree(output_dir)
    run(*pretrain, f"train.exit_interval={2 * args.iters // 3}")
    run(*pretrain)

    history = json.loads((output_dir / "loss_history.json").read_text())["train_loss"]
    first, last = history[0], history[-1]
    print(f"\nloss {first[1]:.3f} at iteration {first[0]} -> {last[1]:.3f} at iteration {last[0]}")
    print(f"checkpoints:      {output_dir / 'checkpoints'}")
    print(f"TensorBoard logs: {output_dir / 'tensorboard'}   (tensorboard --logdir {output_dir / 'tensorboard'})")
    print(f"loss curve:       {output_dir / 'loss.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
