"""The megatron-core passthroughs (megatron_settings.py): a field set in YAML reaches the built model,
its DDP wrapper and its optimizer; bad names, owned fields and bad values are one line naming the
problem (also from the entry point's dry run, exit code 2); Megatron-LM's argument names point to our
keys; uneven pipeline splits are checked before anything is built; context parallelism is refused.

The built-model check needs torch.distributed and the CPU patches: it runs in a fresh process (this
file as a script) so that neither leaks into other tests.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from megatron_mm import megatron_settings
from megatron_mm.config import ConfigError, load_config
from megatron_mm.models.layers.backend import select_backend
from megatron_mm.runtime.layout import validate_layout

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "distributed" / "tiny_llama.yaml"
TINY_DEEPSEEK = ROOT / "tests" / "distributed" / "tiny_deepseek.yaml"
TINY_LLAVA = ROOT / "examples" / "configs" / "tiny_llava.yaml"
PASSTHROUGH = {
    "model": {"megatron": {"cross_entropy_loss_fusion": True, "apply_rope_fusion": False}},
    "parallel": {"megatron": {"check_for_nan_in_grad": True}},
    "train": {"optimizer": "sgd", "megatron": {"sgd_momentum": 0.5, "main_params_dtype": "float32"}},
}


def _with_passthrough(path: Path) -> Path:
    raw = yaml.safe_load(TINY.read_text())
    for section, values in PASSTHROUGH.items():
        raw.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(raw))
    return path


def _run_entry(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "megatron_mm.pretrain", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)


def test_yaml_passthrough_reaches_the_built_model(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1")
    result = subprocess.run([sys.executable, __file__, str(_with_passthrough(tmp_path / "run.yaml"))],
                            capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    built = json.loads(result.stdout.strip().splitlines()[-1])
    assert built == {"model_config": [True, False], "decoder_config": True, "check_for_nan_in_grad": True,
                     "optimizer": "SGD", "momentum": 0.5}


@pytest.mark.parametrize("override, message", [
    ("model.megatron.cross_entropy_loss_fusoin=true", "unknown TransformerConfig field "
     "'model.megatron.cross_entropy_loss_fusoin'; did you mean 'model.megatron.cross_entropy_loss_fusion'?"),
    ("model.megatron.hidden_size=32", "model.megatron.hidden_size is set by model.hidden_size: use that key"),
])
def test_dry_run_bad_passthrough_is_one_line_exit_2(override, message):
    result = _run_entry("--config", str(TINY), "--dry-run", override)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {message}"]


@pytest.mark.parametrize("config", [TINY, TINY_LLAVA])
def test_context_parallel_is_refused_in_one_line(config):
    result = _run_entry("--config", str(config), "--dry-run", "--world-size", "2", "parallel.cp=2")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: parallel.cp > 1 needs Transformer Engine attention and a split of each sequence")


@pytest.mark.parametrize("overrides, message", [
    (["model.megatron.normalization=LayerNorm"], "model.megatron.normalization is set by model.family=llama3"),
    (["model.megatron.tensor_model_parallel_size=2"], "is set by parallel.tp: use that key"),
    (["model.megatron.micro_batch_size=2"], "model.megatron.micro_batch_size is set by train.micro_batch_size"),
    (["parallel.megatron.use_distributed_optimizer=true"], "is set by parallel.distributed_optimizer"),
    (["parallel.megatron.expert_tensor_parallel_size=1"],
     "parallel.megatron.expert_tensor_parallel_size is a TransformerConfig field: set "
     "model.megatron.expert_tensor_parallel_size"),
    (["model.megatron.pipeline_model_parallel_layout=Et|tL"], "split the pipeline with parallel.first_stage_layers"),
    (["model.megatron.cross_entropy_fusion_impl=fast"], "cross_entropy_fusion_impl='fast' is not one of native, te"),
    (["model.megatron.init_method=normal"], "model.megatron.init_method cannot be set from a config"),
    (["train.megatron.main_params_dtype=float33"], "must be a torch dtype name"),
    (["model.megatron.num_layers_in_first_pipeline_stage=1"], "is set by parallel.first_stage_layers"),
])
def test_bad_passthrough_names_the_problem(overrides, message):
    cfg = load_config(TINY, overrides)
    with pytest.raises(ConfigError) as err:
        megatron_settings.check_passthrough(cfg, select_backend("local"))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_passthrough_values_are_typed():
    cfg = load_config(TINY, ["train.precision=fp16", "train.megatron.initial_loss_scale=4096",
                             "train.megatron.main_grads_dtype=float32", "parallel.megatron.bucket_size=1000"])
    tconfig = cfg.model.transformer_config(cfg.parallel, cfg.train, select_backend("local"), batch_p2p_comm=False)
    optimizer = megatron_settings.optimizer_config(cfg, tconfig)
    assert tconfig.fp16 and tconfig.params_dtype == torch.float16 and optimizer.fp16
    assert optimizer.initial_loss_scale == 4096.0 and optimizer.main_grads_dtype == torch.float32
    assert megatron_settings.ddp_config(cfg).bucket_size == 1000


def test_mla_family_takes_mla_fields_and_uneven_stages():
    cfg = load_config(TINY_DEEPSEEK, ["model.num_layers=5", "parallel.pp=2", "parallel.first_stage_layers=3",
                                      "model.megatron.cache_mla_latents=true"])
    tconfig = cfg.model.transformer_config(cfg.parallel, cfg.train, select_backend("local"), batch_p2p_comm=False)
    assert type(tconfig).__name__ == "MLATransformerConfig" and tconfig.cache_mla_latents
    assert (tconfig.num_layers_in_first_pipeline_stage, tconfig.num_layers_in_last_pipeline_stage) == (3, None)


@pytest.mark.parametrize("override, message", [
    ("parallel.tensor_model_parallel_size=2", "unknown key 'parallel.tensor_model_parallel_size'; did you mean "
                                              "'parallel.tp'?"),
    ("train.decoder_first_pipeline_num_layers=3", "did you mean 'parallel.first_stage_layers'?"),
    ("model.micro_batch_size=2", "did you mean 'train.micro_batch_size'?"),
    ("model.megatron.a.b=1", "override key 'model.megatron.a.b' must be section.key"),
])
def test_megatron_lm_names_point_to_our_keys(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [override])
    assert message in str(err.value)


@pytest.mark.parametrize("world, overrides, message", [
    (1, ["parallel.first_stage_layers=3"], "parallel.first_stage_layers / last_stage_layers need parallel.pp >= 2"),
    (2, ["parallel.pp=2", "parallel.first_stage_layers=0"], "parallel.first_stage_layers=0 must be >= 1"),
    (2, ["parallel.pp=2", "parallel.first_stage_layers=2", "parallel.last_stage_layers=3"],
     "model.num_layers=4 with parallel.first_stage_layers=2, parallel.last_stage_layers=3 leaves -1 layers"),
    (3, ["parallel.pp=3", "parallel.first_stage_layers=1"], "leaves 3 layers, which do not split evenly over the 2"),
    (2, ["parallel.pp=2", "parallel.vpp=2", "parallel.first_stage_layers=3"],
     "parallel.first_stage_layers=3 is not divisible by parallel.vpp=2"),
])
def test_uneven_pipeline_errors(world, overrides, message):
    with pytest.raises(ConfigError) as err:
        validate_layout(load_config(TINY, overrides), world)
    assert message in str(err.value)


def test_uneven_pipeline_layouts_pass():
    for world, overrides in [(2, ["parallel.pp=2", "parallel.first_stage_layers=3"]),
                             (3, ["parallel.pp=3", "parallel.first_stage_layers=2", "parallel.last_stage_layers=1"]),
                             (2, ["parallel.pp=2", "parallel.last_stage_layers=1"])]:
        validate_layout(load_config(TINY, overrides), world)


def _built_model_main(config_path: str) -> None:
    """Runs in a fresh process: one-rank world, the model, DDP wrapper and optimizer of the config."""
    sys.path.insert(0, str(ROOT))
    from megatron_mm.training.setup import build_from_checkpoint, check_config, init_parallel

    cfg = load_config(config_path)
    _, backend = check_config(cfg, world_size=1)
    init_parallel(cfg)
    built = build_from_checkpoint(cfg, backend, train=True)
    chunk = built.chunks[0]
    model = chunk.module
    torch_optimizer = built.optimizer.optimizer
    print(json.dumps({
        "model_config": [model.config.cross_entropy_loss_fusion, model.config.apply_rope_fusion],
        "decoder_config": model.decoder.config.cross_entropy_loss_fusion,
        "check_for_nan_in_grad": chunk.ddp_config.check_for_nan_in_grad,
        "optimizer": type(torch_optimizer).__name__,
        "momentum": torch_optimizer.param_groups[0]["momentum"],
    }))


if __name__ == "__main__":
    _built_model_main(sys.argv[1])
