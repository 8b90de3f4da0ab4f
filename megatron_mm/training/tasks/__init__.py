"""Training objectives by name (`train.task`): the only list of them."""

from __future__ import annotations

import difflib

from megatron_mm.config import ConfigError
from megatron_mm.training.tasks.base import Task
from megatron_mm.training.tasks.pretrain import PretrainTask

TASKS: dict[str, type[Task]] = {task.name: task for task in (PretrainTask,)}


def build_task(name: str) -> Task:
    if name not in TASKS:
        close = difflib.get_close_matches(str(name), list(TASKS), n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else f"; tasks: {', '.join(TASKS)}"
        raise ConfigError(f"train.task={name!r} is not a task{hint}")
    return TASKS[name]()
