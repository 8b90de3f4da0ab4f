"""Logits of the same tokens from transformers' own model and from ours (at any TP/PP/EP), for the
HF parity check (tools/check_hf_parity.py) and the conversion tests."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from megatron_mm.config import load_config
from megatron_mm.models.layers.backend import select_backend
from megatron_mm.runtime import destroy_distributed, init_distributed, set_seed, validate_layout
from megatron_mm.runtime.device import compute_device
from megatron_mm.runtime.layout import smallest_world_size
from megatron_mm.training.setup import build_from_checkpoint


def hf_model(hf_dir: str | Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    return model.eval()


@torch.no_grad()
def hf_logits(hf_dir: str | Path, tokens: torch.Tensor) -> torch.Tensor:
    return hf_model(hf_dir)(input_ids=tokens).logits.float()


def logit_difference(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[float, float]:
    """(max |ours - theirs|, that divided by max |theirs|): relative to the logits' scale, since
    elementwise ratios blow up where a logit is near zero."""
    diff = (ours.float() - theirs.float()).abs().max().item()
    return diff, diff / max(theirs.abs().max().item(), 1e-30)


def cross_entropy(logits: torch.Tensor, tokens: torch.Tensor) -> float:
    """Next-token loss of a batch, as transformers computes it from `labels=input_ids`."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1)).item()


def our_logits(checkpoint: str | Path, tokens: torch.Tensor, tp: int = 1, pp: int = 1, ep: int = 1,
               media: Optional[dict] = None, position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Our model's fp32 logits for `tokens` [batch, seq], unpadded vocabulary, on every rank.
    A multimodal model also takes its `media` tensors and, for M-RoPE, `position_ids` [3, batch, seq].

    Collective: every rank of a world of `smallest_world_size(tp, pp, ep)` calls it (a plain process
    is a world of one). Starts and ends megatron-core's parallel state itself.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
    from megatron.core.utils import unwrap_model

    checkpoint = Path(checkpoint)
    batch, seq = tokens.shape
    moe = tp > 1 and hasattr(load_config(checkpoint / "config.yaml").model, "num_experts")
    world = smallest_world_size(tp, pp, ep)
    cfg = load_config(checkpoint / "config.yaml", [
        f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.ep={ep}", "parallel.vpp=null",
        f"parallel.sequence_parallel={str(moe).lower()}", "parallel.distributed_optimizer=false",
        "train.precision=fp32", "train.recompute=none", "data.mock=true", f"data.seq_length={seq}",
        f"train.micro_batch_size={batch}", f"train.global_batch_size={batch * world // (tp * pp)}",
        "train.init_from=null", "train.resume=none",
    ])
    backend = select_backend(cfg.model.backend)
    validate_layout(cfg, world)
    init_distributed(tp, pp, None, 1, ep)
    try:
        set_seed(cfg.train.seed)
        model = build_from_checkpoint(cfg, backend, checkpoint, train=False).chunks
        for chunk in model:
            chunk.eval()
        device = compute_device()
        tokens_dev = tokens.to(device)
        if position_ids is None:
            positions = torch.arange(seq, device=device).unsqueeze(0).expand(batch, -1)
        else:
            positions = position_ids.to(device)
        media_dev = {key: value.to(device) for key, value in (media or {}).items()}

        def keep_logits(logits):
            full = gather_from_tensor_model_parallel_region(logits)
            return logits.new_zeros(()), torch.tensor(1), {"logits": full}  # padded logits are -inf

        def forward_step(data_iterator, chunk):
            module = unwrap_model(chunk)
            if not module.config.mtp_num_layers:
                return chunk(tokens_dev, positions, None, **media_dev), keep_logits
            # megatron-core's multi-token prediction needs labels, and given labels the model returns
            # its loss: take the main head's logits, the output layer's last call (the MTP heads' come
            # first), copied since the loss overwrites them in place.
            calls = []
            hook = (module.output_layer.register_forward_hook(lambda layer, args, out: calls.append(out[0].clone()))
                    if module.post_process else None)
            output = chunk(tokens_dev, positions, None, labels=tokens_dev)
            if hook is not None:
                hook.remove()
                output = calls[-1].transpose(0, 1)  # [s, b, v] -> [b, s, v]
            return output, keep_logits

        with torch.no_grad():
            reports = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter([None]), model=model, num_microbatches=1,
                seq_length=seq, micro_batch_size=batch, forward_only=True)
        vocab = cfg.model.padded_vocab_size()
        logits = torch.zeros(batch, seq, vocab, dtype=torch.float32, device=device)
        holder = (ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
                  and ps.get_data_parallel_rank() == 0)
        if holder:
            logits += reports[0]["logits"].float()
        torch.distributed.all_reduce(logits)  # exactly one rank adds non-zeros: an exact copy
        return logits[..., : cfg.model.vocab_size].cpu()
    finally:
        destroy_distributed()
