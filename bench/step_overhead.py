"""Per-step overhead before vs after, in one invocation: tokens/s of examples/configs/tiny_llama3.yaml
at DP2 and TP2 on 2 CPU ranks (mock data), and the start-up time of a packed multimodal dataset
planned for 10,000 iterations. "Before" is a git worktree of the baseline commit; each figure is
printed with the ratio after / before (tokens/s: higher is better; start-up: lower is better).

    python bench/step_overhead.py --baseline COMMIT [--iters 60] [--repeats 2]

The baseline worktree is created at /tmp/step_overhead_baseline (git worktree add) when missing.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = "examples/configs/tiny_llama3.yaml"
LAYOUTS = {"DP2": ["parallel.tp=1", "parallel.pp=1"], "TP2": ["parallel.tp=2", "parallel.pp=1"]}
TOKENS_PER_S = re.compile(r"\| ([\d,]+) tok/s \|")

# Writes a packed-multimodal source and times building the training dataset over it; run with the
# tree under test first on sys.path, so the same script measures either version.
STARTUP_SCRIPT = r'''
import io, sys, time
from pathlib import Path
import numpy
from PIL import Image
sys.path.insert(0, sys.argv[1])
from megatron_mm.data.mm_indexed import MediaRecord, MMIndexedDataset, MMIndexedWriter, MMSample
from megatron_mm.data.mm_training import PackedMMDataset, SourceSplit

prefix, iterations, global_batch = Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
if not prefix.with_suffix(".idx").exists():
    rng = numpy.random.default_rng(0)
    writer = MMIndexedWriter(str(prefix.with_suffix(".bin")))
    for index in range(4000):
        tokens = rng.integers(10, 1000, int(rng.integers(8, 120))).astype(numpy.int32)
        media = []
        if index % 2 == 0:
            out = io.BytesIO()
            size = (int(rng.integers(16, 96)), int(rng.integers(16, 96)))
            Image.fromarray(numpy.zeros((*size, 3), numpy.uint8)).save(out, format="PNG")
            media.append(MediaRecord("image", int(rng.integers(0, len(tokens))), out.getvalue()))
        writer.add_sample(MMSample(tokens, media))
    writer.finalize(str(prefix.with_suffix(".idx")))

class Patches:
    modality, placeholder_id = "image", 1
    def __call__(self, image):
        import torch
        return {"patches": torch.zeros(1, 4)}, 1
    def num_placeholders(self, height, width):
        return -(-height // 32) * -(-width // 32)

dataset = MMIndexedDataset(str(prefix))
start = time.perf_counter()
PackedMMDataset([SourceSplit(dataset, 0, len(dataset))], [1.0], {"image": Patches()}, {"image": 1},
                seq_length=512, num_samples=iterations * global_batch, seed=1234)
print(f"STARTUP {time.perf_counter() - start:.4f}")
'''


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def baseline_tree(commit: str, path: Path) -> Path:
    if not path.exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), commit], check=True,
                       stdout=subprocess.DEVNULL)
        for library in (REPO / "megatron_mm").glob("_C*.so"):  # the built kernels (ignored by git)
            (path / "megatron_mm" / library.name).write_bytes(library.read_bytes())
    return path


def tokens_per_second(tree: Path, layout: list[str], iters: int, output_dir: Path) -> float:
    """Mean tok/s of the log windows after the first (warm-up) one."""
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "TORCHDYNAMO_DISABLE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               "-m", "megatron_mm.pretrain", "--config", str(tree / CONFIG), *layout, "data.mock=true",
               "model.vocab_size=1024", f"train.train_iters={iters}", "train.log_interval=10", "train.eval_interval=0",
               "train.save=false", "train.save_interval=0", f"train.output_dir={output_dir}"]
    result = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, timeout=1200)
    rates = [float(m.replace(",", "")) for m in TOKENS_PER_S.findall(result.stdout)]
    if result.returncode != 0 or len(rates) < 2:
        raise SystemExit(f"{tree}: run failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return statistics.mean(rates[1:])


def startup_seconds(tree: Path, prefix: Path, iterations: int, global_batch: int) -> float:
    result = subprocess.run([sys.executable, "-c", STARTUP_SCRIPT, str(tree), str(prefix), str(iterations),
                             str(global_batch)], capture_output=True, text=True, timeout=1200,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    match = re.search(r"STARTUP ([\d.]+)", result.stdout)
    if match is None:
        raise SystemExit(f"{tree}: start-up run failed:\n{result.stderr[-3000:]}")
    return float(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", required=True, help="commit to compare against")
    parser.add_argument("--baseline-dir", type=Path, default=Path("/tmp/step_overhead_baseline"))
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2, help="runs per tree and layout, alternating trees")
    parser.add_argument("--mm-iterations", type=int, default=10_000)
    parser.add_argument("--mm-global-batch", type=int, default=16)
    args = parser.parse_args()
    trees = {"before": baseline_tree(args.baseline, args.baseline_dir), "after": REPO}
    print(f"baseline {args.baseline}; load average at start {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        for name, layout in LAYOUTS.items():
            rates = {tree: [] for tree in trees}
            for repeat in range(args.repeats):  # alternating, so drifting load hits both alike
                for tree, path in trees.items():
                    rates[tree].append(tokens_per_second(path, layout, args.iters, scratch / f"{name}{tree}{repeat}"))
            before, after = (statistics.mean(rates[tree]) for tree in trees)
            print(f"tiny_llama3 {name}: before {before:,.0f} tok/s, after {after:,.0f} tok/s, "
                  f"ratio after/before {after / before:.3f}")
        prefix = scratch / "mm_source"
        seconds = {tree: min(startup_seconds(path, prefix, args.mm_iterations, args.mm_global_batch)
                             for _ in range(args.repeats)) for tree, path in trees.items()}
        print(f"packed multimodal dataset, {args.mm_iterations:,} iterations x {args.mm_global_batch}: "
              f"before {seconds['before']:.2f} s, after {seconds['after']:.2f} s, "
              f"ratio after/before {seconds['after'] / seconds['before']:.3f}")
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
