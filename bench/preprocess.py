"""Throughput of tools/preprocess_data.py's library (`preprocess_jsonl`) against a plain loop.

Baseline ("plain loop"): one process reads the JSONL, tokenizes each document with the same
tokenizer and writes the same IndexedDatasetBuilder output; both are timed in this run, from
tokenizer load to finalized files, and must produce byte-identical datasets.

    python bench/preprocess.py [--docs 30000] [--vocab-size 8000] [--workers 1 2]

The corpus is the standard-library docstring corpus (examples/make_tiny_corpus.py) repeated to
`--docs` documents; it and the sentencepiece model are reused from --work-dir when present.
"""

import argparse
import filecmp
import json
import subprocess
import sys
import time
import warnings
from itertools import cycle, islice
from pathlib import Path

import numpy

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
# Imported before any timing: megatron-core's import takes seconds and is not preprocessing work.
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_mm.data.preprocess import output_prefix_for_key, preprocess_jsonl  # noqa: E402
from megatron_mm.data.tokenizer import build_tokenizer, train_sentencepiece  # noqa: E402


def prepare_inputs(work_dir: Path, docs: int, vocab_size: int) -> tuple[Path, str]:
    source = work_dir / "stdlib_docstrings.jsonl"
    if not source.exists():
        subprocess.run([sys.executable, str(REPO / "examples/make_tiny_corpus.py"), "--output", str(source)],
                       check=True, stdout=subprocess.DEVNULL)
    corpus = work_dir / f"corpus_{docs}.jsonl"
    if not corpus.exists():
        lines = source.read_bytes().splitlines(keepends=True)
        corpus.write_bytes(b"".join(islice(cycle(lines), docs)))
    model = work_dir / f"sentencepiece_{vocab_size}.model"
    if not model.exists():
        train_sentencepiece(str(source), "text", vocab_size, str(model.with_suffix("")))
    return corpus, str(model)


def plain_loop(corpus: Path, model: str, output_prefix: str) -> None:
    """The baseline: the same tokenizer and writer in one process, no chunking, no skip bookkeeping."""
    tokenizer = build_tokenizer("sentencepiece", model)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    prefix = output_prefix_for_key(output_prefix, "text")
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    with open(corpus, "rb") as lines:
        for line in lines:
            ids = tokenizer.tokenize(json.loads(line)["text"]) + [tokenizer.eod]
            builder.add_document(numpy.asarray(ids, dtype=dtype), [len(ids)])
    builder.finalize(f"{prefix}.idx")


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def same_dataset(prefix_a: str, prefix_b: str) -> bool:
    return all(filecmp.cmp(f"{prefix_a}.{ext}", f"{prefix_b}.{ext}", shallow=False) for ext in ("bin", "idx"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=30000)
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--work-dir", default=str(REPO / "outputs/bench_preprocess"))
    args = parser.parse_args()

    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    corpus, model = prepare_inputs(work_dir, args.docs, args.vocab_size)
    megabytes = corpus.stat().st_size / 1e6
    print(f"corpus: {args.docs} docs, {megabytes:.1f} MB; sentencepiece BPE vocab {args.vocab_size}; append-eod")

    baseline_prefix = str(work_dir / "out_baseline")
    baseline_seconds = timed(lambda: plain_loop(corpus, model, baseline_prefix))
    rows = [("plain loop (baseline)", baseline_seconds, True)]
    for workers in args.workers:
        prefix = str(work_dir / f"out_workers{workers}")
        seconds = timed(lambda: preprocess_jsonl(str(corpus), ["text"], "sentencepiece", model, prefix,
                                                 workers=workers, append_eod=True, progress=False))
        identical = same_dataset(output_prefix_for_key(prefix, "text"), output_prefix_for_key(baseline_prefix, "text"))
        rows.append((f"preprocess_jsonl workers={workers}", seconds, identical))

    print(f"{'run':<30} {'seconds':>8} {'docs/s':>9} {'MB/s':>7} {'ours/baseline':>14} {'same output':>12}")
    for name, seconds, identical in rows:
        print(f"{name:<30} {seconds:>8.2f} {args.docs / seconds:>9.0f} {megabytes / seconds:>7.2f} "
              f"{baseline_seconds / seconds:>13.2f}x {'yes' if identical else 'NO':>12}")


if __name__ == "__main__":
    main()
