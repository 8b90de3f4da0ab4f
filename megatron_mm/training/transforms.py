"""Model transforms: changes to a built model, applied in one ordered list to the unwrapped model
chunks before DistributedDataParallel wraps them (training/setup.py builds the list from config).

A transform may also give the optimizer param-group overrides, and says how its parameters are
saved and loaded (the model's sharded state dict as checkpoint/dist_ckpt.py saves and loads it) and
exported (the conversion rules checkpoint/hf.py exports with). Freezing and learning-rate
multipliers (training/stages.py) change no parameter: they keep the model's own state and rules.
"""

from __future__ import annotations


class ModelTransform:
    def apply(self, chunks: list) -> None:
        """Change the unwrapped chunks of this rank in place. Collective: every rank calls it."""
        raise NotImplementedError

    def optimizer_overrides(self, optimizer_config) -> dict:
        """megatron-core optimizer config_overrides (ParamKey -> ParamGroupOverride) of this transform."""
        return {}

    def checkpoint_state(self, sharded_state_dict: dict) -> dict:
        """One model chunk's sharded state dict as a checkpoint saves and loads it."""
        return sharded_state_dict

    def export_rules(self, rules: list) -> list:
        """The family's HuggingFace conversion rules (checkpoint/hf_rules.py) as an export applies them."""
        return rules


def apply_transforms(chunks: list, transforms: list[ModelTransform]) -> None:
    for transform in transforms:
        transform.apply(chunks)


def optimizer_overrides(transforms: list[ModelTransform], optimizer_config) -> dict:
    """megatron-core's standard overrides (no weight decay on biases and norms), then each
    transform's, in order."""
    from megatron.core.optimizer import get_standard_config_overrides

    overrides = dict(get_standard_config_overrides(optimizer_config) or {})
    for transform in transforms:
        overrides.update(transform.optimizer_overrides(optimizer_config))
    return overrides
