"""Training stages as config over the one loop: freezing modules and per-module learning rates.

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

from megatron_mm.config import ConfigError


def parse_lr_mults(entries: list[str]) -> list[tuple[str, float]]:
    rules = []
    for entry in entries:
        pattern, sep, value = str(entry).rpartition("=")
        try:
            multiplier = float(value)
        except ValueError:
            multiplier = None
        if not sep or not pattern or multiplier is None or multiplier <= 0:
            raise ConfigError(f"train.lr_mult entry {entry!r} is not pattern=multiplier with a positive multiplier")
        rules.append((pattern, multiplier))
    return rules


def _rule_attribute(index: int) -> str:
    return f"lr_mult_rule_{index}"


def apply_stage(chunks: list, freeze: list[str], lr_mults: list[str]) -> None:
    """Freeze and tag the parameters of unwrapped model chunks (before DDP wraps them). Collective."""
    rules = parse_lr_mults(lr_mults)
    frozen_matches, rule_matches = [0] * len(freeze), [0] * len(rules)
    trainable = 0
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            hits = [i for i, pattern in enumerate(freeze) if fnmatch.fnmatchcase(name, pattern)]
            for i in hits:
                frozen_matches[i] += 1
            if hits:
                param.requires_grad_(False)
                continue
            trainable += param.numel()
            for i, (pattern, _) in enumerate(rules):
                if fnmatch.fnmatchcase(name, pattern):
                    rule_matches[i] += 1
                    setattr(param, _rule_attribute(i), True)
                    break
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"  # NCCL reduces CUDA tensors
    counts = torch.tensor([*frozen_matches, *rule_matches, trainable], dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(counts)
    named = [*(("train.freeze", p) for p in freeze), *(("train.lr_mult", p) for p, _ in rules)]
    for (key, pattern), count in zip(named, counts.tolist()):
        if count == 0:
            what = "parameter" if key == "train.freeze" else "trained (unfrozen) parameter"
            raise ConfigError(f"{key} pattern {pattern!r} matches no {what} (names look like "
                              f"{_example_names(chunks)})")
    if counts[-1] == 0:
        raise ConfigError("train.freeze leaves no parameter to train")


def lr_overrides(lr_mults: list[str], optimizer_config) -> dict:
    """megatron-core optimizer config_overrides: its standard ones (no weight decay on biases and
    norms) plus one param group per learning-rate rule."""
    from megatron.core.optimizer import ParamKey, get_standard_config_overrides
    from megatron.core.optimizer_param_scheduler import ParamGroupOverride

    overrides = dict(get_standard_config_overrides(optimizer_config) or {})
    for i, (_, multiplier) in enumerate(parse_lr_mults(lr_mults)):
        overrides[ParamKey(attr=_rule_attribute(i))] = ParamGroupOverride(
            max_lr=optimizer_config.lr * multiplier, min_lr=optimizer_config.min_lr * multiplier)
    return overrides


def _example_names(chunks: list) -> str:
    names = [name for chunk in chunks for name, _ in chunk.named_parameters()]
    return ", ".join(names[:1] + names[-1:]) if names else "(none on this rank)"
