"""Stopping a run on a signal without losing it: SIGTERM (Slurm preemption, scancel, torchrun's
shutdown), SIGINT (Ctrl-C) and SIGUSR1 (Slurm's `--signal`).

The handler only records the signal. The loop asks `requested()` at every step boundary and between
validation iterations; that call is collective, so all ranks agree to stop at the same point even
when only one was signalled, and the loop then saves, writes its history and exits 0. A second
signal exits at once. Launchers often deliver one signal twice (Slurm to every process of the step
and torchrun forwarding it again), so a repeat within REPEAT_GRACE_S of the first counts as the same.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Optional

import torch

from megatron_mm.runtime.device import compute_device

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
REPEAT_GRACE_S = 1.0


class StopSignals:
    def __init__(self):
        self.received: Optional[signal.Signals] = None
        self._received_at = 0.0
        self._previous: dict = {}

    def install(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if self.received is None:
            self.received, self._received_at = signal.Signals(signum), now
        elif now - self._received_at >= REPEAT_GRACE_S:
            os.write(2, f"second {signal.Signals(signum).name}: exiting without saving\n".encode())
            os._exit(128 + signum)

    def requested(self) -> Optional[signal.Signals]:
        """Collective over all ranks: the signal any rank received so far, or None."""
        local = int(self.received or 0)
        if not torch.distributed.is_initialized():
            return self.received
        device = compute_device()
        flag = torch.tensor([local], dtype=torch.int32, device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        agreed = int(flag.item())
        return signal.Signals(agreed) if agreed else None

