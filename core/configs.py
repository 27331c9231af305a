"""Architecture configs: the full-size FLUX.1-dev + Union ControlNet and the tiny demo model.

Speed and memory depend on shapes, not weight values, so the planner and the GPU benchmark use
these configs (on the meta device or with random weights) where the real weights are not at hand.
"""

from __future__ import annotations

FLUX_DEV = "black-forest-labs/FLUX.1-dev"
UNION_PRO = "Shakker-Labs/FLUX.1-dev-ControlNet-Union-Pro"

_FLUX_COMMON = dict(
    patch_size=1,
    in_channels=64,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=[16, 56, 56],
)

FULL = dict(
    transformer=dict(_FLUX_COMMON, num_layers=19, num_single_layers=38),
    controlnet=dict(_FLUX_COMMON, num_layers=5, num_single_layers=10, num_mode=10),
    controlnet_pro2=dict(_FLUX_COMMON, num_layers=6, num_single_layers=0),
    t5=dict(
        vocab_size=32128,
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_layers=24,
        num_heads=64,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
    ),
    clip=dict(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_attention_heads=12,
        num_hidden_layers=12,
        max_position_embeddings=77,
        projection_dim=768,
        hidden_act="quick_gelu",
    ),
    vae=dict(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        block_out_channels=[128, 256, 512, 512],
        layers_per_block=2,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        norm_num_groups=32,
        sample_size=1024,
    ),
    max_sequence_length=512,
)

_TINY_COMMON = dict(
    patch_size=1,
    in_channels=64,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    guidance_embeds=True,
    axes_dims_rope=[4, 4, 8],
)

TINY = dict(
    transformer=dict(_TINY_COMMON, num_layers=2, num_single_layers=2),
    controlnet=dict(_TINY_COMMON, num_layers=1, num_single_layers=1, num_mode=10),
    controlnet_pro2=dict(_TINY_COMMON, num_layers=1, num_single_layers=0),
    t5=dict(
        vocab_size=1000,
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
    ),
    clip=dict(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
    ),
    vae=dict(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        block_out_channels=[32, 32, 32, 32],
        layers_per_block=1,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        norm_num_groups=8,
        sample_size=64,
    ),
    max_sequence_length=64,
)

SCHEDULER = dict(
    shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
)


def constructors(cfg: dict) -> dict:
    """name → a function building that pipeline component from `cfg` (FULL or TINY) with fresh weights;
    call it under accelerate's init_empty_weights for shapes only, or on a device for random weights."""
    from diffusers import AutoencoderKL, FluxControlNetModel, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    return dict(
        transformer=lambda: FluxTransformer2DModel(**cfg["transformer"]),
        controlnet=lambda: FluxControlNetModel(**cfg["controlnet"]),
        text_encoder=lambda: CLIPTextModel(CLIPTextConfig(**cfg["clip"])),
        text_encoder_2=lambda: T5EncoderModel(T5Config(**cfg["t5"])),
        vae=lambda: AutoencoderKL(**cfg["vae"]),
    )
