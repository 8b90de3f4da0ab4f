"""Config loading: YAML + typed overrides, unknown keys with the closest spelling, layout checks."""

from pathlib import Path

import pytest

from megatron_mm.config import ConfigError, load_config
from megatron_mm.models.llama import LlamaConfig
from megatron_mm.models.qwen3 import Qwen3Config
from megatron_mm.runtime.layout import validate_layout

CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "configs"
TINY = Path(__file__).resolve().parents[1] / "distributed" / "tiny_llama.yaml"


def test_yaml_and_overrides_are_typed():
    cfg = load_config(TINY, ["train.lr=3e-4", "parallel.tp=2", "parallel.sequence_parallel=true",
                             "data.blend=[0.3, a, 0.7, b]", "train.eval_interval=null"])
    assert isinstance(cfg.model, LlamaConfig)
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)  # YAML 1.1 reads 3e-4 as a string
    assert cfg.parallel.tp == 2 and cfg.parallel.sequence_parallel is True
    assert cfg.data.blend == ["0.3", "a", "0.7", "b"]
    assert cfg.train.eval_interval is None


@pytest.mark.parametrize("override, message", [
    ("parallel.tpp=2", "unknown key 'parallel.tpp'; did you mean 'parallel.tp'?"),
    ("trian.lr=1", "unknown section 'trian'; did you mean 'train'?"),
    ("model.num_layer=2", "did you mean 'model.num_layers'?"),
    ("parallel.tp=2.5", "parallel.tp must be int, got 2.5"),
    ("train.lr=fast", "train.lr must be float, got 'fast'"),
    ("parallel.sequence_parallel=1", "parallel.sequence_parallel must be bool"),
    ("train.recompute=most", "train.recompute='most' is not one of none, selective, full"),
    ("model.family=lama3", "unknown model.family 'lama3'; did you mean 'llama3'?"),
    ("lr=1", "override key 'lr' must be section.key"),
    ("train.lr", "is not of the form section.key=value"),
])
def test_bad_overrides_name_the_problem(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_family_decides_the_model_dataclass():
    cfg = load_config(CONFIGS / "qwen3_8b.yaml")
    assert isinstance(cfg.model, Qwen3Config)
    assert cfg.model.family_transformer_fields() == {"qk_layernorm": True}
    assert cfg.model.kv_channels == 128


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(TINY, ["parallel.pp=2", "train.lr=1e-3"])
    cfg.save(tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_example_config_loads(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.model.num_layers > 0


@pytest.mark.parametrize("world, overrides, message", [
    (3, ["parallel.tp=2"], "world size 3 is not divisible by tp*pp*cp = 2*1*1 = 2"),
    (8, ["parallel.tp=8"], "model.num_attention_heads=4 is not divisible by parallel.tp=8"),
    (4, ["parallel.tp=4"], "model.num_query_groups=2 is not divisible by parallel.tp=4"),
    (3, ["parallel.pp=3"], "model.num_layers=4 is not divisible by parallel.pp=3"),
    (4, ["parallel.pp=4", "parallel.vpp=2"], "model.num_layers=4 is not divisible by pp*vpp = 4*2"),
    (1, ["parallel.vpp=2"], "parallel.vpp needs parallel.pp >= 2"),
    (1, ["parallel.sequence_parallel=true"], "parallel.sequence_parallel needs parallel.tp >= 2"),
    (6, ["parallel.tp=2"], "train.global_batch_size=8 is not divisible by micro_batch_size*data_parallel = 2*3"),
    (2, ["parallel.cp=2"], "parallel.cp > 1 needs Transformer Engine"),
    (1, ["data.mock=false", "data.blend=[missing/corpus_text_document]", "data.tokenizer_model=x.model"],
     "data path not found: missing/corpus_text_document.bin/.idx"),
    (1, ["data.mock=false"], "data.blend is empty"),
    # experts are split ep ways and, within that, tp ways: 4 ranks cannot hold tp2 x pp2 x ep2
    (4, ["parallel.tp=2", "parallel.pp=2", "parallel.ep=2"], "ep*tp = 2*2 does not divide the 2 ranks of a pipeline stage"),
    (1, ["train.lr_warmup_iters=10", "train.train_iters=10"], "train.lr_warmup_iters=10 must be below the decay length 10"),
])
def test_layout_errors(world, overrides, message):
    cfg = load_config(TINY, overrides)
    with pytest.raises(ConfigError) as err:
        validate_layout(cfg, world)
    assert message in str(err.value)


def test_valid_layouts_pass():
    for world, overrides in [(1, []), (4, ["parallel.tp=2", "parallel.pp=2"]), (2, ["parallel.pp=2", "parallel.vpp=2"]),
                             (2, ["parallel.tp=2", "parallel.sequence_parallel=true"])]:
        validate_layout(load_config(TINY, overrides), world)
