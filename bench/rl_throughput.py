"""RL throughput (not a test): images per second of sampling with log-probabilities against the
pipeline's own inference, and of one DDPO and one GRPO iteration (sampling + training), on a
randomly initialised Stable Diffusion-like pipeline built from a config (nothing downloaded).

    .venv/bin/python bench/rl_throughput.py                      # the small model, CPU
    .venv/bin/python bench/rl_throughput.py --model small --device cuda
    .venv/bin/python bench/rl_throughput.py --model sd15 --device cuda --dtype bfloat16 --batch 8 --steps 50

Our sampler does what ``pipeline(...)`` does plus the log-probability of each step; the target
is >= 95% of the pipeline's throughput on the same batch, steps, guidance and resolution. Each
figure is the median of ``--repeats`` timed runs after one warm-up run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))

MODELS = {
    # name: (latent sample size, UNet block widths); images are 2x the latent size (a 2-block VAE)
    "tiny": (16, (8, 16)),
    "small": (32, (64, 128)),
    # Stable Diffusion 1.5's architecture and sizes (random weights): 512x512 images, for the GPU.
    "sd15": (64, ()),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(MODELS), default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)

    import annotation_load
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from simulate.tiny_models import sd15_sized_pipeline, tiny_sd_pipeline
    from training.ml.ddpo.config import DDPOConfig
    from training.ml.ddpo.trainer import train
    from training.ml.diffusion.sampling import sample_with_logprob
    from training.ml.diffusion_grpo.config import DiffusionGRPOConfig
    from training.ml.diffusion_grpo.trainer import train as train_grpo

    print(
        f"machine: {annotation_load.machine_info()} torch threads {torch.get_num_threads()} device {args.device}"
    )
    latent, channels = MODELS[args.model]
    work = Path(tempfile.mkdtemp(prefix="rl-bench-"))
    if args.model == "sd15":
        path = sd15_sized_pipeline(work / "pipe")
    else:
        path = tiny_sd_pipeline(work / "pipe", sample_size=latent, channels=(channels[0], channels[1]))
    dtype = getattr(torch, args.dtype)
    pipe = StableDiffusionPipeline.from_pretrained(str(path), local_files_only=True, dtype=dtype)
    pipe = pipe.to(args.device)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    side = latent * pipe.vae_scale_factor
    prompts = [f"a picture of thing {i}" for i in range(args.batch)]
    n_params = sum(p.numel() for p in pipe.unet.parameters())
    print(f"model {args.model}: UNet {n_params / 1e6:.2f}M parameters, {side}x{side} images, batch {args.batch}, "
          f"{args.steps} DDIM steps, guidance {args.guidance}")  # fmt: skip

    def plain() -> None:
        with torch.no_grad():
            pipe(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance, eta=1.0, output_type="pt",
                 height=side, width=side, generator=torch.Generator(args.device).manual_seed(0))  # fmt: skip

    def ours() -> None:
        sample_with_logprob(pipe, prompts, steps=args.steps, guidance_scale=args.guidance, eta=1.0,
                            height=side, width=side, generator=torch.Generator(args.device).manual_seed(0))  # fmt: skip

    # Interleaved, so drift of the machine hits both alike.
    t_plain, t_ours = [], []
    plain()
    ours()
    for _ in range(args.repeats):
        t_plain.append(_once(plain))
        t_ours.append(_once(ours))
    p, o = statistics.median(t_plain), statistics.median(t_ours)
    print(f"pipeline(...)            : {args.batch / p:8.2f} images/s (median of {args.repeats}: {p:.3f} s)")
    print(f"sample_with_logprob      : {args.batch / o:8.2f} images/s (median of {args.repeats}: {o:.3f} s)")
    print(f"ours / pipeline          : {p / o:8.3f} (target >= 0.95)")

    # A reward that varies, so every group has spread and every image is trained on.
    def reward(p: list[str], images: list[Any]) -> list[float]:
        return [float(i) for i in range(len(images))]

    common = {"pipeline": str(path), "iterations": 2, "prompts_per_iteration": max(1, args.batch // 4),
              "sample_steps": args.steps, "guidance_scale": args.guidance, "train_batch_size": min(args.batch, 4),
              "device": args.device, "dtype": args.dtype}  # fmt: skip
    config = DDPOConfig.from_dict({**common, "images_per_prompt": 4})
    last = train(config, prompts, reward, output_dir=work / "ddpo").metrics[-1]
    print(f"DDPO iteration           : {last.images_per_second:8.2f} images/s "
          f"(sampling {last.sample_seconds:.2f} s + training {last.train_seconds:.2f} s for {config.batch_size} images; "
          f"second iteration)")  # fmt: skip
    grpo = DiffusionGRPOConfig.from_dict({**common, "group_size": 4, "beta": 0.01})
    g = train_grpo(grpo, prompts, reward, output_dir=work / "grpo").metrics[-1]
    print(f"GRPO iteration           : {g.images_per_second:8.2f} images/s "
          f"(sampling {g.sample_seconds:.2f} s + training {g.train_seconds:.2f} s for {grpo.batch_size} images, "
          f"KL to the reference included; second iteration)")  # fmt: skip
    if args.device.startswith("cuda"):
        print(f"peak GPU memory          : {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


def _once(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
