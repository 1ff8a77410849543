"""`manage.py seed_demo`: a demo project with image, video and text comparisons, all made locally
(procedural images, short clips, templated texts), and a `demo` login. Idempotent."""

from __future__ import annotations

import io
import os
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandParser
from django.db.models.functions import Random
from tqdm import tqdm

from annotate import services
from annotate.models import Comparison, Project, ProjectMember
from simulate import generators as demo_media

INSTRUCTIONS = """\
# How to judge

Pick the output that **better matches the prompt** and looks or reads better.

| key | outcome |
|---|---|
| `←` or `1` | left is better |
| `→` or `2` | right is better |
| `↑` or `3` | tie |
| `↓` or `4` | both bad |
| `space` | play / pause both videos |
| `,` `.` | step one frame back / forward |
| `s` | skip, `u` undo |

Judge the content, not the position: the sides are shuffled for every comparison.
"""

# Two versions of one demo generator: v2 is cleaner, so the annotators' votes can tell them apart.
VERSIONS = [("demo-gen", "v1", "noisy"), ("demo-gen", "v2", "clean")]


class Command(BaseCommand):
    help = "Seed the demo project (image, video and text comparisons) and the demo/demo login."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--slug", default="demo")
        parser.add_argument("--password", default="demo")
        parser.add_argument(
            "--prompts",
            type=int,
            default=None,
            help="prompts per modality (default all 8); fewer seed faster (tests, quick looks)",
        )
        parser.add_argument(
            "--loop",
            action="store_true",
            help="also the image loop demo project: trains the demo text-to-image generator on first "
            "use (3-4 minutes, cached under var/demo_models), renders its first outputs and switches "
            "its loop on",
        )
        parser.add_argument(
            "--text-loop",
            action="store_true",
            help="only the text loop demo project (the demo language model, about 2.5 minutes to "
            "train on first use)",
        )
        parser.add_argument(
            "--video-loop",
            action="store_true",
            help="only the video loop demo project (the demo text-to-video generator, about 6.5 "
            "minutes to train on first use); with --text-loop, after it",
        )
        parser.add_argument(
            "--background",
            action="store_true",
            help="run at the lowest CPU priority (what `up --seed-demo` does for the text and video demos)",
        )
        parser.add_argument(
            "--quick-generator",
            action="store_true",
            help="with --loop: a rough demo generator trained in seconds (tests)",
        )

    def handle(self, *args: Any, **opts: Any) -> None:
        User = get_user_model()
        user, created = User.objects.get_or_create(
            username="demo", defaults={"is_staff": True, "is_superuser": True, "email": "demo@example.com"}
        )
        if created:
            user.set_password(opts["password"])
            user.save()
        if opts["background"]:
            os.nice(19)
        if opts["text_loop"] or opts["video_loop"]:
            for modality in ("text", "video"):
                if opts[f"{modality}_loop"]:
                    self._seed_loop_demo(user, modality, quick=opts["quick_generator"])
            return
        if opts["loop"]:
            self._seed_loop_demo(user, "image", quick=opts["quick_generator"])
        project = Project.objects.filter(slug=opts["slug"]).first()
        if project is not None and Comparison.objects.filter(project=project).exists():
            self.stdout.write(f"demo project {project.slug!r} already seeded")
            return
        if project is None:
            project = services.project_create(
                creator=user,
                slug=opts["slug"],
                name="Demo: images, videos and texts",
                instructions=INSTRUCTIONS,
                aspects=[],
                overlap=1,
            )
        ProjectMember.objects.get_or_create(project=project, user=user, defaults={"role": "manager"})
        # Reward models train on this project out of the box: with no encoder configured, the
        # rewards app's built-in image-text encoder embeds its images, videos and texts alike.
        jobs = [
            (m, p) for m in ("image", "video", "text") for p in demo_media.DEMO_PROMPTS[m][: opts["prompts"]]
        ]
        for modality, prompt in tqdm(jobs, desc="demo samples", unit="prompt"):
            for seed, (gen, version, style) in enumerate(VERSIONS):
                for extra in range(2 if style == "clean" else 1):
                    s = seed * 10 + extra
                    meta = {"style": style, "seed": s}
                    if modality == "text":
                        text = demo_media.compose_text(prompt, seed=s, style=style)
                        services.sample_create_texts(
                            project=project,
                            actor=user,
                            items=[
                                {
                                    "prompt": prompt,
                                    "text": text,
                                    "generator": gen,
                                    "generator_version": version,
                                    "metadata": meta,
                                }
                            ],
                        )
                        continue
                    if modality == "image":
                        data = demo_media.draw_image(prompt, seed=s, size=384, style=style)
                        name = "image.png"
                    else:
                        data = demo_media.render_clip(prompt, seed=s, style=style)
                        name = "clip.mp4"
                    services.sample_create_media(
                        project=project,
                        actor=user,
                        file=io.BytesIO(data),
                        filename=name,
                        prompt=prompt,
                        generator=gen,
                        generator_version=version,
                        metadata=meta,
                    )
        created_cmp = services.comparisons_create_random_pairs(
            project=project, actor=user, pairs_per_prompt=3, seed=0
        )
        # Interleave modalities in the queue so the first minutes of the demo show all three.
        Comparison.objects.filter(project=project).update(priority=Random())
        self.stdout.write(
            self.style.SUCCESS(
                f"seeded project {project.slug!r}: {project.samples.count()} samples, "
                f"{len(created_cmp)} comparisons"
            )
        )

    def _seed_loop_demo(self, user: Any, modality: str, *, quick: bool) -> None:
        from simulate import demo, demo_models

        slug, what = demo.DEMOS[modality].slug, demo.DEMOS[modality].directory
        if Project.objects.filter(slug=slug).exists():
            self.stdout.write(f"loop demo project {slug!r} already seeded")
            return
        bars: dict[str, tqdm] = {}

        def progress(phase: str, step: int, steps: int) -> None:
            if phase not in bars:
                bars[phase] = tqdm(total=steps, desc=f"training the demo {what} model: {phase}", unit="step")
            bars[phase].update(step - bars[phase].n)

        if not quick and not (demo.generator_path(modality) / demo_models.DONE_FILE).is_file():
            self.stdout.write(f"Training the demo {what} generator (first run only, a few minutes)...")
        try:
            project = demo.loop_demo_seed(modality, owner=user, quick=quick, progress=progress)
        finally:
            for bar in bars.values():
                bar.close()
        self.stdout.write(
            self.style.SUCCESS(
                f"seeded loop demo {project.slug!r}: {project.samples.count()} samples, loop on"
            )
        )
