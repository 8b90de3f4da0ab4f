"""Model family name -> the module that defines it. The only place that lists the families.

A family module defines CONFIG_CLASS (a DecoderConfig subclass: fields, TransformerConfig fields,
layer spec, HuggingFace mapping). A family kept outside this package joins with
`register_family(name, module)` before its config is read."""

from __future__ import annotations

import difflib
import importlib
import types

from megatron_mm.errors import ConfigError

FAMILIES = {
    "llama3": "megatron_mm.models.llama",
    "mistral": "megatron_mm.models.mistral",
    "qwen3": "megatron_mm.models.qwen3",
    "gemma3": "megatron_mm.models.gemma3",
    "qwen3_moe": "megatron_mm.models.qwen3_moe",
    "mixtral": "megatron_mm.models.mixtral",
    "deepseek_v3": "megatron_mm.models.deepseek",
    "llava": "megatron_mm.models.llava",
    "qwen2_vl": "megatron_mm.models.qwen2_vl",
    "qwen2_5_vl": "megatron_mm.models.qwen2_5_vl",
    "qwen2_vl_moe": "megatron_mm.models.qwen2_vl_moe",
    "qwen2_audio": "megatron_mm.models.qwen2_audio",
}


def register_family(name: str, module: types.ModuleType) -> None:
    """Make `model.family=name` (and its HuggingFace architectures) resolve to `module`."""
    if not hasattr(module, "CONFIG_CLASS"):
        raise TypeError(f"family module {module.__name__} defines no CONFIG_CLASS")
    FAMILIES[name] = module


def family_module(name: str):
    if name not in FAMILIES:
        close = difflib.get_close_matches(str(name), FAMILIES, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown model.family '{name}'{hint} (supported: {', '.join(FAMILIES)})")
    module = FAMILIES[name]
    return importlib.import_module(module) if isinstance(module, str) else module


def family_config_class(name: str):
    """The family's config dataclass (a DecoderConfig subclass)."""
    return family_module(name).CONFIG_CLASS


def family_for_hf_architecture(hf_config: dict):
    """The family config class that maps a HuggingFace config's `architectures` entry."""
    from megatron_mm.checkpoint.hf_rules import HFConversionError

    supported = {}
    for name in FAMILIES:
        config_class = family_config_class(name)
        for architecture in getattr(config_class, "HF_ARCHITECTURES", ()):
            supported[architecture] = config_class
    architectures = hf_config.get("architectures") or []
    for architecture in architectures:
        if architecture in supported:
            return supported[architecture]
    raise HFConversionError(
        f"unsupported architecture {architectures or hf_config.get('model_type')!r} "
        f"(supported: {', '.join(sorted(supported))})"
    )
