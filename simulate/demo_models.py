"""Demo generators that learn on a laptop CPU in minutes, shipped as code and trained at the first
``make demo`` (cached under ``var/demo_models``): nothing is downloaded, and what the demo's RL
rounds fine-tune is a real generator that has learned something, not random weights.

- ``text_to_image``: a tiny Stable Diffusion-like pipeline (VAE, CLIP text tower, UNet, DDIM) trained
  from scratch on the procedurally drawn scenes of ``simulate.generators`` (shapes, colours and
  places named in the prompt), at 32x32 pixels. First the VAE learns to reconstruct the scenes, then
  the text tower and the UNet learn to denoise their latents given the prompt (the usual
  epsilon-prediction loss), with 10% of the prompts dropped for classifier-free guidance.
- ``text_to_video``: the short-clip variant, a tiny Wan-like pipeline (Wan's causal video VAE, a 3D
  flow-matching transformer, a UMT5 text tower, flow-matching Euler) trained from scratch on the
  procedural clips of ``simulate.generators.render_clip`` (shapes bouncing, rolling, orbiting as the
  prompt says) at 32x32 pixels and 9 frames: the VAE first, then the transformer on the rectified
  flow objective (velocity = noise - clip latents) given the prompt, 10% of prompts dropped. The
  text tower keeps its random weights: a fixed, distinct code per prompt, which the transformer
  learns to read. ``video_grpo`` (Flow-GRPO) fine-tunes it.
- ``causal_lm``: a tiny GPT-2 (2 layers, 128 wide) trained from scratch on the templated answers of
  ``simulate.generators.compose_text`` to the demo's text prompts, half of them clean (a heading, a
  list, code) and half noisy (rambling, repeated, misspelt), with a byte-level BPE tokenizer trained
  on the same texts (so the answers keep their case, newlines and markdown). It samples either kind
  of answer: what RL can move towards the one people prefer.

Each is saved with ``save_pretrained`` and loads back with plain diffusers / transformers. Training
is seeded; the same code on the same machine gives the same weights.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from simulate import generators
from simulate.tiny_models import _save_sd_pipeline, minilm_tokenizer_path

Progress = Callable[[str, int, int], None]
"""(phase, step, steps): called as training goes."""

DONE_FILE = "rewardloop_demo.json"  # written last: a directory without it is half-trained


def _save(
    directory: str | Path, write: Callable[[Path], Any], info: dict[str, Any], *, started: float, loss: float
) -> Path:
    """Save a trained demo generator: ``write`` fills a temporary directory beside ``directory``,
    ``DONE_FILE`` (what was trained, how long it took, its last loss) goes in last, then it is
    renamed into place, so a half-trained or half-written model is never used."""
    out = Path(directory)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    info = {**info, "seconds": round(time.perf_counter() - started, 1), "final_loss": loss}
    (tmp / DONE_FILE).write_text(json.dumps(info, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _scenes(prompts: list[str], per_prompt: int, size: int, seed: int) -> torch.Tensor:
    """(N, 3, size, size) in [-1, 1]: ``per_prompt`` clean scenes for each prompt."""
    out = []
    for p in prompts:
        for i in range(per_prompt):
            png = generators.draw_image(p, seed=seed * 100_000 + i, size=size, style="clean")
            with Image.open(io.BytesIO(png)) as im:
                out.append(np.asarray(im.convert("RGB"), dtype=np.float32))
    arr = np.stack(out) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def train_text_to_image(
    directory: str | Path,
    *,
    prompts: list[str] | None = None,
    per_prompt: int = 32,
    resolution: int = 32,
    vae_steps: int = 400,
    unet_steps: int = 1500,
    batch_size: int = 16,
    vae_channels: tuple[int, ...] = (8, 16, 32),
    unet_channels: tuple[int, int] = (32, 64),
    seed: int = 0,
    progress: Progress | None = None,
) -> Path:
    """Train the demo text-to-image pipeline and save it to ``directory`` (replaced)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    prompts = list(prompts or generators.DEMO_PROMPTS["image"])
    images = _scenes(prompts, per_prompt, resolution, seed)
    labels = torch.arange(len(prompts)).repeat_interleave(per_prompt)

    vae = AutoencoderKL(
        block_out_channels=list(vae_channels),
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * len(vae_channels),
        up_block_types=["UpDecoderBlock2D"] * len(vae_channels),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=resolution,
        mid_block_add_attention=False,  # 16x16 latents: convolutions see enough, at a fraction of the cost
    )
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    for step in range(vae_steps):
        idx = torch.randint(0, len(images), (batch_size,), generator=gen)
        x = images[idx]
        post = vae.encode(x).latent_dist
        z = post.sample(generator=gen)
        recon = vae.decode(z).sample
        kl = post.kl().mean() / x[0].numel()
        loss = torch.nn.functional.mse_loss(recon, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress is not None:
            progress("vae", step + 1, vae_steps)
    vae.eval()
    with torch.no_grad():
        latents = torch.cat(
            [vae.encode(images[i : i + 64]).latent_dist.mean for i in range(0, len(images), 64)]
        )
    # Latents at unit variance, as SD's scaling factor does for its VAE.
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    latents = latents * scaling

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_tokenizer_path()))
    tokenizer.model_max_length = 32
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=2,
            num_hidden_layers=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=32,
            bos_token_id=tokenizer.cls_token_id,
            eos_token_id=tokenizer.sep_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    side = latents.shape[-1]
    unet = UNet2DConditionModel(
        block_out_channels=unet_channels,
        layers_per_block=1,
        sample_size=side,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    ids = tokenizer(
        [*prompts, ""], padding="max_length", max_length=32, truncation=True, return_tensors="pt"
    ).input_ids
    noise_sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / unet_steps)))
    )
    unet.train()
    text_encoder.train()
    for step in range(unet_steps):
        idx = torch.randint(0, len(latents), (batch_size,), generator=gen)
        z0 = latents[idx]
        which = labels[idx].clone()
        which[torch.rand(batch_size, generator=gen) < 0.1] = len(prompts)  # the empty prompt
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch_size,), generator=gen)
        zt = noise_sched.add_noise(z0, noise, t)
        cond = text_encoder(ids[which])[0]
        pred = unet(zt, t, encoder_hidden_states=cond).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if progress is not None:
            progress("unet", step + 1, unet_steps)
    unet.eval()
    text_encoder.eval()
    return _save(
        directory,
        lambda tmp: _save_sd_pipeline(
            tmp, unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer
        ),
        {"kind": "text_to_image", "prompts": prompts, "resolution": resolution},
        started=t0,
        loss=loss.item(),
    )


