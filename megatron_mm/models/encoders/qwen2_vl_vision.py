"""The Qwen2-VL / Qwen2.5-VL vision encoder: native (dynamic) resolution, all images of a micro-batch
as one patch sequence, built from megatron-core TransformerLayers so tensor parallelism works.

Input: `pixel_values` [total_patches, channels * temporal_patch * patch * patch], each image's (or
video's) patches in merge-window order (the 2x2 patches that merge into one language embedding are
consecutive; data/qwen2_vl_processing.py writes them so), and `image_grid_thw` [n_images, 3] in
patches. Output: one row per merged 2x2 patch group, images in order, each in raster order of its
merged grid: the rows the language model's placeholders take.

- Rotary embedding: a patch's (row, column) rotate the first and second half of each head's rotary
  frequencies (2D RoPE), applied through megatron-core's own rotary path.
- Attention: each frame of each image attends only to itself. Qwen2.5-VL's windowed layers restrict it
  further to windows of `window_size` pixels; the sequence is reordered window by window once at the
  start (so every window, and every frame, is a contiguous run) and restored after the merger.
  The local spec gets these runs as an explicit mask (AttnMaskType.arbitrary); Transformer Engine as
  packed sequences (thd).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from megatron_mm.checkpoint.hf_rules import Rule, fused_gate_up, fused_qkv, same
from megatron_mm.models.encoders.common import encoder_config
from megatron_mm.models.layers import counts

VARIANTS = ("qwen2_vl", "qwen2_5_vl")


@dataclass
class Qwen2VLVisionConfig:
    variant: str = "qwen2_vl"  # qwen2_vl: LayerNorm + QuickGELU MLP | qwen2_5_vl: RMSNorm + SwiGLU, windows
    depth: int = 2
    hidden_size: int = 64
    num_heads: int = 4
    ffn_hidden_size: int = 256
    out_hidden_size: int = 64  # the language model's hidden size
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    norm_epsilon: float = 1e-6
    rotary_base: float = 10000.0
    window_size: int = 112  # qwen2_5_vl: attention window side, pixels
    fullatt_block_indexes: tuple[int, ...] = field(default_factory=tuple)  # qwen2_5_vl: layers without windows

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def merged_dim(self) -> int:
        return self.hidden_size * self.spatial_merge_size ** 2

    @property
    def windowed(self) -> bool:
        return self.variant == "qwen2_5_vl"

    def full_attention(self, layer: int) -> bool:
        return not self.windowed or layer in self.fullatt_block_indexes

    def validate(self, parallel) -> list[str]:
        problems = []
        if self.variant not in VARIANTS:
            problems.append(f"vision variant={self.variant!r} is not one of {', '.join(VARIANTS)}")
        if self.hidden_size % self.num_heads:
            problems.append(f"vision hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        elif self.head_dim % 4:
            problems.append(f"vision head dim {self.head_dim} is not divisible by 4 (2D rotary: half rows, half columns)")
        for name, value in (("num_heads", self.num_heads), ("ffn_hidden_size", self.ffn_hidden_size),
                            ("merged width hidden_size * spatial_merge_size^2", self.merged_dim)):
            if value % parallel.tp:
                problems.append(f"vision {name}={value} is not divisible by parallel.tp={parallel.tp}")
        if self.windowed:
            unit = self.patch_size * self.spatial_merge_size
            if self.window_size % unit:
                problems.append(f"vision window_size={self.window_size} is not a multiple of patch_size * "
                                f"spatial_merge_size={unit}")
            outside = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
            if outside:
                problems.append(f"vision fullatt_block_indexes {outside} are outside depth={self.depth}")
        return problems

    # ---- megatron-core configs and specs -------------------------------------------------------
    def encoder_transformer_config(self, language_config):
        """The encoder layers' TransformerConfig: the language config's precision and TP, this
        encoder's shape, no PP/SP/CP (the encoder runs whole on the first pipeline stage)."""
        from megatron.core.activations import quick_gelu

        return encoder_config(
            language_config,
            num_layers=self.depth,
            hidden_size=self.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size,
            num_attention_heads=self.num_heads,
            num_query_groups=self.num_heads,
            kv_channels=self.head_dim,
            layernorm_epsilon=self.norm_epsilon,
            normalization="RMSNorm" if self.windowed else "LayerNorm",
            gated_linear_unit=self.windowed,
            activation_func=F.silu if self.windowed else quick_gelu,
            masked_softmax_fusion=False,  # the fused kernels take causal/padding masks, not arbitrary ones
            rotary_interleaved=False,  # (no rotary fusion: per-token 2D frequencies, not positions 0..s-1)
        )

    def merger_transformer_config(self, language_config):
        """The merger's MLP: merged_dim -> merged_dim -> the language hidden size, GELU, biases."""
        return dataclasses.replace(
            self.encoder_transformer_config(language_config),
            hidden_size=language_config.hidden_size,
            ffn_hidden_size=self.merged_dim,
            gated_linear_unit=False,
            activation_func=F.gelu,
        )

    @staticmethod
    def layer_spec(backend):
        """Each frame (or window) attends only to itself: an explicit mask on the local backend, packed
        sequences (thd) where the backend has them (megatron-core then makes the mask type padding)."""
        from megatron.core.transformer.enums import AttnMaskType

        return backend.encoder_layer_spec(
            AttnMaskType.no_mask if backend.packed_sequence_attention else AttnMaskType.arbitrary)

    def counts(self, pixels: int) -> counts.EncoderCounts:
        """Tower and merger for one image of `pixels` pixels (one temporal patch); windowed layers
        attend within windows of window_size pixels (models/layers/counts.py)."""
        h, m, merge = self.hidden_size, self.merged_dim, self.spatial_merge_size
        normalization = "RMSNorm" if self.windowed else "LayerNorm"
        embeddings = pixels // (self.patch_size * merge) ** 2
        patches = embeddings * merge ** 2
        window = (self.window_size // self.patch_size) ** 2
        layers = [counts.encoder_layer(h, self.num_heads, self.ffn_hidden_size, self.windowed, normalization,
                                       window=None if self.full_attention(i) else window) for i in range(self.depth)]
        patch_embed = counts.linear(self.patch_dim, h)
        merger = counts.linear(m, m, bias=True) + counts.linear(m, self.out_hidden_size, bias=True)
        parameters = (patch_embed.parameters + sum(layer.parameters for layer in layers)
                      + counts.norm(h, normalization).parameters + merger.parameters)
        macs = patches * patch_embed.macs + counts.bidirectional_macs(patches, layers) + embeddings * merger.macs
        return counts.EncoderCounts(parameters, macs, embeddings)


# ---- patch bookkeeping (pure functions of the grids) ---------------------------------------------
def patch_coordinates(grids: list[tuple[int, int, int]], merge: int) -> torch.Tensor:
    """[total_patches, 2] (row, column) of every patch, in merge-window order, frames repeated."""
    coords = []
    for t, h, w in grids:
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        grid = torch.stack([rows, cols], dim=-1).reshape(h // merge, merge, w // merge, merge, 2)
        coords.append(grid.permute(0, 2, 1, 3, 4).reshape(-1, 2).repeat(t, 1))
    return torch.cat(coords)


def frame_ids(grids: list[tuple[int, int, int]], merge: int) -> torch.Tensor:
    """[total_merged] the frame (of all images' frames) each merged patch group belongs to."""
    sizes = torch.tensor([h * w // merge ** 2 for t, h, w in grids for _ in range(t)], dtype=torch.long)
    return torch.repeat_interleave(torch.arange(len(sizes)), sizes)


def window_ids(grids: list[tuple[int, int, int]], merge: int, window: int) -> torch.Tensor:
    """[total_merged] a distinct id per attention window (`window` merged groups a side, cut from
    each frame's top-left; edge windows are smaller)."""
    ids, first = [], 0
    for t, h, w in grids:
        rows, cols = h // merge, w // merge
        across, down = -(-cols // window), -(-rows // window)
        r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        per_frame = ((r // window) * across + c // window).flatten()
        frames = torch.arange(t).repeat_interleave(rows * cols)
        ids.append(first + frames * (down * across) + per_frame.repeat(t))
        first += t * down * across
    return torch.cat(ids)


def run_lengths(segments: torch.Tensor) -> torch.Tensor:
    """Cumulative lengths [runs + 1] (int32) of the runs of equal ids in a sequence."""
    _, counts = torch.unique_consecutive(segments, return_counts=True)
    return F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)


class Qwen2VLImageEncoder(MegatronModule):
    """patch embedding -> transformer layers with 2D RoPE -> 2x2 patch merger -> language width."""

    MEDIA_KEYS = ("pixel_values", "image_grid_thw")

    def __init__(self, vision: Qwen2VLVisionConfig, language_config, backend):
        from megatron.core.models.vision.multimodal_projector import MultimodalProjector
        from megatron.core.transformer.spec_utils import build_module

        config = vision.encoder_transformer_config(language_config)
        super().__init__(config=config)
        self.vision, self.backend = vision, backend
        # A Conv3d whose kernel equals its stride, on pre-cut patches: one matmul.
        self.patch_embed = torch.nn.Linear(vision.patch_dim, vision.hidden_size, bias=False,
                                           dtype=config.params_dtype)
        spec = vision.layer_spec(backend)
        self.layers = torch.nn.ModuleList(
            build_module(spec, config=config, layer_number=i + 1) for i in range(vision.depth))
        merger_config = vision.merger_transformer_config(language_config)
        self.merger = torch.nn.Module()
        self.merger.norm = build_module(backend.norm(), config=config, hidden_size=vision.hidden_size,
                                        eps=vision.norm_epsilon)
        self.merger.projector = MultimodalProjector(merger_config, backend.mlp_submodules(), "mlp", vision.merged_dim)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None) -> dict:
        # The default would save the layer list and the merger (plain containers) as replicated;
        # each megatron-core piece shards its own tensor-parallel weights instead.
        from megatron.core import parallel_state
        from megatron.core.transformer.utils import sharded_state_dict_default

        # The TP group is passed explicitly: without it megatron-core 0.16.1 gives plain modules'
        # tensors replica id 0 on every tensor-parallel rank, and loading refuses two writers.
        tp_group = parallel_state.get_tensor_model_parallel_group()
        parts = {"patch_embed": self.patch_embed, "merger.norm": self.merger.norm,
                 "merger.projector": self.merger.projector,
                 **{f"layers.{i}": layer for i, layer in enumerate(self.layers)}}
        state = {}
        for name, module in parts.items():
            state.update(sharded_state_dict_default(module, f"{prefix}{name}.", sharded_offsets, metadata, tp_group))
        return state

    def rotary_frequencies(self, coords: torch.Tensor) -> torch.Tensor:
        """[n, 1, 1, head_dim] angles: rows turn the first quarter of each half, columns the second."""
        quarter = self.vision.head_dim // 4
        inv_freq = 1.0 / self.vision.rotary_base ** (torch.arange(quarter, dtype=torch.float32) / quarter)
        angles = (coords.to(torch.float32).unsqueeze(-1) * inv_freq).flatten(1)  # [n, rows | columns]
        return torch.cat([angles, angles], dim=-1)[:, None, None, :]

    def attention_runs(self, segments: torch.Tensor, device) -> dict:
        """The keyword arguments that confine each patch's attention to its segment's run."""
        if self.backend.packed_sequence_attention:
            from megatron.core.packed_seq_params import PackedSeqParams

            bounds = run_lengths(segments).to(device)
            longest = int((bounds[1:] - bounds[:-1]).max())
            return {"attention_mask": None, "packed_seq_params": PackedSeqParams(
                qkv_format="thd", cu_seqlens_q=bounds, cu_seqlens_kv=bounds, max_seqlen_q=longest,
                max_seqlen_kv=longest)}
        return {"attention_mask": (segments[:, None] != segments[None, :]).to(device)[None, None]}

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        vision = self.vision
        grids = [tuple(int(v) for v in grid) for grid in image_grid_thw.tolist()]
        merge, group = vision.spatial_merge_size, vision.spatial_merge_size ** 2
        device = pixel_values.device
        hidden = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))
        rotary = self.rotary_frequencies(patch_coordinates(grids, merge)).to(device)

        frames = frame_ids(grids, merge)
        order, windowed = None, None
        if vision.windowed:
            windows = window_ids(grids, merge, vision.window_size // (merge * vision.patch_size))
            # Windows lie inside frames, so sorting by window keeps frames contiguous too.
            order = torch.argsort(windows, stable=True)
            frames, windows = frames[order], windows[order]
            patch_order = (order[:, None] * group + torch.arange(group)).flatten().to(device)
            hidden, rotary = hidden[patch_order], rotary[patch_order]
            windowed = self.attention_runs(windows.repeat_interleave(group), device)
        full = self.attention_runs(frames.repeat_interleave(group), device)

        hidden = hidden.unsqueeze(1)  # [s, b=1, h]
        for index, layer in enumerate(self.layers):
            runs = full if vision.full_attention(index) else windowed
            hidden, _ = layer(hidden, rotary_pos_emb=rotary, **runs)

        merged = self.merger.norm(hidden.squeeze(1)).reshape(-1, vision.merged_dim)
        merged = self.merger.projector(merged)
        if order is not None:
            merged = merged[torch.argsort(order).to(device)]
        return merged


# ---- HuggingFace mapping ---------------------------------------------------------------------
def _joined(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def visual_hf_rules(vision: Qwen2VLVisionConfig, ours: str = "encoders.image", hf: str = "visual") -> list[Rule]:
    """Our encoder's tensors (under `ours`) from a HuggingFace Qwen2(.5)-VL visual tower (under `hf`:
    `visual` in saved checkpoints, `model.visual` in a live model's state dict)."""
    o, h = (lambda name: _joined(ours, name)), (lambda name: _joined(hf, name))
    heads = vision.num_heads

    def unfused_qkv(ours_name: str, hf_name: str) -> Rule:
        # HuggingFace's qkv is [all q; all k; all v]; ours interleaves q, k, v per head.
        per_head = fused_qkv(ours_name, "q", "k", "v", heads, heads, vision.head_dim)
        return Rule(ours_name, (hf_name,), lambda ts: per_head.to_ours(list(ts[0].chunk(3))),
                    lambda t: [torch.cat(per_head.to_hf(t))])

    shape = (vision.hidden_size, vision.in_channels, vision.temporal_patch_size, vision.patch_size, vision.patch_size)
    rules = [Rule(o("patch_embed.weight"), (h("patch_embed.proj.weight"),),
                  lambda ts: ts[0].reshape(ts[0].shape[0], -1), lambda t: [t.reshape(shape)])]
    norm_tensors = ("weight",) if vision.windowed else ("weight", "bias")
    for i in range(vision.depth):
        layer, block = o(f"layers.{i}"), h(f"blocks.{i}")
        rules += [same(f"{layer}.input_layernorm.{t}", f"{block}.norm1.{t}") for t in norm_tensors]
        rules += [same(f"{layer}.pre_mlp_layernorm.{t}", f"{block}.norm2.{t}") for t in norm_tensors]
        for t in ("weight", "bias"):
            rules += [unfused_qkv(f"{layer}.self_attention.linear_qkv.{t}", f"{block}.attn.qkv.{t}"),
                      same(f"{layer}.self_attention.linear_proj.{t}", f"{block}.attn.proj.{t}")]
            if vision.windowed:
                rules += [fused_gate_up(f"{layer}.mlp.linear_fc1.{t}", f"{block}.mlp.gate_proj.{t}",
                                        f"{block}.mlp.up_proj.{t}"),
                          same(f"{layer}.mlp.linear_fc2.{t}", f"{block}.mlp.down_proj.{t}")]
            else:
                rules += [same(f"{layer}.mlp.linear_fc1.{t}", f"{block}.mlp.fc1.{t}"),
                          same(f"{layer}.mlp.linear_fc2.{t}", f"{block}.mlp.fc2.{t}")]
    rules += [same(o(f"merger.norm.{t}"), h(f"merger.ln_q.{t}")) for t in norm_tensors]
    for t in ("weight", "bias"):
        rules += [same(o(f"merger.projector.encoder.linear_fc1.{t}"), h(f"merger.mlp.0.{t}")),
                  same(o(f"merger.projector.encoder.linear_fc2.{t}"), h(f"merger.mlp.2.{t}"))]
    return rules


def vision_config_from_hf(hf_vision: dict, variant: str, out_hidden_size: int, problems: list[str]) -> Qwen2VLVisionConfig:
    """Our vision config from a transformers Qwen2VLVisionConfig / Qwen2_5_VLVisionConfig dict."""
    expected_act = "silu" if variant == "qwen2_5_vl" else "quick_gelu"
    if hf_vision.get("hidden_act", expected_act) != expected_act:
        problems.append(f"vision hidden_act={hf_vision.get('hidden_act')!r} (only {expected_act!r} is supported)")
    rope = hf_vision.get("rope_parameters") or {}
    if rope.get("rope_type", "axial") != "axial":
        problems.append(f"vision rope_type={rope.get('rope_type')!r} (only 'axial' is supported)")
    if variant == "qwen2_5_vl":
        width, ffn = hf_vision["hidden_size"], hf_vision["intermediate_size"]
        out = hf_vision.get("out_hidden_size", out_hidden_size)
    else:
        width = hf_vision["embed_dim"]
        ffn = int(width * hf_vision.get("mlp_ratio", 4))
        out = hf_vision.get("hidden_size", out_hidden_size)
    if out != out_hidden_size:
        problems.append(f"vision output width {out} differs from the language hidden_size {out_hidden_size}")
    return Qwen2VLVisionConfig(
        variant=variant,
        depth=hf_vision["depth"],
        hidden_size=width,
        num_heads=hf_vision["num_heads"],
        ffn_hidden_size=ffn,
        out_hidden_size=out_hidden_size,
        patch_size=hf_vision.get("patch_size", 14),
        temporal_patch_size=hf_vision.get("temporal_patch_size", 2),
        spatial_merge_size=hf_vision.get("spatial_merge_size", 2),
        in_channels=hf_vision.get("in_channels", 3),
        rotary_base=float(rope.get("rope_theta", 10000.0)),
        window_size=hf_vision.get("window_size", 112),
        fullatt_block_indexes=tuple(hf_vision.get("fullatt_block_indexes", ())) if variant == "qwen2_5_vl" else (),
    )


def vision_config_to_hf(vision: Qwen2VLVisionConfig) -> dict:
    fields = dict(
        depth=vision.depth,
        num_heads=vision.num_heads,
        patch_size=vision.patch_size,
        temporal_patch_size=vision.temporal_patch_size,
        spatial_merge_size=vision.spatial_merge_size,
        in_channels=vision.in_channels,
        rope_parameters={"rope_theta": vision.rotary_base, "rope_type": "axial"},
    )
    if vision.windowed:
        return {**fields, "model_type": "qwen2_5_vl_vision", "hidden_size": vision.hidden_size,
                "intermediate_size": vision.ffn_hidden_size, "out_hidden_size": vision.out_hidden_size,
                "hidden_act": "silu", "window_size": vision.window_size,
                "fullatt_block_indexes": list(vision.fullatt_block_indexes)}
    if vision.ffn_hidden_size % vision.hidden_size:
        raise ValueError(f"Qwen2-VL's vision MLP width is a multiple of its hidden size; "
                         f"{vision.ffn_hidden_size} is not one of {vision.hidden_size}")
    return {**fields, "model_type": "qwen2_vl_vision", "embed_dim": vision.hidden_size,
            "mlp_ratio": vision.ffn_hidden_size // vision.hidden_size, "hidden_size": vision.out_hidden_size,
            "hidden_act": "quick_gelu"}
