"""Runs the real pretraining code under torchrun for the distributed tests and records what they
compare: per-iteration losses (logging rank) and each rank's local weights before and after training.

    torchrun --nproc_per_node N tests/distributed/driver.py --config C.yaml --out DIR [--save-init] [k=v ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True, help="directory for losses.json and weights_rank*.pt")
    parser.add_argument("--save-init", action="store_true", help="save the initial weights and stop")
    parser.add_argument("--force-batch-p2p", action="store_true",
                        help="bypass the gloo PP=2 batched-p2p guard (shows the trap it prevents)")
    parser.add_argument("--kill-during-save", type=int, metavar="ITER",
                        help="SIGKILL this process once checkpoint ITER is written but not yet published")
    parser.add_argument("--skew-expert-bias", type=float, metavar="B",
                        help="start every router's expert bias at +B for experts 0 and 1 (a skewed router)")
    parser.add_argument("--zero-images", action="store_true",
                        help="train on blanked generated images (the no-vision control)")
    parser.add_argument("--signal-at", type=int, metavar="ITER",
                        help="rank 0 sends itself SIGTERM in the middle of training step ITER")
    parser.add_argument("--signal-in-validation", action="store_true",
                        help="with --signal-at: send it during the validation after step ITER instead")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.signal_at is not None:
        _signal_at(args.signal_at, args.signal_in_validation)
    if args.zero_images:
        import functools

        from megatron_mm.data import mock_image_caption

        dataset = mock_image_caption.MockImageCaptionDataset
        dataset.__init__ = functools.partialmethod(dataset.__init__, zero_images=True)
    if args.force_batch_p2p:
        import megatron_mm.runtime

        megatron_mm.runtime.batch_p2p_comm_safe = lambda backend, pipeline_size: True
    if args.kill_during_save is not None:
        _kill_during_save(args.kill_during_save)

    import torch

    from megatron_mm.config import load_config
    from megatron_mm.errors import UserError
    from megatron_mm.runtime import destroy_distributed
    from megatron_mm.training import loop as pretrain

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        trainer = pretrain.setup(load_config(args.config, args.overrides))
    except UserError as err:
        sys.stderr.write(f"error: {err}\n")  # one write: ranks sharing stderr do not interleave a line
        sys.stderr.flush()
        return 2
    rank = torch.distributed.get_rank()
    if args.skew_expert_bias:
        for router in trainer.expert_balancing.biased:
            router.expert_bias[:2] += args.skew_expert_bias
    if args.save_init:
        pretrain.save(trainer)
    else:
        torch.save(_local_weights(trainer), out / f"initial_weights_rank{rank}.pt")
        trainer.expert_balancing.keep_history = True  # expert_load.json below
        losses = pretrain.train(trainer)
        if rank == torch.distributed.get_world_size() - 1:
            (out / "losses.json").write_text(json.dumps(losses))
            (out / "expert_load.json").write_text(json.dumps(trainer.expert_balancing.imbalance_history))
        torch.save(_local_weights(trainer), out / f"weights_rank{rank}.pt")
    destroy_distributed()
    return 0


def _local_weights(trainer) -> dict:
    import torch

    weights = {}
    for i, chunk in enumerate(trainer.model):
        for name, tensor in chunk.state_dict().items():
            if torch.is_tensor(tensor):
                weights[f"chunk{i}.{name}"] = tensor.detach().cpu().clone()
    return weights


def _signal_at(iteration: int, in_validation: bool) -> None:
    """A real SIGTERM to rank 0 only, arriving mid-step (or mid-validation): the other rank learns of
    it through the loop's agreement."""
    import os
    import signal

    import torch

    from megatron_mm.training import loop as pretrain

    name = "evaluate" if in_validation else "train_step"
    original = getattr(pretrain, name)

    def signal_then_run(trainer, *args):
        step = trainer.iteration if in_validation else trainer.iteration + 1
        if step == iteration and torch.distributed.get_rank() == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(trainer, *args)

    setattr(pretrain, name, signal_then_run)


def _kill_during_save(iteration: int) -> None:
    """The worst moment for a crash: every shard written, the rename into place not yet done."""
    import os
    import signal

    from megatron.core import dist_checkpointing

    original_save = dist_checkpointing.save

    def save_then_die(state, directory, *args, **kwargs):
        result = original_save(state, directory, *args, **kwargs)
        if Path(directory).name == f"iter_{iteration:07d}.tmp":
            os.killpg(os.getpgid(0), signal.SIGKILL)  # the rank and its checkpoint-writer helpers
        return result

    dist_checkpointing.save = save_then_die


if __name__ == "__main__":
    sys.exit(main())
