"""Model family name -> the module that defines it. The only place that lists the families."""

from __future__ import annotations

import difflib
import importlib

FAMILIES = {
    "llama3": "megatron_mm.models.llama",
    "mistral": "megatron_mm.models.mistral",
    "qwen3": "megatron_mm.models.qwen3",
    "gemma3": "megatron_mm.models.gemma3",
    "qwen3_moe": "megatron_mm.models.qwen3_moe",
    "mixtral": "megatron_mm.models.mixtral",
    "deepseek_v3": "megatron_mm.models.deepseek",
}


def family_module(name: str):
    if name not in FAMILIES:
        from megatron_mm.config import ConfigError

        close = difflib.get_close_matches(str(name), FAMILIES, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown model.family '{name}'{hint} (supported: {', '.join(FAMILIES)})")
    return importlib.import_module(FAMILIES[name])


def family_config_class(name: str):
    """The family's config dataclass (a DecoderConfig subclass)."""
    return family_module(name).CONFIG_CLASS