END_OF_TEXT = "<|endoftext|>"


def _answer_corpus(prompts: list[str], per_prompt: int, seed: int) -> list[str]:
    """``per_prompt`` clean and as many noisy answers per prompt, each as ``prompt + "\n\n" +
    answer``: what the model sees after a bare prompt is an answer to it."""
    return [
        f"{p}\n\n{generators.compose_text(p, seed=seed * 100_000 + i, style=style)}"
        for p in prompts
        for i in range(per_prompt)
        for style in ("clean", "noisy")
    ]


def bpe_tokenizer(texts: list[str], *, vocab_size: int) -> Any:
    """A byte-level BPE tokenizer (GPT-2's scheme) trained on ``texts``, as a transformers fast
    tokenizer with one special token for end of text (also padding). Byte-level: any text encodes,
    and decoding gives back exactly what was encoded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[END_OF_TEXT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=END_OF_TEXT, bos_token=END_OF_TEXT, pad_token=END_OF_TEXT,
        unk_token=END_OF_TEXT,
    )  # fmt: skip


def train_causal_lm(
    directory: str | Path,
    *,
    prompts: list[str] | None = None,
    per_prompt: int = 48,
    steps: int = 450,
    batch_size: int = 16,
    vocab_size: int = 3000,
    width: int = 128,
    layers: int = 2,
    seed: int = 0,
    progress: Progress | None = None,
) -> Path:
    """Train the demo text generator and save it to ``directory`` (replaced): a GPT-2 and its
    tokenizer, loadable with plain ``AutoModelForCausalLM`` / ``AutoTokenizer``. About 2.5 minutes
    on 2 cores with the defaults (the loss is near 0.1 by then: the answers are templated)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    prompts = list(prompts or generators.DEMO_PROMPTS["text"])
    texts = _answer_corpus(prompts, per_prompt, seed)
    tokenizer = bpe_tokenizer(texts, vocab_size=vocab_size)
    eos = tokenizer.eos_token_id
    encoded = [[*tokenizer(t).input_ids, eos] for t in texts]
    longest = max(len(e) for e in encoded)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tokenizer),
            # Room for an answer a little longer than any seen (RL may lengthen them).
            n_positions=1 << max(8, math.ceil(math.log2(longest + 64))),
            n_embd=width,
            n_layer=layers,
            n_head=4,
            bos_token_id=eos,
            eos_token_id=eos,
            pad_token_id=eos,
        )
    )
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = eos
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    model.train()
    loss = torch.zeros(())
    for step in range(steps):
        batch = [encoded[i] for i in torch.randint(0, len(encoded), (batch_size,), generator=gen).tolist()]
        width_t = max(len(b) for b in batch)
        ids = torch.full((len(batch), width_t), eos)
        labels = torch.full((len(batch), width_t), -100)  # padding is not learned
        mask = torch.zeros((len(batch), width_t), dtype=torch.long)
        for k, b in enumerate(batch):
            ids[k, : len(b)] = labels[k, : len(b)] = torch.tensor(b)
            mask[k, : len(b)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if progress is not None:
            progress("lm", step + 1, steps)
    model.eval()

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))

    return _save(
        directory,
        write,
        {"kind": "causal_lm", "prompts": prompts, "longest_tokens": longest},
        started=t0,
        loss=loss.item(),
    )


