"""Training observability: the log line, TensorBoard scalars, throughput / MFU, the loss-curve PNG.
Only the logging rank (the last one: it holds the loss of the last pipeline stage) writes."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import torch


class TrainingLogger:
    def __init__(self, output_dir: str | Path, enabled: bool, tensorboard: bool, flops_per_token: float,
                 num_devices: int, peak_tflops: Optional[float], start_iteration: int = 0):
        self.enabled = enabled
        self.output_dir = Path(output_dir)
        self.flops_per_token = flops_per_token
        self.num_devices = num_devices
        self.peak_tflops = peak_tflops  # None on CPU: no MFU
        self.history: dict[str, list[tuple[int, float]]] = {"train_loss": [], "valid_loss": []}
        self._keep_earlier_history(start_iteration)
        self.writer = None
        self._window_start = time.perf_counter()
        self._window_tokens = 0
        if enabled:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=str(self.tensorboard_dir))

    def _keep_earlier_history(self, start_iteration: int) -> None:
        """A resumed run continues the curve of the run it resumes (up to its checkpoint)."""
        saved = self.output_dir / "loss_history.json"
        if not self.enabled or start_iteration == 0 or not saved.is_file():
            return
        for name, points in json.loads(saved.read_text()).items():
            self.history[name] = [(step, value) for step, value in points if step <= start_iteration]

    @property
    def tensorboard_dir(self) -> Path:
        return self.output_dir / "tensorboard"

    @property
    def loss_png(self) -> Path:
        return self.output_dir / "loss.png"

    def restart_window(self) -> None:
        self._window_start = time.perf_counter()
        self._window_tokens = 0

    def train_step(self, iteration: int, loss: Optional[float], lr: float, grad_norm: Optional[float],
                   tokens: int, log_now: bool, total_iters: int, expert_load: Optional[dict] = None) -> None:
        self._window_tokens += tokens
        if not self.enabled:
            return
        self.history["train_loss"].append((iteration, loss))
        if not log_now:
            return
        elapsed = max(time.perf_counter() - self._window_start, 1e-9)
        tokens_per_s = self._window_tokens / elapsed
        tflops = tokens_per_s * self.flops_per_token / self.num_devices / 1e12
        scalars = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s,
                   "tflops_per_device": tflops}
        # no norm: fp16's loss scaler found inf/nan gradients and skipped the update
        norm = "skipped (fp16 overflow)" if grad_norm is None else f"{grad_norm:.3f}"
        line = (f"iter {iteration:>6}/{total_iters} | loss {loss:.4f} | lr {lr:.3e} | "
                f"grad norm {norm} | {tokens_per_s:,.0f} tok/s | {tflops:.3g} TFLOP/s/device")
        if self.peak_tflops:
            scalars["mfu"] = tflops / self.peak_tflops
            line += f" | MFU {100 * scalars['mfu']:.1f}%"
        if expert_load is not None:
            line += f" | expert load max/mean {expert_load['mean_max_over_mean']:.2f}"
            if expert_load["dropped"] is not None:
                line += f" | dropped {sum(expert_load['dropped'].values()):,.0f}"
        print(line, flush=True)
        if self.writer is not None:
            for name, value in scalars.items():
                if value is not None:
                    self.writer.add_scalar(f"train/{name}", value, iteration)
            if expert_load is not None:
                self._write_expert_load(iteration, expert_load)
        self.restart_window()

    def _write_expert_load(self, iteration: int, load: dict) -> None:
        """Per MoE layer (of this pipeline stage): imbalance, tokens per expert, expert bias."""
        for layer, ratio in load["max_over_mean"].items():
            self.writer.add_scalar(f"moe/{layer}/max_over_mean", ratio, iteration)
            self.writer.add_histogram(f"moe/{layer}/tokens_per_expert", load["tokens_per_expert"][layer], iteration)
            if layer in load["expert_bias"]:
                bias = load["expert_bias"][layer]
                self.writer.add_scalar(f"moe/{layer}/expert_bias_min", bias.min().item(), iteration)
                self.writer.add_scalar(f"moe/{layer}/expert_bias_max", bias.max().item(), iteration)
            if load["dropped"] is not None:
                self.writer.add_scalar(f"moe/{layer}/dropped_tokens", load["dropped"][layer], iteration)

    def validation(self, iteration: int, loss: float) -> None:
        if not self.enabled:
            return
        self.history["valid_loss"].append((iteration, loss))
        print(f"iter {iteration:>6} | validation loss {loss:.4f}", flush=True)
        if self.writer is not None:
            self.writer.add_scalar("valid/loss", loss, iteration)

    def finish(self) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            self.writer.close()
        (self.output_dir / "loss_history.json").write_text(json.dumps(self.history))
        self._plot()

    def _plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for name, points in self.history.items():
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, label=name.replace("_", " "), marker="o" if len(points) < 30 else None)
        ax.set_xlabel("iteration")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.loss_png, dpi=120)
        plt.close(fig)


def cuda_peak_tflops(configured: float) -> Optional[float]:
    return configured if torch.cuda.is_available() else None
