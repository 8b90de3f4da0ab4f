"""Training checkpoints on megatron-core dist_checkpointing: model, optimizer, scheduler, RNG and
data position, resharded on load to whatever layout the resuming run has.

Saves are atomic: everything is written to `iter_NNNNNNN.tmp/`, which is renamed to `iter_NNNNNNN/`
only after every rank has finished, and only then is `latest` replaced (write + os.replace). A crash
or kill -9 at any point leaves the previous checkpoint complete and `latest` pointing at it.

Each checkpoint lists its files and their sizes (`manifest.json`); before anything is loaded the list
is checked, so a shard deleted or truncated afterwards is named instead of failing deep inside the
load, and `resume=auto` falls back to the newest checkpoint that is intact.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from megatron_mm.errors import UserError
from megatron_mm.runtime.model_chunks import unwrap

CHECKPOINT_DIR_PATTERN = re.compile(r"^iter_(\d{7})$")
TRAIN_STATE_FILE = "train_state.json"  # written last: its presence marks a finished save
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "latest"


@dataclass
class TrainState:
    iteration: int
    consumed_train_samples: int
    layout: dict  # tp/pp/vpp/dp/world of the saving run: RNG states are restored only if it matches


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _model_state(model, transforms=()) -> dict:
    """Each chunk's sharded state dict as the model transforms (training/transforms.py) store it."""
    from megatron.core import parallel_state

    # Tied copies (MTP's embedding on the last stage, TE layers) deduplicate over this group.
    metadata = {"dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
    state = {}
    for i, chunk in enumerate(model):
        chunk_state = unwrap(chunk).sharded_state_dict(metadata=metadata)
        for transform in transforms:
            chunk_state = transform.checkpoint_state(chunk_state)
        state[f"model{i}"] = chunk_state
    return state


def _optimizer_state(optimizer, model_state: dict, is_loading: bool) -> dict:
    # The optimizer matches its parameters to the model's sharded tensors by identity; the chunks'
    # keys (virtual pipeline stages) repeat, so they are kept apart under their chunk's name.
    merged = {f"{chunk}.{key}": value for chunk, chunk_state in model_state.items()
              for key, value in chunk_state.items()}
    # The distributed optimizer's state in Megatron-LM's default form (reshards over data-parallel
    # sizes); megatron-core's own default, fully_sharded_model_space, is refused by its save in 0.16.
    metadata = {"distrib_optim_sharding_type": "dp_reshardable"}
    return optimizer.sharded_state_dict(merged, is_loading=is_loading, metadata=metadata)


def save_checkpoint(
    output_dir: str | Path, state: TrainState, model, optimizer, scheduler, config_dict: dict,
    hf_files: Optional[Path] = None, transforms=(),
) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory.

    `hf_files`: the `hf/` directory of an imported HuggingFace model (config, tokenizer), carried
    into every checkpoint so that export-hf can write them back.
    """
    from megatron.core import dist_checkpointing
    import yaml

    root = checkpoint_root(output_dir)
    final = root / f"iter_{state.iteration:07d}"
    staging = root / f"iter_{state.iteration:07d}.tmp"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # left over from a crashed save
        staging.mkdir()
    _barrier()

    model_state = _model_state(model, transforms)
    sharded = dict(model_state)
    sharded["optimizer"] = _optimizer_state(optimizer, model_state, is_loading=False)
    sharded["scheduler"] = scheduler.state_dict()  # common (non-sharded) state: written by rank 0
    dist_checkpointing.save(sharded, str(staging))

    rng_dir = staging / "rng"
    rng_dir.mkdir(exist_ok=True)
    torch.save(_rng_state(), rng_dir / f"rank_{_rank():05d}.pt")
    _barrier()  # every rank's files are written: the manifest can list them
    if _rank() == 0:
        (staging / "config.yaml").write_text(yaml.safe_dump(config_dict, sort_keys=False))
        if hf_files is not None and hf_files.is_dir():
            shutil.copytree(hf_files, staging / hf_files.name)
        write_manifest(staging)
        _write_synced(staging / TRAIN_STATE_FILE, json.dumps(dataclasses.asdict(state), indent=1))
    _barrier()

    if _rank() == 0:
        _publish(staging, final)
        _write_synced(root / (LATEST_FILE + ".tmp"), final.name)
        os.replace(root / (LATEST_FILE + ".tmp"), root / LATEST_FILE)
    _barrier()
    return final


def _publish(staging: Path, final: Path) -> None:
    """Rename the staging dir into place; an older copy of the same iteration goes only afterwards."""
    displaced = None
    if final.exists():
        displaced = final.with_name(final.name + ".old")
        shutil.rmtree(displaced, ignore_errors=True)
        os.rename(final, displaced)
    os.rename(staging, final)
    _fsync_dir(final.parent)
    if displaced is not None:
        shutil.rmtree(displaced, ignore_errors=True)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_complete_checkpoint(path: Path) -> bool:
    return CHECKPOINT_DIR_PATTERN.match(path.name) is not None and (path / TRAIN_STATE_FILE).is_file()


def write_manifest(directory: Path) -> None:
    """Record every file of a checkpoint and its size (all ranks' files must be written)."""
    files = {str(f.relative_to(directory)): f.stat().st_size
             for f in sorted(directory.rglob("*")) if f.is_file() and f.name != MANIFEST_FILE}
    _write_synced(directory / MANIFEST_FILE, json.dumps(files, indent=0))


def checkpoint_problem(path: Path) -> Optional[str]:
    """None for an intact checkpoint, else what is wrong with it, naming the file."""
    if not (path / TRAIN_STATE_FILE).is_file():
        return f"{path / TRAIN_STATE_FILE} is missing (not a checkpoint, or its save did not finish)"
    manifest = path / MANIFEST_FILE
    if not manifest.is_file():  # written before manifests existed (or by import-hf): nothing to check
        return None
    try:
        recorded = json.loads(manifest.read_text())
    except (OSError, ValueError) as err:
        return f"{manifest} is unreadable ({err})"
    for name, size in recorded.items():
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        actual = file.stat().st_size
        if actual != size:
            return f"{file} has {actual} bytes, {size} were written"
    return None


def find_latest_checkpoint(output_dir: str | Path, warn=None) -> Optional[Path]:
    """The newest intact checkpoint: the one `latest` names, else the newest complete `iter_*` dir,
    else older ones; `warn(message)` hears of each damaged one passed over. None if there is no
    checkpoint; a UserError if there are some and none is intact."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return None
    candidates = sorted((p for p in root.glob("iter_*") if is_complete_checkpoint(p)), reverse=True)
    latest = root / LATEST_FILE
    named = root / latest.read_text().strip() if latest.is_file() else None
    if named in candidates:
        candidates.remove(named)
        candidates.insert(0, named)
    damaged = []
    for candidate in candidates:
        problem = checkpoint_problem(candidate)
        if problem is None:
            if warn is not None and damaged:
                warn(f"damaged checkpoint passed over ({'; '.join(damaged)}): resuming from {candidate.name}")
            return candidate
        damaged.append(problem)
    if damaged:
        raise UserError(f"no intact checkpoint in {root}: " + "; ".join(damaged))
    return None


def read_train_state(path: str | Path) -> TrainState:
    return TrainState(**json.loads((Path(path) / TRAIN_STATE_FILE).read_text()))


def load_checkpoint(path: str | Path, model, optimizer=None, scheduler=None, layout: Optional[dict] = None,
                    transforms=()):
    """Load into the (possibly differently sharded) model; optimizer and scheduler when given.

    Returns the saved TrainState. RNG states are restored only when `layout` equals the saving
    run's, since per-rank generators have no meaning under another layout.
    """
    from megatron.core import dist_checkpointing

    path = Path(path)
    problem = checkpoint_problem(path)
    if problem is not None:
        raise UserError(f"cannot load checkpoint {path}: {problem}")
    if optimizer is not None and not _restorable(optimizer):
        raise UserError(f"cannot resume {path}: without Apex or Transformer Engine, megatron-core's distributed "
                        f"optimizer does not restore its Adam state; start from its weights with "
                        f"train.init_from={path} train.resume=none")
    model_state = _model_state(model, transforms)
    sharded = dict(model_state)
    if optimizer is not None:
        sharded["optimizer"] = _optimizer_state(optimizer, model_state, is_loading=True)
    try:
        loaded = dist_checkpointing.load(sharded, str(path))
    except Exception as err:  # damage the manifest cannot see (same size, other bytes), or a model that differs
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise UserError(f"cannot load checkpoint {path}: {type(err).__name__}: {first_line}") from err
    for i, chunk in enumerate(model):
        unwrap(chunk).load_state_dict(loaded[f"model{i}"])
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(loaded["scheduler"])
    state = read_train_state(path)
    rng_file = path / "rng" / f"rank_{_rank():05d}.pt"
    if layout is not None and layout == state.layout and rng_file.is_file():
        _restore_rng_state(torch.load(rng_file, weights_only=False))
    return state


def _restorable(optimizer) -> bool:
    """megatron-core 0.16's distributed optimizer on torch's Adam (no Apex/TE) cannot load its own
    checkpoint: its load plan reads Adam state a fresh optimizer does not have, and where that state
    is supplied the restored steps are 0 and the resumed losses leave the uninterrupted run's."""
    from megatron.core.optimizer import distrib_optimizer

    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    return distrib_optimizer.HAVE_APEX_OR_TE or not any(
        isinstance(o, distrib_optimizer.DistributedOptimizer) for o in chained)


def _rng_state() -> dict:
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _restore_rng_state(saved: dict) -> None:
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    random.setstate(saved["python"])
    np.random.set_state(saved["numpy"])
    torch.set_rng_state(saved["torch"])
    if saved["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(saved["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(saved["tracker"])
