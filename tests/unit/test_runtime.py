"""The CPU compatibility layer, the gloo PP=2 guard and checkpoint discovery."""

import json

import pytest
import torch

from megatron_mm.checkpoint.dist_ckpt import find_latest_checkpoint
from megatron_mm.runtime import apply_cpu_compat, batch_p2p_comm_safe


def test_batched_p2p_is_refused_only_for_two_gloo_stages():
    assert not batch_p2p_comm_safe("gloo", 2)
    assert batch_p2p_comm_safe("gloo", 4)
    assert batch_p2p_comm_safe("gloo", 1)
    assert batch_p2p_comm_safe("nccl", 2)


cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the layer is applied only where CUDA is absent")


@cpu_only
def test_cuda_requests_land_on_cpu():
    apply_cpu_compat()
    assert torch.empty(3, device=torch.cuda.current_device()).device.type == "cpu"
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.ones(2).to("cuda").device.type == "cpu"
    assert torch.ones(2).cuda().device.type == "cpu"
    assert not torch.empty(2, pin_memory=True).is_pinned()
    assert torch.ones(2).type() == "torch.cuda.FloatTensor"  # what clip_grads.py compares against
    assert torch.ones(2).type(torch.float64).dtype == torch.float64


@cpu_only
def test_cuda_rng_is_the_cpu_generator():
    apply_cpu_compat()
    torch.cuda.manual_seed(7)
    state = torch.cuda.get_rng_state()
    a = torch.rand(4)
    torch.cuda.set_rng_state(state)
    assert torch.equal(a, torch.rand(4))


def _checkpoint(root, iteration, complete=True, suffix=""):
    path = root / f"iter_{iteration:07d}{suffix}"
    path.mkdir(parents=True)
    if complete:
        (path / "train_state.json").write_text(json.dumps({"iteration": iteration}))
    return path


def test_latest_skips_unfinished_saves(tmp_path):
    root = tmp_path / "checkpoints"
    assert find_latest_checkpoint(tmp_path) is None
    five = _checkpoint(root, 5)
    _checkpoint(root, 10, suffix=".tmp")  # a save that died before publishing
    (root / "latest").write_text("iter_0000005")
    assert find_latest_checkpoint(tmp_path) == five


def test_latest_falls_back_to_newest_complete(tmp_path):
    root = tmp_path / "checkpoints"
    _checkpoint(root, 5)
    eight = _checkpoint(root, 8)
    _checkpoint(root, 9, complete=False)
    (root / "latest").write_text("iter_0000012")  # names a checkpoint that is gone
    assert find_latest_checkpoint(tmp_path) == eight


@cpu_only
def test_cuda_requests_land_on_cpu_inside_custom_backward():
    """Activation recompute re-runs forward code inside an autograd.Function's backward."""
    apply_cpu_compat()

    class AddOnes(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x + torch.ones(2, device="cuda")

        @staticmethod
        def backward(ctx, grad):
            return grad * torch.full((2,), 3.0, device="cuda")

    x = torch.zeros(2, requires_grad=True)
    AddOnes.apply(x).sum().backward()
    assert torch.equal(x.grad, torch.full((2,), 3.0))
