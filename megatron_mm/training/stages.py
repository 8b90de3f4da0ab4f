"""Training stages as config over the one loop: freezing modules and per-module learning rates,
two model transforms (training/transforms.py) applied in this order.

    train.freeze:  [encoders.image.encoder.*, language_model.*]   # fnmatch on parameter names
    train.lr_mult: ["encoders.image.projector.*=10"]              # pattern=multiplier, first match wins

(In YAML, quote a pattern that starts with `*`.) Names are those of a model chunk's parameters (`model.named_parameters()` of the family's model:
`encoders.<modality>.*` and `language_model.*` for multimodal ones). Stage 1 of a vision-language
model (alignment) freezes the encoder and the language model and trains the projector; stage 2
starts from its checkpoint (`train.init_from`) with nothing frozen. Frozen parameters are left out of
DistributedDataParallel's buffers and the optimizer; a multiplier scales the peak and minimum of the
learning-rate schedule for its parameters (megatron-core's param-group max_lr / min_lr).

Patterns are checked across all ranks (with pipeline parallelism a pattern may match on one stage
only): one that matches nothing anywhere, or a run with nothing left to train, is a config error.
"""

from __future__ import annotations

import fnmatch

import torch

from megatron_mm.config import ConfigError, parse_lr_mults
from megatron_mm.runtime.device import compute_device
from megatron_mm.training.transforms import ModelTransform, apply_transforms, optimizer_overrides


class Freeze(ModelTransform):
    """train.freeze: parameters matching a pattern get no gradient."""

    def __init__(self, patterns: list[str]):
        self.patterns = list(patterns)

    def apply(self, chunks: list) -> None:
        matches = [0] * len(self.patterns)
        for chunk in chunks:
            for name, param in chunk.named_parameters():
                hits = [i for i, pattern in enumerate(self.patterns) if fnmatch.fnmatchcase(name, pattern)]
                for i in hits:
                    matches[i] += 1
                if hits:
                    param.requires_grad_(False)
        trainable = sum(p.numel() for chunk in chunks for p in chunk.parameters() if p.requires_grad)
        *matches, trainable = _summed_over_ranks([*matches, trainable])
        _check_matches(chunks, "train.freeze", "parameter", self.patterns, matches)
        if trainable == 0:
            raise ConfigError("train.freeze leaves no parameter to train")


class LrMultipliers(ModelTransform):
    """train.lr_mult: each trained parameter takes the first rule its name matches; a rule is one
    optimizer param group with the schedule's peak and minimum times its multiplier."""

    def __init__(self, entries: list[str]):
        self.rules = parse_lr_mults(entries)

    def apply(self, chunks: list) -> None:
        matches = [0] * len(self.rules)
        for chunk in chunks:
            for name, param in chunk.named_parameters():
                if not param.requires_grad:  # frozen: no learning rate
                    continue
                for i, (pattern, _) in enumerate(self.rules):
                    if fnmatch.fnmatchcase(name, pattern):
                        matches[i] += 1
                        setattr(param, _rule_attribute(i), True)
                        break
        _check_matches(chunks, "train.lr_mult", "trained (unfrozen) parameter",
                       [pattern for pattern, _ in self.rules], _summed_over_ranks(matches))

    def optimizer_overrides(self, optimizer_config) -> dict:
        from megatron.core.optimizer import ParamKey
        from megatron.core.optimizer_param_scheduler import ParamGroupOverride

        return {ParamKey(attr=_rule_attribute(i)): ParamGroupOverride(
                    max_lr=optimizer_config.lr * multiplier, min_lr=optimizer_config.min_lr * multiplier)
                for i, (_, multiplier) in enumerate(self.rules)}


def stage_transforms(freeze: list[str], lr_mults: list[str]) -> list[ModelTransform]:
    """The transforms a config's stage settings ask for, in the order they apply."""
    return [*([Freeze(freeze)] if freeze else []), *([LrMultipliers(lr_mults)] if lr_mults else [])]


def apply_stage(chunks: list, freeze: list[str], lr_mults: list[str]) -> None:
    """Freeze and tag the parameters of unwrapped model chunks (before DDP wraps them). Collective."""
    apply_transforms(chunks, stage_transforms(freeze, lr_mults))


def lr_overrides(lr_mults: list[str], optimizer_config) -> dict:
    """megatron-core optimizer config_overrides: its standard ones plus one param group per rule."""
    return optimizer_overrides(stage_transforms([], lr_mults), optimizer_config)


def _rule_attribute(index: int) -> str:
    return f"lr_mult_rule_{index}"


def _summed_over_ranks(counts: list[int]) -> list[float]:
    device = compute_device()
    total = torch.tensor(counts, dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
    return total.tolist()


def _check_matches(chunks: list, key: str, what: str, patterns: list[str], counts: list[float]) -> None:
    for pattern, count in zip(patterns, counts):
        if count == 0:
            raise ConfigError(f"{key} pattern {pattern!r} matches no {what} (names look like {_example_names(chunks)})")


def _example_names(chunks: list) -> str:
    names = [name for chunk in chunks for name, _ in chunk.named_parameters()]
    return ", ".join(names[:1] + names[-1:]) if names else "(none on this rank)"
