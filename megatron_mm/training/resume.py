"""What a resumed run tells the user: where it resumed, which learning-rate schedule is in force, and
which settings differ from the checkpoint's config."""

from __future__ import annotations

from pathlib import Path

import yaml

from megatron_mm.config import Config

# Keys that say how this run found its checkpoint, not how it trains.
_NOT_COMPARED = {"train.resume", "train.init_from"}


def describe_resume(path: str | Path, iteration: int, cfg: Config, schedule: dict) -> list[str]:
    """`schedule`: the train-section values of the schedule in force (lr_schedule.schedule_in_force)."""
    source = ("this run's config" if cfg.train.resume_schedule == "config" else "the checkpoint")
    lines = [
        f"resumed from {path} at iteration {iteration}",
        f"learning-rate schedule from {source} (train.resume_schedule={cfg.train.resume_schedule}): "
        f"lr {schedule['lr']:g}, min_lr {schedule['min_lr']:g}, warm-up {schedule['lr_warmup_iters']}, "
        f"{schedule['lr_decay_style']} decay over {schedule['lr_decay_iters']} iterations",
    ]
    saved_file = Path(path) / "config.yaml"
    if saved_file.is_file():
        changes = config_differences(yaml.safe_load(saved_file.read_text()) or {}, cfg.to_dict())
        if changes:
            lines.append("differs from the checkpoint: " + ", ".join(changes))
    return lines


def config_differences(saved: dict, current: dict) -> list[str]:
    """`section.key old -> new` for every key whose value differs (keys new to either side included)."""
    changes = []
    for section in current:
        old_section, new_section = saved.get(section) or {}, current[section] or {}
        keys = list(new_section) + [key for key in old_section if key not in new_section]
        for key in keys:
            name = f"{section}.{key}"
            old, new = old_section.get(key), new_section.get(key)
            if name not in _NOT_COMPARED and old != new:
                changes.append(f"{name} {old!r} -> {new!r}")
    return changes
