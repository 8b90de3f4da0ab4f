"""Training stages (training/stages.py): freeze patterns and per-module learning-rate multipliers.

Pattern handling is checked in this process on a plain torch module. The training checks build the
tiny LLaVA-style model through pretrain.setup (megatron-core DDP, optimizer and scheduler), which
needs torch.distributed and the CPU patches of runtime/cpu_compat.py; they run in a fresh Python
process (this file as a script) so that neither leaks into other tests.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_mm.config import ConfigError, load_config
from megatron_mm.runtime.layout import validate_layout
from megatron_mm.training.stages import apply_stage, lr_overrides, parse_lr_mults

TINY_LLAVA = Path(__file__).resolve().parents[2] / "examples" / "configs" / "tiny_llava.yaml"
STAGE1 = Path(__file__).resolve().parents[2] / "examples" / "configs" / "tiny_llava_stage1.yaml"
FREEZE = ["encoders.image.encoder.*"]
LR_MULT = ["encoders.image.projector.*=10"]
STEPS = 6


def _toy_model() -> torch.nn.Module:
    model = torch.nn.Module()
    model.encoder = torch.nn.Linear(4, 4)
    model.projector = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8))
    model.decoder = torch.nn.Linear(8, 8)
    return model


def test_lr_mult_syntax():
    assert parse_lr_mults(["a.*=10", "b=0.5", "x=y=2"]) == [("a.*", 10.0), ("b", 0.5), ("x=y", 2.0)]
    for bad in ["a.*", "=2", "a=", "a=ten", "a=0", "a=-1"]:
        with pytest.raises(ConfigError, match="is not pattern=multiplier"):
            parse_lr_mults([bad])


def test_bad_lr_mult_is_a_layout_error():
    with pytest.raises(ConfigError, match="'projector' is not pattern=multiplier"):
        validate_layout(load_config(TINY_LLAVA, ["train.lr_mult=[projector]"]), 1)


def test_freeze_matches_parameter_names_and_first_rule_wins():
    model = _toy_model()
    apply_stage([model], ["encoder.*", "projector.1.*"], ["projector.*=10", "*.weight=3"])
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"encoder.weight", "encoder.bias", "projector.1.weight", "projector.1.bias"}
    params = dict(model.named_parameters())
    assert hasattr(params["projector.0.weight"], "lr_mult_rule_0")
    assert not hasattr(params["projector.0.weight"], "lr_mult_rule_1")  # the first matching rule only
    assert hasattr(params["decoder.weight"], "lr_mult_rule_1") and not hasattr(params["decoder.bias"], "lr_mult_rule_1")
    assert not any(hasattr(params[name], "lr_mult_rule_0") for name in frozen)  # frozen: no learning rate


@pytest.mark.parametrize("freeze, lr_mults, message", [
    (["vision_model.*"], [], "train.freeze pattern 'vision_model.*' matches no parameter"),
    ([], ["decoder=2"], "train.lr_mult pattern 'decoder' matches no trained (unfrozen) parameter"),
    (["encoder.*"], ["encoder.*=2"],  # frozen parameters take no learning rate
     "train.lr_mult pattern 'encoder.*' matches no trained (unfrozen) parameter"),
    (["*"], [], "train.freeze leaves no parameter to train"),
])
def test_pattern_errors(freeze, lr_mults, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        apply_stage([_toy_model()], freeze, lr_mults)


def test_overrides_keep_megatron_cores_standard_ones():
    from megatron.core.optimizer import OptimizerConfig, get_standard_config_overrides

    config = OptimizerConfig(lr=1e-3, min_lr=1e-4, weight_decay=0.1)
    standard = get_standard_config_overrides(config)
    overrides = lr_overrides(["a.*=10", "b.*=0.5"], config)
    assert all(overrides[key] == value for key, value in standard.items())
    added = [value for key, value in overrides.items() if key not in standard]
    assert added == [{"max_lr": 1e-2, "min_lr": 1e-3}, {"max_lr": 5e-4, "min_lr": 5e-5}]


def test_stage1_example_freezes_encoder_and_language_model():
    cfg = load_config(STAGE1)
    assert cfg.model.family == load_config(TINY_LLAVA).model.family
    assert sorted(cfg.train.freeze) == ["encoders.image.encoder.*", "language_model.*"]
    validate_layout(cfg, 1)


def _run_training_checks() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1")
    result = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=300,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def training() -> dict:
    return _run_training_checks()


def test_frozen_parameters_do_not_move_and_get_no_gradient(training):
    frozen = training["frozen"]
    assert frozen and all(name.startswith("encoders.image.encoder.") for name in frozen)
    assert all(f["unchanged"] and f["no_grad"] for f in frozen.values()), frozen
    assert training["frozen_in_optimizer"] == 0


def test_trained_parameters_move(training):
    trained = training["trained"]
    assert any(n.startswith("encoders.image.projector.") for n in trained)
    assert any(n.startswith("language_model.") for n in trained)
    assert all(t["changed"] and t["has_grad"] for t in trained.values()), trained


def test_multiplied_groups_follow_the_schedule_times_the_multiplier(training):
    """Every optimizer step, through warm-up and cosine decay: projector groups at 10x the others."""
    steps = training["lrs"]
    assert len(steps) == STEPS
    assert len({round(s["base"], 12) for s in steps}) == STEPS  # the schedule does move (from 0 in warm-up)
    for step in steps:
        assert step["multiplied"] and step["others"], step
        for lr in step["multiplied"]:
            assert lr == pytest.approx(10 * step["base"], rel=1e-12), step
        for lr in step["others"]:
            assert lr == pytest.approx(step["base"], rel=1e-12), step
    assert training["projector_params_in_multiplied_groups"] == training["projector_params"] > 0


def _training_checks_main() -> None:
    """Runs in a fresh process: one-rank world, the tiny LLaVA model, a few optimizer steps."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from megatron_mm.training import loop as pretrain
    from megatron_mm.training.batches import MicroBatches

    overrides = [f"train.freeze=[{','.join(FREEZE)}]", f"train.lr_mult=[{','.join(LR_MULT)}]",
                 f"train.train_iters={STEPS}", "train.lr_warmup_iters=2", "train.lr_decay_style=cosine",
                 "train.resume=none", "train.save_interval=0"]
    cfg = load_config(TINY_LLAVA, overrides)
    trainer = pretrain.setup(cfg)
    (model,) = trainer.model
    params = dict(model.module.named_parameters())
    start = {name: p.detach().clone() for name, p in params.items()}
    projector = {id(p) for name, p in params.items() if name.startswith("encoders.image.projector.")}

    def group_lrs() -> dict:
        multiplied = [g for g in trainer.optimizer.param_groups if g["max_lr"] != cfg.train.lr]
        others = [g for g in trainer.optimizer.param_groups if g["max_lr"] == cfg.train.lr and g["params"]]
        return {"base": others[0]["lr"], "multiplied": [g["lr"] for g in multiplied],
                "others": [g["lr"] for g in others]}

    batches = MicroBatches(trainer.train_data, 0, cfg.train.micro_batch_size, 0, 1)
    lrs = []
    for _ in range(STEPS):
        lrs.append(group_lrs())  # the rates this step applies
        pretrain.train_step(trainer, batches)
    optimizer_params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    multiplied_params = [p for g in trainer.optimizer.param_groups if g["max_lr"] != cfg.train.lr for p in g["params"]]
    print(json.dumps({
        "frozen": {name: {"unchanged": torch.equal(start[name], p), "no_grad": p.grad is None and not hasattr(p, "main_grad")}
                   for name, p in params.items() if not p.requires_grad},
        "trained": {name: {"changed": not torch.equal(start[name], p), "has_grad": p.main_grad.abs().sum().item() > 0}
                    for name, p in params.items() if p.requires_grad},
        "frozen_in_optimizer": sum(not p.requires_grad for p in optimizer_params),
        "lrs": lrs,
        "projector_params": len(projector),
        "projector_params_in_multiplied_groups": sum(id(p) in projector for p in multiplied_params),
    }))


if __name__ == "__main__":
    _training_checks_main()