def _clips(prompts: list[str], per_prompt: int, size: int, frames: int, seed: int) -> torch.Tensor:
    """(N, 3, frames, size, size) in [-1, 1]: ``per_prompt`` clean clips for each prompt, at 8 fps."""
    import av

    out = []
    for p in prompts:
        for i in range(per_prompt):
            data = generators.render_clip(p, seed=seed * 100_000 + i, size=size, seconds=frames / 8, fps=8)
            with av.open(io.BytesIO(data), mode="r") as container:
                decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
            out.append(np.stack(decoded[:frames]).astype(np.float32))
    arr = np.stack(out) / 127.5 - 1.0  # (N, F, H, W, 3)
    return torch.from_numpy(arr).permute(0, 4, 1, 2, 3).contiguous()


def train_text_to_video(
    directory: str | Path,
    *,
    prompts: list[str] | None = None,
    per_prompt: int = 16,
    resolution: int = 32,
    frames: int = 9,
    vae_steps: int = 300,
    transformer_steps: int = 3000,
    batch_size: int = 8,
    transformer_batch_size: int = 16,
    seed: int = 0,
    progress: Progress | None = None,
) -> Path:
    """Train the demo text-to-video pipeline and save it to ``directory`` (replaced); it loads with
    plain ``WanPipeline.from_pretrained``. About 7.5 minutes on 2 idle cores with the defaults (the
    VAE's causal 3D convolutions are 2/3 of it). Its clips tell night from day and carry some of the
    prompt's colours (a pink sky, a green floor), often wrongly; the small moving shapes are lost
    at this size. Enough for a loop on brightness, not a good video model."""
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    prompts = list(prompts or generators.DEMO_PROMPTS["video"])
    clips = _clips(prompts, per_prompt, resolution, frames, seed)
    labels = torch.arange(len(prompts)).repeat_interleave(per_prompt)

    z_dim = 8
    vae = AutoencoderKLWan(
        base_dim=16, z_dim=z_dim, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[False, True],
        scale_factor_spatial=4, scale_factor_temporal=2, latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim,
    )  # fmt: skip
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    for step in range(vae_steps):
        x = clips[torch.randint(0, len(clips), (batch_size,), generator=gen)]
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.sample(generator=gen)).sample
        loss = torch.nn.functional.mse_loss(recon, x) + 1e-4 * post.kl().mean() / x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress is not None:
            progress("vae", step + 1, vae_steps)
    vae.eval()
    with torch.no_grad():
        latents = torch.cat(
            [vae.encode(clips[i : i + 16]).latent_dist.mean for i in range(0, len(clips), 16)]
        )  # (N, z, F', h, w)
    # Per-channel statistics, as Wan's VAE ships them: the pipeline un-normalises with them.
    mean = latents.mean(dim=(0, 2, 3, 4))
    std = latents.std(dim=(0, 2, 3, 4))
    vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
    latents = (latents - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_tokenizer_path()))
    tokenizer.model_max_length = 32
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
            relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id,
        )
    ).eval()  # fmt: skip
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=z_dim,
        out_channels=z_dim, text_dim=32, freq_dim=64, ffn_dim=128, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(shift=2.0)
    pipe = WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer
    )
    with torch.no_grad():  # the pipeline's own encoding, so training sees what sampling will
        embeds, _ = pipe.encode_prompt([*prompts, ""], do_classifier_free_guidance=False, device="cpu")
    opt = torch.optim.AdamW(transformer.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / transformer_steps))),
    )
    transformer.train()
    for step in range(transformer_steps):
        n = transformer_batch_size
        idx = torch.randint(0, len(latents), (n,), generator=gen)
        z0 = latents[idx]
        which = labels[idx].clone()
        which[torch.rand(n, generator=gen) < 0.1] = len(prompts)  # the empty prompt
        noise = torch.randn(z0.shape, generator=gen)
        # Logit-normal noise levels (SD3's choice): most training where the velocity is hardest.
        sigma = torch.sigmoid(torch.randn(n, generator=gen)).view(-1, 1, 1, 1, 1)
        zt = (1 - sigma) * z0 + sigma * noise
        pred = transformer(
            hidden_states=zt, timestep=sigma.flatten() * 1000, encoder_hidden_states=embeds[which],
            return_dict=False,
        )[0]  # fmt: skip
        loss = torch.nn.functional.mse_loss(pred, noise - z0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        sched.step()
        if progress is not None:
            progress("transformer", step + 1, transformer_steps)
    transformer.eval()
    return _save(
        directory,
        lambda tmp: pipe.save_pretrained(str(tmp)),
        {"kind": "text_to_video", "prompts": prompts, "resolution": resolution, "frames": frames},
        started=t0,
        loss=loss.item(),
    )
