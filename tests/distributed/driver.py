"""Runs the real pretraining code under torchrun for the distributed tests and records what they
compare: per-iteration losses (logging rank) and each rank's local weights before and after training.

    torchrun --nproc_per_node N tests/distributed/driver.py --config C.yaml --out DIR [--save-init] [k=v ...]
    torchrun --nproc_per_node N tests/distributed/driver.py --cases CASES.json

CASES.json is a list of argument lists of the first form, run one after another in the same
processes: a launch costs ~10 s of start-up (mostly imports), a tiny case a few seconds.
megatron-core's groups are rebuilt for each case's layout inside the one process group, and every
case seeds its own generators, so it gives the numbers a launch of its own gives. A finished case
leaves DONE in its directory; a failing one names itself on stderr and ends the launch.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

CASE_FINISHED = "DONE"


def add_case_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--config", required=required)
    parser.add_argument("--out", required=required, help="directory for losses.json and weights_rank*.pt")
    parser.add_argument("--save-init", action="store_true", help="save the initial weights and stop")
    parser.add_argument("--force-batch-p2p", action="store_true",
                        help="bypass the gloo PP=2 batched-p2p guard (shows the trap it prevents)")
    parser.add_argument("--skew-expert-bias", type=float, metavar="B",
                        help="start every router's expert bias at +B for experts 0 and 1 (a skewed router)")
    parser.add_argument("--zero-images", action="store_true",
                        help="train on blanked generated images (the no-vision control)")
    parser.add_argument("overrides", nargs="*")


def main() -> int:
    parser = argparse.ArgumentParser()
    add_case_arguments(parser, required=False)
    parser.add_argument("--cases", type=Path, help="JSON list of case argument lists, run in order")
    parser.add_argument("--kill-during-save", type=int, metavar="ITER",
                        help="SIGKILL this process once checkpoint ITER is written but not yet published")
    parser.add_argument("--signal-at", type=int, metavar="ITER",
                        help="rank 0 sends itself SIGTERM in the middle of training step ITER")
    parser.add_argument("--signal-in-validation", action="store_true",
                        help="with --signal-at: send it during the validation after step ITER instead")
    args = parser.parse_args()
    if args.cases:
        case_parser = argparse.ArgumentParser()
        add_case_arguments(case_parser)
        cases = [case_parser.parse_args(argv) for argv in json.loads(args.cases.read_text())]
    elif args.config and args.out:
        cases = [args]
    else:
        parser.error("give --config and --out, or --cases")
    if args.signal_at is not None:
        _signal_at(args.signal_at, args.signal_in_validation)
    if args.kill_during_save is not None:
        _kill_during_save(args.kill_during_save)

    import torch

    from megatron_mm.errors import UserError
    from megatron_mm.runtime import destroy_distributed

    for index, case in enumerate(cases):
        failed = f"case {index + 1} of {len(cases)} failed: {case.out}\n" if len(cases) > 1 else ""
        try:
            run_case(case)
        except UserError as err:
            sys.stderr.write(f"{failed}error: {err}\n")  # one write: ranks sharing stderr do not interleave a line
            sys.stderr.flush()
            return 2
        except BaseException:
            sys.stderr.write(failed)
            sys.stderr.flush()
            raise
        destroy_distributed(keep_process_group=True)
        torch.distributed.barrier()  # every rank is done with the case
        if torch.distributed.get_rank() == 0:
            (Path(case.out) / CASE_FINISHED).touch()
    destroy_distributed()
    return 0


def run_case(case: argparse.Namespace) -> None:
    import torch

    import megatron_mm.runtime
    from megatron_mm.config import load_config
    from megatron_mm.training import loop as pretrain

    out = Path(case.out)
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as patches:
        if case.zero_images:
            from megatron_mm.data.mock_image_caption import MockImageCaptionDataset as dataset

            patches.enter_context(mock.patch.object(
                dataset, "__init__", functools.partialmethod(dataset.__init__, zero_images=True)))
        if case.force_batch_p2p:
            guard = megatron_mm.runtime.batch_p2p_comm_safe
            for module in list(sys.modules.values()):  # wherever set-up imported the guard from
                if getattr(module, "batch_p2p_comm_safe", None) is guard:
                    patches.enter_context(mock.patch.object(
                        module, "batch_p2p_comm_safe", lambda backend, pipeline_size: True))
        patches.enter_context(_tee_stdout(out / f"stdout_rank{os.environ.get('RANK', '0')}.txt"))
        trainer = pretrain.setup(load_config(case.config, case.overrides))
        rank = torch.distributed.get_rank()
        if case.skew_expert_bias:
            for router in trainer.expert_balancing.biased:
                router.expert_bias[:2] += case.skew_expert_bias
        if case.save_init:
            pretrain.save(trainer)
        else:
            torch.save(_local_weights(trainer), out / f"initial_weights_rank{rank}.pt")
            trainer.expert_balancing.keep_history = True  # expert_load.json below
            losses = pretrain.train(trainer)
            if rank == torch.distributed.get_world_size() - 1:
                (out / "losses.json").write_text(json.dumps(losses))
                (out / "expert_load.json").write_text(json.dumps(trainer.expert_balancing.imbalance_history))
            torch.save(_local_weights(trainer), out / f"weights_rank{rank}.pt")


@contextlib.contextmanager
def _tee_stdout(path: Path):
    """This rank's printed log lines of the case, also in `path` (the launch's stdout holds all cases)."""
    original = sys.stdout

    class Tee:
        def write(self, text):
            copy.write(text)
            return original.write(text)

        def flush(self):
            copy.flush()
            original.flush()

        def __getattr__(self, name):
            return getattr(original, name)

    with open(path, "w") as copy:
        sys.stdout = Tee()
        try:
            yield
        finally:
            sys.stdout = original


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
