"""Fixed-resolution vision encoders (CLIP and SigLIP ViTs) and the projectors from their width into
the language model's: MLP / affine (LLaVA) and a learned-query resampler. All megatron-core modules
(CLIPViTModel, MultimodalProjector, TransformerBlock with CrossAttention); MegatronModules, so
that dist-checkpoints shard their tensor-parallel weights.

megatron-core 0.16.1's pieces are used as they are, with two CPU-side corrections:
- its local ViT layer spec uses a causal mask; a ViT attends both ways (the TE spec says no_mask),
  so the local backend (models/layers/backend.py) uses no_mask too and both compute the same encoder;
- without Transformer Engine, CLIPViTModel's default norms are torch.nn.LayerNorm, which
  build_module cannot construct (it passes config=); VisionEncoder swaps in megatron-core's
  WrappedTorchNorm (a LayerNorm taking the config).

CLIP: class token, conv without bias, a LayerNorm before the layers, quick GELU. SigLIP: no class
token, conv with bias, a LayerNorm after the layers, tanh-approximated GELU. `num_layers` is the
number of layers built and run: a LLaVA model that reads the hidden states of an inner layer builds
only the layers up to it (`layers_up_to`), and then has no final norm either.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.models.vision.multimodal_projector import MultimodalProjector
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_block import TransformerBlock

from megatron_mm.checkpoint.hf_rules import Rule, fused_qkv, same
from megatron_mm.models.encoders.common import AffineProjectorLinear, encoder_config
from megatron_mm.models.layers import counts

ENCODER_TYPES = ("clip", "siglip")
PROJECTOR_TYPES = ("mlp", "affine", "resampler")
ACTIVATIONS = ("quick_gelu", "gelu_tanh", "gelu")
DEFAULT_ACTIVATION = {"clip": "quick_gelu", "siglip": "gelu_tanh"}
# transformers' hidden_act names -> ours
HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                  "gelu": "gelu"}


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(x, approximate="tanh")


def activation_function(name: str):
    from megatron.core.activations import quick_gelu

    return {"quick_gelu": quick_gelu, "gelu_tanh": gelu_tanh, "gelu": torch.nn.functional.gelu}[name]


@dataclass
class VisionEncoderConfig:
    image_size: int = 32  # square images, pixels
    patch_size: int = 8
    hidden_size: int = 64  # ViT width
    num_layers: int = 2  # layers built and run
    num_attention_heads: int = 4
    ffn_hidden_size: int = 256
    norm_epsilon: float = 1e-5
    projector_ffn_hidden_size: int = 128  # hidden width of the 2-layer MLP projector
    projector_type: str = "mlp"  # mlp (LLaVA-1.5) | affine | resampler
    encoder_type: str = "clip"  # clip | siglip
    activation: str = ""  # quick_gelu | gelu_tanh | gelu; empty: the encoder type's own
    post_layernorm: bool = True  # SigLIP's norm after the layers (LLaVA reads the states before it)
    # resampler: learned queries cross-attending to the encoder's tokens, a fixed count per image
    resampler_num_queries: int = 16
    resampler_num_layers: int = 1
    resampler_num_attention_heads: int = 4
    resampler_ffn_hidden_size: int = 256

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def has_class_token(self) -> bool:
        return self.encoder_type == "clip"

    @property
    def activation_name(self) -> str:
        return self.activation or DEFAULT_ACTIVATION.get(self.encoder_type, "")

    @property
    def num_image_embeddings(self) -> int:
        """Embeddings one image contributes to the language sequence (class token dropped)."""
        return self.resampler_num_queries if self.projector_type == "resampler" else self.num_patches

    @staticmethod
    def layers_up_to(feature_layer: int, total_layers: int) -> int:
        """Layers to run so that the output is hidden state `feature_layer` of a `total_layers`
        tower, counted as transformers does: state 0 enters layer 0, state i leaves layer i-1, and
        negative indices count from the last state (-1 = the last layer's output)."""
        layers = feature_layer if feature_layer >= 0 else total_layers + 1 + feature_layer
        if not 1 <= layers <= total_layers:
            raise ValueError(f"feature layer {feature_layer} of a {total_layers}-layer encoder runs no layer")
        return layers

    def counts(self, language_hidden_size: int) -> counts.EncoderCounts:
        """ViT and projector per image: the layers over its patches (and CLIP's class token), the
        projector over the patches or, for the resampler, its queries (models/layers/counts.py)."""
        h, patches, clip = self.hidden_size, self.num_patches, self.has_class_token
        tokens = patches + int(clip)
        patch_embed = counts.linear(3 * self.patch_size ** 2, h, bias=not clip)  # CLIP's convolution has no bias
        layers = [counts.encoder_layer(h, self.num_attention_heads, self.ffn_hidden_size, False, "LayerNorm")
                  ] * self.num_layers
        layer_norm = counts.norm(h, "LayerNorm").parameters
        parameters = (patch_embed.parameters + tokens * h + sum(layer.parameters for layer in layers)
                      + (h + layer_norm if clip else 0)  # class token, norm before the layers
                      + (layer_norm if self.post_layernorm else 0))
        macs = patches * patch_embed.macs + counts.bidirectional_macs(tokens, layers)
        if self.projector_type == "resampler":
            resampler = (self.resampler_num_queries, h, self.resampler_ffn_hidden_size, self.resampler_num_layers)
            parameters += counts.resampler_parameters(*resampler, language_hidden_size)
            macs += (counts.resampler_macs(*resampler, context=patches)
                     + self.resampler_num_queries * h * language_hidden_size)
        else:
            projector = (counts.linear(h, language_hidden_size, bias=True) if self.projector_type == "affine" else
                         counts.linear(h, self.projector_ffn_hidden_size, bias=True)
                         + counts.linear(self.projector_ffn_hidden_size, language_hidden_size, bias=True))
            parameters += projector.parameters
            macs += patches * projector.macs
        return counts.EncoderCounts(parameters, macs, self.num_image_embeddings)

    def validate(self, parallel) -> list[str]:
        problems = []
        if self.encoder_type not in ENCODER_TYPES:
            problems.append(f"vision encoder_type={self.encoder_type!r} is not one of {', '.join(ENCODER_TYPES)}")
        if self.activation_name not in ACTIVATIONS:
            problems.append(f"vision activation={self.activation!r} is not one of {', '.join(ACTIVATIONS)}")
        if self.projector_type not in PROJECTOR_TYPES:
            problems.append(f"vision projector_type={self.projector_type!r} is not one of {', '.join(PROJECTOR_TYPES)}")
        # The patch convolution drops a remainder (SigLIP-so400m: 384px, 14px patches -> 27x27)
        if self.image_size < self.patch_size:
            problems.append(f"vision image_size={self.image_size} is smaller than patch_size={self.patch_size}")
        if self.num_layers < 1:
            problems.append(f"vision num_layers={self.num_layers}: the encoder needs at least one layer")
        widths = [("", self.hidden_size, self.num_attention_heads)]
        divisible = [("num_attention_heads", self.num_attention_heads), ("ffn_hidden_size", self.ffn_hidden_size)]
        if self.projector_type == "mlp":
            divisible.append(("projector_ffn_hidden_size", self.projector_ffn_hidden_size))
        if self.projector_type == "resampler":
            widths.append(("resampler_", self.hidden_size, self.resampler_num_attention_heads))
            divisible += [("resampler_num_attention_heads", self.resampler_num_attention_heads),
                          ("resampler_ffn_hidden_size", self.resampler_ffn_hidden_size)]
            if self.resampler_num_queries < 1 or self.resampler_num_layers < 1:
                problems.append("vision resampler_num_queries and resampler_num_layers must be positive")
        for prefix, width, heads in widths:
            if width % heads:
                problems.append(f"vision hidden_size={width} is not divisible by its "
                                f"{prefix}num_attention_heads={heads}")
        for name, value in divisible:
            if value % parallel.tp:
                problems.append(f"vision {name}={value} is not divisible by parallel.tp={parallel.tp}")
        return problems

    # ---- megatron-core configs and specs ---------------------------------------------------------
    def _encoder_side_config(self, language_config, **fields):
        """An encoder-side config at the ViT's width (LayerNorm, plain MLP)."""
        return encoder_config(language_config, hidden_size=self.hidden_size, layernorm_epsilon=self.norm_epsilon,
                              normalization="LayerNorm", gated_linear_unit=False, **fields)

    def encoder_transformer_config(self, language_config):
        """The ViT's TransformerConfig."""
        config = self._encoder_side_config(
            language_config,
            num_layers=self.num_layers,
            ffn_hidden_size=self.ffn_hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_attention_heads,
            kv_channels=self.hidden_size // self.num_attention_heads,
            activation_func=activation_function(self.activation_name),
        )
        config.vision_model_type = self.encoder_type  # read by VisionEncoder (and megatron-core's LLaVAModel)
        config.vision_post_layernorm = self.post_layernorm  # read by VisionEncoder
        return config

    def projector_transformer_config(self, language_config):
        """The MLP projector maps ViT width -> ffn -> the language model's hidden size."""
        return encoder_config(language_config, ffn_hidden_size=self.projector_ffn_hidden_size,
                              gated_linear_unit=False, activation_func=torch.nn.functional.gelu)

    def resampler_transformer_config(self, language_config):
        """The resampler's layers work at the ViT's width; only its output layer reaches the language's."""
        return self._encoder_side_config(
            language_config,
            num_layers=self.resampler_num_layers,
            ffn_hidden_size=self.resampler_ffn_hidden_size,
            num_attention_heads=self.resampler_num_attention_heads,
            num_query_groups=self.resampler_num_attention_heads,
            kv_channels=self.hidden_size // self.resampler_num_attention_heads,
            activation_func=torch.nn.functional.gelu,
        )

    def projector_spec(self, backend):
        if self.projector_type == "affine":
            return MLPSubmodules(linear_fc1=AffineProjectorLinear)
        return backend.mlp_submodules()


def vision_encoder_class():
    """CLIPViTModel building the encoder its config names (`vision_model_type`: clip or siglip,
    `vision_post_layernorm`), its norms the backend's (`norm`; megatron-core's default is
    torch.nn.LayerNorm without TE, which build_module cannot construct)."""
    from megatron.core.models.vision import clip_vit_model
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    class VisionEncoder(clip_vit_model.CLIPViTModel):
        def __init__(self, transformer_config, transformer_layer_spec, norm=WrappedTorchNorm, **kwargs):
            subtype = getattr(transformer_config, "vision_model_type", "clip")
            kwargs.setdefault("ln_pre_impl", norm)
            kwargs.setdefault("ln_post_impl", norm if getattr(transformer_config, "vision_post_layernorm", True)
                              else IdentityOp)
            if subtype == "siglip":
                kwargs.setdefault("add_class_token", False)
                kwargs.setdefault("class_token_len", 0)
            super().__init__(transformer_config, transformer_layer_spec, model_subtype=subtype, **kwargs)

    return VisionEncoder


class ResamplerProjector(MegatronModule):
    """Learned queries cross-attend to each image's encoder tokens (Perceiver-resampler / Q-Former
    style): [n_images, tokens, vision hidden] -> [n_images * num_queries, language hidden], the
    same count whatever the number of patches. Layers at the ViT's width (megatron-core
    TransformerBlock of cross-attention layers, final norm included), then a column-parallel linear
    gathered to the language width."""

    def __init__(self, vision: VisionEncoderConfig, language_config, backend):
        config = vision.resampler_transformer_config(language_config)
        super().__init__(config=config)
        self.queries = torch.nn.Parameter(torch.empty(vision.resampler_num_queries, vision.hidden_size,
                                                      dtype=config.params_dtype))
        if config.perform_initialization:
            config.init_method(self.queries)
        # The encoder's tokens (CLIP's are not normalised at the end) enter every layer's keys/values.
        self.context_norm = build_module(backend.norm(), config=config, hidden_size=vision.hidden_size,
                                         eps=config.layernorm_epsilon)
        self.block = TransformerBlock(config, backend.cross_attention_layer_spec(), pre_process=True, post_process=True)
        self.output = ColumnParallelLinear(vision.hidden_size, language_config.hidden_size, config=config,
                                           init_method=config.init_method, bias=True, gather_output=True)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        images = features.shape[0]
        context = self.context_norm(features).transpose(0, 1).contiguous()  # [tokens, n, h]
        queries = self.queries.unsqueeze(1).expand(-1, images, -1).contiguous()  # [q, n, h]
        hidden = self.block(queries, attention_mask=None, context=context, context_mask=None)
        output, _ = self.output(hidden.transpose(0, 1).reshape(-1, hidden.shape[-1]))
        return output


def build_projector(vision: VisionEncoderConfig, language_config, backend) -> torch.nn.Module:
    if vision.projector_type == "resampler":
        return ResamplerProjector(vision, language_config, backend)
    return MultimodalProjector(vision.projector_transformer_config(language_config), vision.projector_spec(backend),
                               vision.projector_type, vision.hidden_size)


class ImageTower(MegatronModule):
    """Encoder -> projector for fixed-size images: `images` [n, 3, H, W] -> [n * num_image_embeddings,
    language hidden] (CLIP's class token dropped), rows image by image."""

    MEDIA_KEYS = ("images",)

    def __init__(self, vision: VisionEncoderConfig, language_config, backend):
        tower_config = vision.encoder_transformer_config(language_config)
        super().__init__(config=tower_config)
        self.encoder = vision_encoder_class()(
            tower_config, backend.vit_layer_spec(), norm=backend.norm(),
            patch_dim=vision.patch_size, img_h=vision.image_size, img_w=vision.image_size,
        )
        self.projector = build_projector(vision, language_config, backend)
        self.resampled = vision.projector_type == "resampler"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.encoder(images)[:, self.encoder.class_token_len if self.encoder.add_class_token else 0:]
        if self.resampled:
            return self.projector(features)
        return self.projector(features.reshape(-1, features.shape[-1]))


# ---- HuggingFace CLIPVisionModel / SiglipVisionModel -----------------------------------------------
def _joined(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def vision_config_from_hf(hf_vision: dict, num_layers: int, problems: list[str]) -> VisionEncoderConfig:
    """Our encoder from a transformers CLIPVisionConfig / SiglipVisionConfig dict, running its first
    `num_layers` layers (the final norm only when all run); problems collects what cannot be
    represented."""
    encoder_type = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}.get(hf_vision.get("model_type"))
    if encoder_type is None:
        problems.append(f"vision model_type={hf_vision.get('model_type')!r} (only CLIP and SigLIP towers)")
        encoder_type = "clip"
    act = hf_vision.get("hidden_act", "quick_gelu" if encoder_type == "clip" else "gelu_pytorch_tanh")
    if act not in HF_ACTIVATIONS:
        problems.append(f"vision hidden_act={act!r}")
    if hf_vision.get("num_channels", 3) != 3:
        problems.append(f"vision num_channels={hf_vision['num_channels']}")
    activation = HF_ACTIVATIONS.get(act, "")
    return VisionEncoderConfig(
        image_size=hf_vision["image_size"],
        patch_size=hf_vision["patch_size"],
        hidden_size=hf_vision["hidden_size"],
        num_layers=num_layers,
        num_attention_heads=hf_vision["num_attention_heads"],
        ffn_hidden_size=hf_vision["intermediate_size"],
        norm_epsilon=hf_vision.get("layer_norm_eps", 1e-5 if encoder_type == "clip" else 1e-6),
        encoder_type=encoder_type,
        activation="" if activation == DEFAULT_ACTIVATION[encoder_type] else activation,
        post_layernorm=num_layers == hf_vision["num_hidden_layers"],
    )


def vision_config_to_hf(vision: VisionEncoderConfig, num_hidden_layers: int) -> dict:
    """The transformers vision config of a `num_hidden_layers` tower whose first layers are ours."""
    act = {v: k for k, v in HF_ACTIVATIONS.items() if k != "gelu_new"}[vision.activation_name]
    return {
        "model_type": f"{vision.encoder_type}_vision_model",
        "hidden_size": vision.hidden_size,
        "intermediate_size": vision.ffn_hidden_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": vision.num_attention_heads,
        "image_size": vision.image_size,
        "patch_size": vision.patch_size,
        "hidden_act": act,
        "layer_norm_eps": vision.norm_epsilon,
    }


def vision_tower_hf_rules(vision: VisionEncoderConfig, ours: str, hf: str) -> list[Rule]:
    """Our VisionEncoder's tensors (under `ours`) from a transformers CLIP / SigLIP vision tower
    (under `hf`), for the layers we run. megatron-core keeps CLIP's class embedding as [1, 1, h] and
    q/k/v fused per head."""
    o, h = (lambda name: _joined(ours, name)), (lambda name: _joined(hf, name))
    heads, head_dim = vision.num_attention_heads, vision.hidden_size // vision.num_attention_heads
    rules = [same(o("conv1.weight"), h("embeddings.patch_embedding.weight")),
             same(o("position_embeddings.weight"), h("embeddings.position_embedding.weight"))]
    if vision.encoder_type == "clip":
        rules += [Rule(o("class_token"), (h("embeddings.class_embedding"),),
                       lambda ts: ts[0].reshape(1, 1, -1), lambda t: [t.reshape(-1)])]
        rules += [same(o(f"ln_pre.{t}"), h(f"pre_layrnorm.{t}")) for t in ("weight", "bias")]
    else:
        rules.append(same(o("conv1.bias"), h("embeddings.patch_embedding.bias")))
        if vision.post_layernorm:
            rules += [same(o(f"ln_post.{t}"), h(f"post_layernorm.{t}")) for t in ("weight", "bias")]
    for i in range(vision.num_layers):
        layer, block = o(f"decoder.layers.{i}"), h(f"encoder.layers.{i}")
        for t in ("weight", "bias"):
            rules += [
                same(f"{layer}.input_layernorm.{t}", f"{block}.layer_norm1.{t}"),
                fused_qkv(f"{layer}.self_attention.linear_qkv.{t}", f"{block}.self_attn.q_proj.{t}",
                          f"{block}.self_attn.k_proj.{t}", f"{block}.self_attn.v_proj.{t}", heads, heads, head_dim),
                same(f"{layer}.self_attention.linear_proj.{t}", f"{block}.self_attn.out_proj.{t}"),
                same(f"{layer}.pre_mlp_layernorm.{t}", f"{block}.layer_norm2.{t}"),
                same(f"{layer}.mlp.linear_fc1.{t}", f"{block}.mlp.fc1.{t}"),
                same(f"{layer}.mlp.linear_fc2.{t}", f"{block}.mlp.fc2.{t}"),
            ]
    return rules


def unread_tower_tensors(vision: VisionEncoderConfig, hf: str, tower_layers: int, pooling_head: bool) -> dict:
    """name -> shape of the tensors of a `tower_layers` transformers tower that an encoder running
    only `vision.num_layers` of them never reads: the later layers, the final norm, SigLIP's
    pooling head."""
    h, f = vision.hidden_size, vision.ffn_hidden_size
    tensors = {}
    for i in range(vision.num_layers, tower_layers):
        block = _joined(hf, f"encoder.layers.{i}")
        for name, (rows, columns) in (("self_attn.q_proj", (h, h)), ("self_attn.k_proj", (h, h)),
                                      ("self_attn.v_proj", (h, h)), ("self_attn.out_proj", (h, h)),
                                      ("mlp.fc1", (f, h)), ("mlp.fc2", (h, f))):
            tensors[f"{block}.{name}.weight"], tensors[f"{block}.{name}.bias"] = (rows, columns), (rows,)
        for norm in ("layer_norm1", "layer_norm2"):
            tensors[f"{block}.{norm}.weight"] = tensors[f"{block}.{norm}.bias"] = (h,)
    if not vision.post_layernorm or vision.encoder_type == "clip":  # CLIP's only normalises the pooled token
        tensors[_joined(hf, "post_layernorm.weight")] = tensors[_joined(hf, "post_layernorm.bias")] = (h,)
    if pooling_head:
        head = lambda name: _joined(hf, f"head.{name}")  # noqa: E731
        tensors.update({head("probe"): (1, 1, h), head("attention.in_proj_weight"): (3 * h, h),
                        head("attention.in_proj_bias"): (3 * h,), head("attention.out_proj.weight"): (h, h),
                        head("attention.out_proj.bias"): (h,), head("layernorm.weight"): (h,),
                        head("layernorm.bias"): (h,), head("mlp.fc1.weight"): (f, h), head("mlp.fc1.bias"): (f,),
                        head("mlp.fc2.weight"): (h, f), head("mlp.fc2.bias"): (h,)})
    return tensors


def carrying_unread(rule: Rule, unread: dict) -> Rule:
    """`rule` extended with HuggingFace tensors our model does not keep: read and dropped on import,
    written as zeros of their shapes on export (nothing reads them, so any values serve)."""
    names = tuple(unread)

    def to_hf(tensor):
        return rule.to_hf(tensor) + [tensor.new_zeros(unread[name]) for name in names]

    return Rule(rule.ours, rule.hf + names, lambda tensors: rule.to_ours(tensors[:len(rule.hf)]), to_hf)
