"""Procedural demo media: images, clips and text answers drawn from a prompt and a seed.

Pure functions with no Django imports, deterministic for a given (prompt, seed, style) and fast
(well under 0.3 s each on one CPU core). Nothing is downloaded. The ``"clean"`` style plays a good
generator (sharp, follows the prompt, helpful) and ``"noisy"`` a worse one (blurry, grainy, sometimes
ignores the colours it was asked for, rambles), so that human or simulated judges have a real
preference to express and a reward model has something to learn.
"""

from __future__ import annotations

import io
import math
import os
import random
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

STYLES = ("clean", "noisy")

Color = tuple[int, int, int]

COLORS: dict[str, Color] = {
    "red": (214, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (245, 210, 40),
    "gold": (212, 175, 55),
    "green": (50, 160, 70),
    "teal": (30, 140, 140),
    "cyan": (40, 200, 220),
    "blue": (40, 90, 210),
    "purple": (130, 60, 180),
    "pink": (240, 120, 170),
    "brown": (120, 80, 45),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "grey": (128, 128, 128),
    "black": (25, 25, 25),
}

_NUMBERS = {
    "one": 1,
    "a": 1,
    "an": 1,
    "two": 2,
    "pair": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "several": 3,
    "many": 5,
    "few": 3,
}

# Singular object words the image scene knows how to draw, with their plural spellings.
_OBJECT_WORDS = {
    "circle": "circle",
    "circles": "circle",
    "ball": "circle",
    "balls": "circle",
    "dot": "circle",
    "dots": "circle",
    "square": "square",
    "squares": "square",
    "box": "square",
    "boxes": "square",
    "cube": "square",
    "cubes": "square",
    "triangle": "triangle",
    "triangles": "triangle",
    "pyramid": "triangle",
    "star": "star",
    "stars": "star",
    "tree": "tree",
    "trees": "tree",
    "forest": "tree",
    "house": "house",
    "houses": "house",
    "cabin": "house",
    "hut": "house",
    "mountain": "mountain",
    "mountains": "mountain",
    "hill": "mountain",
    "hills": "mountain",
    "cloud": "cloud",
    "clouds": "cloud",
}

DEMO_PROMPTS: dict[str, list[str]] = {
    "image": [
        "a red circle above a green mountain at sunset",
        "a blue house with a yellow sun in the sky",
        "three green trees beside a lake",
        "a purple square and a pink triangle on a night sky with a moon",
        "two white houses in the snow under gray clouds",
        "an orange ball on a desert under a clear blue sky",
        "a forest of trees in front of blue mountains",
        "five yellow stars over a black sea at night",
    ],
    "video": [
        "a red ball bouncing on a blue floor",
        "two yellow balls bouncing at night",
        "a green square rolling across the ground",
        "a purple circle orbiting in a pink sky",
        "three orange balls bouncing over the sea",
        "a white ball rolling on snow",
        "a blue triangle spinning at sunset",
        "a gold square bouncing in a gray room",
    ],
    "text": [
        "Explain how a hash map handles collisions.",
        "Write a Python function that checks whether a string is a palindrome.",
        "Give three tips for writing clear commit messages.",
        "Why is the sky blue?",
        "How should a web page display user-submitted comments safely?",
        "What is the difference between a list and a tuple in Python?",
        "Summarize the rules for castling in chess.",
        "Suggest a name and a tagline for a small neighbourhood bakery.",
    ],
}


def _check_style(style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")


def _words(prompt: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", prompt.lower())


def _rng(*parts: object) -> random.Random:
    # str seeds go through sha512 (seed version 2), so this is stable across processes and
    # independent of PYTHONHASHSEED.
    return random.Random("|".join(str(p) for p in parts))


def _np_rng(rng: random.Random) -> np.random.Generator:
    return np.random.default_rng(rng.getrandbits(64))


def _mix(a: Color, b: Color, t: float) -> Color:
    return (round(a[0] + (b[0] - a[0]) * t), round(a[1] + (b[1] - a[1]) * t), round(a[2] + (b[2] - a[2]) * t))


def _jitter(c: Color, rng: random.Random, amount: int) -> Color:
    r, g, b = (max(0, min(255, v + rng.randint(-amount, amount))) for v in c)
    return (r, g, b)


@dataclass(frozen=True)
class _Wanted:
    """One kind of object the prompt asks for: what, how many, which colour (None: free)."""

    kind: str
    count: int
    color: Color | None


def _parse_objects(words: list[str], vocabulary: dict[str, str]) -> list[_Wanted]:
    """Object words with the colour and count words that precede them ("three green trees")."""
    found: list[_Wanted] = []
    seen: set[str] = set()
    for i, word in enumerate(words):
        kind = vocabulary.get(word)
        if kind is None or kind in seen:
            continue
        seen.add(kind)
        color: Color | None = None
        count = 2 if word.endswith("s") else 1
        for prev in reversed(words[max(0, i - 3) : i]):
            if color is None and prev in COLORS:
                color = COLORS[prev]
            elif prev in _NUMBERS:
                count = _NUMBERS[prev]
                break
            elif prev.isdigit():
                count = max(1, min(8, int(prev)))
                break
        if word == "forest":
            count = max(count, 5)
        found.append(_Wanted(kind, count, color))
    return found


# --- Images ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Scene:
    sky_top: Color
    sky_bottom: Color
    ground: Color
    horizon: float  # fraction of the height where the ground starts
    water: bool
    night: bool
    light: str  # "sun", "moon" or ""
    light_color: Color


# Colours for objects the prompt names without a colour ("three trees" are green, not pink).
_DEFAULT_COLORS: dict[str, Color] = {
    "tree": (50, 140, 60),
    "house": (235, 225, 205),
    "cloud": (235, 235, 240),
}


def _scene_for(words: list[str], rng: random.Random) -> _Scene:
    ws = set(words)
    night = bool(ws & {"night", "midnight", "dark", "moon"})
    sunset = bool(ws & {"sunset", "dusk", "dawn", "sunrise", "evening"})
    if night:
        top, bottom = (8, 12, 40), (40, 50, 100)
    elif sunset:
        top, bottom = (70, 60, 140), (250, 150, 80)
    elif ws & {"clouds", "cloudy", "storm", "rain", "gray", "grey"} and "sky" in ws:
        top, bottom = (120, 125, 135), (185, 190, 195)
    else:
        top, bottom = (60, 120, 220), (170, 210, 245)
    top, bottom = _jitter(top, rng, 12), _jitter(bottom, rng, 12)
    water = bool(ws & {"sea", "ocean", "lake", "water", "river"})
    if ws & {"snow", "snowy", "winter", "ice"}:
        ground: Color = (235, 240, 248)
    elif ws & {"desert", "sand", "beach", "dune"}:
        ground = (222, 190, 120)
    elif water:
        ground = (20, 40, 70) if night else (40, 110, 170)
    elif ws & {"room", "floor", "table"}:
        ground = (150, 120, 90)
    else:
        ground = (30, 70, 40) if night else (80, 160, 70)
    ground = _jitter(ground, rng, 10)
    if "sea" in ws and ("black" in ws or "dark" in ws):
        ground = (15, 18, 25)
    light = "moon" if night else ("" if "sky" in ws and ws & {"clouds", "cloudy", "storm"} else "sun")
    if "sun" in ws:
        light = "sun"
    light_color: Color = (
        (240, 240, 215) if light == "moon" else ((255, 120, 50) if sunset else (255, 225, 80))
    )
    for i, w in enumerate(words):
        if w in {"sun", "moon"} and i > 0 and words[i - 1] in COLORS:
            light_color = COLORS[words[i - 1]]
    return _Scene(top, bottom, ground, rng.uniform(0.58, 0.72), water, night, light, light_color)


def _star_points(cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    pts = []
    for i in range(10):
        rad = r if i % 2 == 0 else r * 0.45
        a = rot + i * math.pi / 5 - math.pi / 2
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def _draw_object(
    draw: ImageDraw.ImageDraw,
    kind: str,
    x: float,
    y: float,
    s: float,
    color: Color,
    rng: random.Random,
    outline: Color | None,
) -> None:
    """Draw one object with its base centred at (x, y) and nominal size s (all in pixels)."""
    if kind == "circle":
        draw.ellipse((x - s / 2, y - s, x + s / 2, y), fill=color, outline=outline, width=max(1, int(s / 30)))
    elif kind == "square":
        draw.rectangle(
            (x - s / 2, y - s, x + s / 2, y), fill=color, outline=outline, width=max(1, int(s / 30))
        )
    elif kind == "triangle":
        draw.polygon([(x - s / 2, y), (x + s / 2, y), (x, y - s)], fill=color, outline=outline)
    elif kind == "star":
        draw.polygon(_star_points(x, y - s / 2, s / 2, rng.uniform(0, 0.6)), fill=color, outline=outline)
    elif kind == "tree":
        trunk = (95, 60, 30)
        draw.rectangle((x - s * 0.07, y - s * 0.45, x + s * 0.07, y), fill=trunk)
        for dx, dy, rr in ((0, -0.7, 0.32), (-0.17, -0.55, 0.24), (0.17, -0.55, 0.24)):
            cx, cy, r = x + dx * s, y + dy * s, rr * s
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
    elif kind == "house":
        body_top = y - s * 0.6
        draw.rectangle((x - s * 0.4, body_top, x + s * 0.4, y), fill=color, outline=outline)
        roof = (150, 50, 40) if color != COLORS["red"] else (90, 50, 30)
        draw.polygon([(x - s * 0.5, body_top), (x + s * 0.5, body_top), (x, y - s)], fill=roof)
        draw.rectangle((x - s * 0.08, y - s * 0.28, x + s * 0.08, y), fill=(70, 45, 25))
        draw.rectangle(
            (x + s * 0.15, body_top + s * 0.1, x + s * 0.32, body_top + s * 0.25), fill=(200, 230, 250)
        )
    elif kind == "cloud":
        for dx, rr in ((-0.3, 0.22), (0.0, 0.3), (0.3, 0.22)):
            cx, cy, r = x + dx * s, y - 0.3 * s, rr * s
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)


def _render_scene(words: list[str], seed: int, canvas: int, style: str) -> Image.Image:
    layout = _rng("image-layout", seed, " ".join(words))
    # Degradations draw from their own stream so that both styles share one layout for a seed.
    flaws = _rng("image-flaws", seed, " ".join(words))
    scene = _scene_for(words, layout)
    wanted = _parse_objects(words, _OBJECT_WORDS)
    if not any(w.kind not in {"cloud"} for w in wanted):
        # Nothing we know how to draw: pick shapes from the prompt so it still shapes the image.
        pick = _rng("image-fallback", " ".join(words))
        wanted += [
            _Wanted(pick.choice(["circle", "square", "triangle", "star"]), pick.randint(1, 3), None)
            for _ in range(2)
        ]

    w = h = canvas
    horizon = int(h * scene.horizon)
    arr = np.empty((h, w, 3), dtype=np.float32)
    t = np.linspace(0.0, 1.0, horizon, dtype=np.float32)[:, None]
    arr[:horizon] = (np.array(scene.sky_top) * (1 - t) + np.array(scene.sky_bottom) * t)[:, None, :]
    g = np.linspace(0.0, 1.0, h - horizon, dtype=np.float32)[:, None]
    ground_far = np.array(_mix(scene.ground, scene.sky_bottom, 0.25))
    arr[horizon:] = (ground_far * (1 - g) + np.array(scene.ground) * g)[:, None, :]
    img = Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    unit = canvas / 256

    if scene.night:
        for _ in range(layout.randint(25, 45)):
            sx, sy = layout.uniform(0, w), layout.uniform(0, horizon * 0.9)
            r = layout.uniform(0.4, 1.2) * unit
            draw.ellipse((sx - r, sy - r, sx + r, sy + r), fill=(255, 255, 230))
    if scene.light:
        lx, ly = layout.uniform(0.12, 0.88) * w, layout.uniform(0.1, 0.35) * horizon
        if "sunset" in words or "dusk" in words:
            ly = horizon * layout.uniform(0.7, 0.85)
        r = layout.uniform(14, 22) * unit
        draw.ellipse((lx - r, ly - r, lx + r, ly + r), fill=scene.light_color)
        if scene.light == "moon":
            off = r * 0.45
            draw.ellipse(
                (lx - r + off, ly - r - off * 0.4, lx + r + off, ly + r - off * 0.4),
                fill=_mix(scene.sky_top, scene.sky_bottom, max(0.0, ly / horizon - 0.05)),
            )
    if scene.water:
        for _ in range(layout.randint(8, 14)):
            wy = layout.uniform(horizon + 4 * unit, h - 4 * unit)
            wx = layout.uniform(0, w)
            draw.arc(
                (wx - 12 * unit, wy - 3 * unit, wx + 12 * unit, wy + 3 * unit),
                200,
                340,
                fill=_mix(scene.ground, (255, 255, 255), 0.4),
                width=max(1, int(unit)),
            )

    # Far to near: mountains, clouds, then the rest. Objects that stand on the ground share one row
    # of slots, in a seed-shuffled order, so that they do not pile onto each other.
    order = {"mountain": 0, "cloud": 1, "star": 2}
    floating = bool({"above", "floating", "flying"} & set(words))

    def on_ground(kind: str) -> bool:
        return kind not in {"mountain", "cloud", "star"} and not (kind == "circle" and floating)

    n_slots = sum(x.count for x in wanted if on_ground(x.kind))
    slots = list(range(n_slots))
    layout.shuffle(slots)
    for want in sorted(wanted, key=lambda x: order.get(x.kind, 3)):
        color = want.color
        if style == "noisy" and color is not None and flaws.random() < 0.5:
            # The worse generator often gets the colour wrong: an alignment error to catch.
            color = flaws.choice(list(COLORS.values()))
        if want.kind == "mountain":
            base = color or _mix((90, 100, 120), scene.sky_bottom, 0.2)
            n = max(want.count, layout.randint(2, 3))
            for i in range(n):
                cx = (i + 0.5) / n * w + layout.uniform(-0.1, 0.1) * w
                half = layout.uniform(0.18, 0.32) * w
                peak = horizon - layout.uniform(0.35, 0.6) * horizon
                shade = _jitter(base, layout, 15)
                draw.polygon([(cx - half, horizon + 1), (cx + half, horizon + 1), (cx, peak)], fill=shade)
                if not scene.night and peak < horizon * 0.55:
                    cap = peak + (horizon - peak) * 0.22
                    k = (cap - peak) / (horizon - peak)
                    draw.polygon(
                        [(cx - half * k, cap), (cx + half * k, cap), (cx, peak)], fill=(245, 245, 250)
                    )
            continue
        if want.kind == "cloud":
            for _ in range(want.count):
                cx, cy = layout.uniform(0.1, 0.9) * w, layout.uniform(0.15, 0.45) * horizon
                _draw_object(
                    draw,
                    "cloud",
                    cx,
                    cy,
                    layout.uniform(40, 60) * unit,
                    color or (235, 235, 240),
                    layout,
                    None,
                )
            continue
        for i in range(want.count):
            if on_ground(want.kind):
                size = layout.uniform(38, 64) * unit / max(1.0, n_slots**0.35)
                slot = (slots.pop() + layout.uniform(0.25, 0.75)) / n_slots
                y = horizon + layout.uniform(0.15, 0.7) * (h - horizon)
            else:
                size = layout.uniform(38, 64) * unit / max(1.0, want.count**0.35)
                slot = (i + layout.uniform(0.2, 0.8)) / want.count
                y = layout.uniform(0.35, 0.7) * horizon
                if want.kind == "star":
                    y = layout.uniform(0.2, 0.75) * horizon
                    size *= 0.6
            x = (0.08 + 0.84 * slot) * w
            fill = color or _jitter(
                _DEFAULT_COLORS.get(want.kind) or layout.choice(list(COLORS.values())), layout, 10
            )
            outline = _mix(fill, (0, 0, 0), 0.45) if style == "clean" else None
            _draw_object(draw, want.kind, x, y, size, fill, layout, outline)
    return img


def _degrade(img: Image.Image, *, seed: int, prompt: str) -> Image.Image:
    """Make an image look like the output of a worse generator: soft, grainy, washed out, smeared."""
    flaws = _rng("image-degrade", seed, prompt)
    img = img.filter(ImageFilter.GaussianBlur(radius=flaws.uniform(1.6, 2.6) * img.width / 256))
    img = ImageEnhance.Color(img).enhance(flaws.uniform(0.45, 0.7))
    img = ImageEnhance.Contrast(img).enhance(flaws.uniform(0.6, 0.8))
    arr = np.asarray(img, dtype=np.float32)
    gen = _np_rng(flaws)
    arr = arr + gen.normal(0.0, flaws.uniform(9, 14), arr.shape).astype(np.float32)
    arr = arr + np.array([flaws.uniform(-18, 18) for _ in range(3)], dtype=np.float32)  # colour cast
    # A smeared band: rows shifted sideways, a typical generation artifact.
    h = arr.shape[0]
    y0 = flaws.randint(h // 4, h // 2)
    y1 = min(h, y0 + flaws.randint(h // 12, h // 6))
    arr[y0:y1] = np.roll(arr[y0:y1], flaws.randint(8, 24), axis=1)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB")


def draw_image(prompt: str, *, seed: int, size: int = 256, style: str = "clean") -> bytes:
    """PNG bytes of a procedurally drawn scene for ``prompt``.

    The words pick the sky (day, sunset, night), the ground (grass, snow, sand, water), and the
    objects (circle, square, triangle, star, tree, house, mountain, cloud) with their colours and
    counts ("three green trees"). ``seed`` moves things around; ``style="noisy"`` renders the same
    layout blurry, grainy, washed out, with a smeared band and often the wrong colours.
    """
    _check_style(style)
    if not 16 <= size <= 2048:
        raise ValueError(f"size must be between 16 and 2048 pixels, got {size}")
    words = _words(prompt)
    if style == "clean":
        # Drawn at twice the size and downsampled: anti-aliased, sharp edges.
        img = _render_scene(words, seed, size * 2, style).resize((size, size), Image.Resampling.LANCZOS)
    else:
        img = _degrade(_render_scene(words, seed, size, style), seed=seed, prompt=prompt)
    out = io.BytesIO()
    img.save(out, format="PNG", optimize=False, compress_level=6)
    return out.getvalue()


# --- Clips ----------------------------------------------------------------------------------

_CLIP_SHAPES = {
    "ball": "circle",
    "balls": "circle",
    "circle": "circle",
    "circles": "circle",
    "dot": "circle",
    "square": "square",
    "squares": "square",
    "box": "square",
    "cube": "square",
    "boxes": "square",
    "triangle": "triangle",
    "triangles": "triangle",
}


@dataclass(frozen=True)
class _Mover:
    kind: str
    color: Color
    r: float  # radius in canvas pixels
    x0: float  # start position, fraction of the width
    vx: float  # widths per second
    period: float  # seconds per bounce
    phase: float
    height: float  # bounce height, fraction of the horizon


def _clip_plan(prompt: str, seed: int) -> tuple[list[_Wanted], str, Color, Color, Color]:
    words = _words(prompt)
    wanted = _parse_objects(words, _CLIP_SHAPES) or [_Wanted("circle", 1, None)]
    ws = set(words)
    if ws & {"orbit", "orbiting", "circling", "spinning", "spin", "swirling"}:
        motion = "orbit"
    elif ws & {"rolling", "roll", "sliding", "across"}:
        motion = "roll"
    else:
        motion = "bounce"
    scene = _scene_for(words, _rng("clip-scene", seed, prompt))
    # A colour named after "on"/"in"/"floor"/"sky" tints the backdrop rather than the object.
    floor = scene.ground
    sky_top, sky_bottom = scene.sky_top, scene.sky_bottom
    for i, word in enumerate(words):
        if word in COLORS and i + 1 < len(words):
            nxt = words[i + 1]
            if nxt in {"floor", "ground", "room", "table"}:
                floor = COLORS[word]
            elif nxt == "sky":
                sky_top, sky_bottom = (
                    _mix(COLORS[word], (0, 0, 0), 0.3),
                    _mix(COLORS[word], (255, 255, 255), 0.3),
                )
    return wanted, motion, sky_top, sky_bottom, floor


def _clip_background(size: int, sky_top: Color, sky_bottom: Color, floor: Color, horizon: int) -> np.ndarray:
    arr = np.empty((size, size, 3), dtype=np.float32)
    t = np.linspace(0.0, 1.0, horizon, dtype=np.float32)[:, None]
    arr[:horizon] = (np.array(sky_top) * (1 - t) + np.array(sky_bottom) * t)[:, None, :]
    arr[horizon:] = np.array(floor, dtype=np.float32)
    arr[horizon : horizon + max(1, size // 80)] *= 0.75  # a horizon line
    return arr.clip(0, 255).astype(np.uint8)


def _encode_mp4(frames: Iterable[np.ndarray], *, size: int, fps: int) -> bytes:
    # "+faststart" rewrites the file after the last packet, which needs a real path, not BytesIO.
    with tempfile.TemporaryDirectory(prefix="rl-clip-") as tmp:
        path = os.path.join(tmp, "clip.mp4")
        with av.open(path, "w", format="mp4", options={"movflags": "+faststart"}) as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width = size
            stream.height = size
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": "28", "preset": "veryfast", "profile": "high", "threads": "1"}
            for i, rgb in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
                frame.pts = i
                frame.time_base = Fraction(1, fps)
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
        with open(path, "rb") as fh:
            return fh.read()


def render_clip(
    prompt: str, *, seed: int, size: int = 160, seconds: float = 2.0, fps: int = 24, style: str = "clean"
) -> bytes:
    """An H.264 (yuv420p) MP4 with the index up front of shapes moving as the prompt says.

    Colour, shape and count come from the prompt ("two yellow balls"), the motion from its verbs
    (bouncing by default, "rolling", "orbiting"/"spinning"), and the backdrop from words like
    "night", "sunset", "snow", "sea" or "<colour> floor". ``style="noisy"`` stutters (positions
    update every third frame), shakes, flickers, is blurred and grainy, and may get colours wrong.
    """
    _check_style(style)
    if size % 2 or not 16 <= size <= 1024:
        raise ValueError(f"size must be even and between 16 and 1024 pixels (yuv420p), got {size}")
    if not 1 <= fps <= 60:
        raise ValueError(f"fps must be between 1 and 60, got {fps}")
    n_frames = round(seconds * fps)
    if not 1 <= n_frames <= 600:
        raise ValueError(f"seconds * fps must give 1..600 frames, got {n_frames}")

    wanted, motion, sky_top, sky_bottom, floor = _clip_plan(prompt, seed)
    layout = _rng("clip-layout", seed, prompt)
    flaws = _rng("clip-flaws", seed, prompt)
    noisy = style == "noisy"
    scale = 1 if noisy else 2  # clean frames are drawn at 2x and downsampled (anti-aliasing)
    canvas = size * scale
    horizon = int(canvas * 0.72)
    background = Image.fromarray(_clip_background(canvas, sky_top, sky_bottom, floor, horizon), "RGB")

    movers: list[_Mover] = []
    for want in wanted:
        color = want.color
        if color is None or (noisy and flaws.random() < 0.4):
            color = layout.choice([c for name, c in COLORS.items() if name not in {"gray", "grey"}])
        for _ in range(want.count):
            movers.append(
                _Mover(
                    kind=want.kind,
                    color=color,
                    r=layout.uniform(0.07, 0.11) * canvas / max(1.0, want.count**0.3),
                    x0=layout.uniform(0.15, 0.85),
                    vx=layout.choice([-1, 1]) * layout.uniform(0.25, 0.6),
                    period=layout.uniform(0.7, 1.2),
                    phase=layout.uniform(0.0, 1.0),
                    height=layout.uniform(0.35, 0.6),
                )
            )
    gen = _np_rng(flaws)
    shake = [(flaws.randint(-3, 3), flaws.randint(-3, 3)) for _ in range(n_frames)]

    def frame_at(i: int) -> np.ndarray:
        t = ((i // 3) * 3 if noisy else i) / fps
        img = background.copy()
        draw = ImageDraw.Draw(img)
        for m in movers:
            r = m.r
            if motion == "orbit":
                ang = 2 * math.pi * (t / (m.period * 2) + m.phase)
                cx = canvas / 2 + math.cos(ang) * canvas * 0.28 * m.height * 1.5
                cy = canvas * 0.4 + math.sin(ang) * canvas * 0.2
            else:
                span = 1.0 - 2 * r / canvas
                pos = (m.x0 + m.vx * t) % (2 * span)
                cx = r + (pos if pos <= span else 2 * span - pos) * canvas
                if motion == "bounce":
                    u = ((t / m.period) + m.phase) % 1.0
                    cy = horizon - r - 4 * u * (1 - u) * m.height * horizon
                else:
                    cy = horizon - r
            fill = m.color
            outline = None if noisy else _mix(fill, (0, 0, 0), 0.45)
            width = max(1, scale)
            if m.kind == "circle":
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill, outline=outline, width=width)
                if motion == "roll" and not noisy:
                    ang = cx / r  # rolling without slipping: a spoke shows the spin
                    draw.line(
                        (cx, cy, cx + r * math.cos(ang), cy + r * math.sin(ang)), fill=outline, width=width
                    )
            else:
                n = 4 if m.kind == "square" else 3
                ang = (cx / r if motion in {"roll", "orbit"} else 0.0) + (
                    math.pi / 4 if n == 4 else -math.pi / 2
                )
                rad = r * (1.3 if n == 4 else 1.2)
                pts = [
                    (
                        cx + rad * math.cos(ang + k * 2 * math.pi / n),
                        cy + rad * math.sin(ang + k * 2 * math.pi / n),
                    )
                    for k in range(n)
                ]
                if motion != "orbit":
                    # Rest the lowest corner where a ball's bottom would be, not sunk into the floor.
                    lift = max(py for _, py in pts) - (cy + r)
                    pts = [(px, py - lift) for px, py in pts]
                draw.polygon(pts, fill=fill, outline=outline)
        if not noisy:
            return np.asarray(img.resize((size, size), Image.Resampling.BILINEAR))
        img = img.filter(ImageFilter.GaussianBlur(radius=1.4))
        arr = np.asarray(img, dtype=np.float32)
        dx, dy = shake[i]
        arr = np.roll(arr, (dy, dx), axis=(0, 1))
        arr = arr * (0.85 + 0.25 * flaws.random()) + gen.normal(0.0, 6.0, arr.shape).astype(np.float32)
        return arr.clip(0, 255).astype(np.uint8)

    return _encode_mp4((frame_at(i) for i in range(n_frames)), size=size, fps=fps)


# --- Text -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Topic:
    keys: tuple[str, ...]
    title: str
    answer: str
    points: tuple[str, ...]
    code: str = ""
    code_lang: str = ""
    tangent: str = ""


_HASHMAP_CODE = """\
buckets = [[] for _ in range(8)]

def put(key, value):
    bucket = buckets[hash(key) % len(buckets)]
    for i, (k, _) in enumerate(bucket):
        if k == key:
            bucket[i] = (key, value)
            return
    bucket.append((key, value))"""

_PALINDROME_CODE = """\
def is_palindrome(text: str) -> bool:
    cleaned = [c.casefold() for c in text if c.isalnum()]
    return cleaned == cleaned[::-1]


assert is_palindrome("A man, a plan, a canal: Panama")
assert not is_palindrome("rewardloop")"""

_COMMENTS_CODE = """\
const p = document.createElement("p");
p.textContent = comment.body;  // shown, never executed
list.appendChild(p);"""

_TUPLE_CODE = """\
point = (3, 4)          # a fixed record
scores = [90, 72, 85]   # a growing collection
scores.append(60)
seen = {point}          # tuples can be set members"""

_TOPICS: tuple[_Topic, ...] = (
    _Topic(
        keys=("hash map", "hashmap", "hash table", "collision"),
        title="Hash map collisions",
        answer=(
            "A hash map resolves collisions either by chaining entries that share a bucket or by probing "
            "for another free slot."
        ),
        points=(
            "**Separate chaining**: each bucket holds a small list; colliding keys are appended and found by "
            "comparing keys one by one.",
            "**Open addressing**: on a collision the map probes other slots (linear, quadratic or double "
            "hashing) until it finds a free one.",
            "**Resizing**: when the load factor passes a threshold (often 0.75) the table grows and every "
            "key is re-hashed, which keeps chains short.",
            "**Good hash functions** spread keys evenly, so collisions stay rare and lookups stay O(1) on "
            "average.",
        ),
        code=_HASHMAP_CODE,
        code_lang="python",
        tangent="Hashing reminds me of library card catalogues, which were honestly a whole thing back then.",
    ),
    _Topic(
        keys=("palindrome",),
        title="Palindrome check",
        answer=(
            "Normalise the string (keep letters and digits, lower-case them) and compare it with its reverse."
        ),
        points=(
            'Filtering with `str.isalnum` ignores spaces and punctuation, so "A man, a plan..." passes.',
            "`casefold()` is a stricter `lower()` for non-English text.",
            "Slicing with `[::-1]` reverses in O(n); a two-pointer loop avoids the copy if memory matters.",
        ),
        code=_PALINDROME_CODE,
        code_lang="python",
        tangent="Racecar is a palindrome, and so is kayak, and I think level, and probably some others.",
    ),
    _Topic(
        keys=("commit message", "commit messages", "commit"),
        title="Clear commit messages",
        answer="Write a short imperative summary line, then explain *why* the change was needed.",
        points=(
            '**Summary under ~50 characters, imperative mood**: "Fix lease expiry race", not "fixed stuff".',
            "**Blank line, then the why**: what was wrong, what the change does about it, what you "
            "considered.",
            "**One logical change per commit**, so the message can describe it honestly and a revert is "
            "clean.",
        ),
        tangent="Some people like emojis in commits, which is a debate for another day really.",
    ),
    _Topic(
        keys=("sky blue", "sky is blue", "blue sky"),
        title="Why the sky is blue",
        answer=(
            "Air molecules scatter short (blue) wavelengths of sunlight much more strongly than long (red) "
            "ones, so blue light reaches your eyes from every direction of the sky."
        ),
        points=(
            "This is **Rayleigh scattering**: its strength grows roughly with 1/wavelength⁴.",
            "Violet scatters even more, but sunlight has less of it and our eyes are less sensitive to it.",
            "At sunset light crosses much more air, the blue is scattered away, and reds and oranges remain.",
        ),
        tangent="Also the ocean is blue, which might be the sky reflecting, or not, people argue about it.",
    ),
    _Topic(
        keys=("comments safely", "user-submitted", "user submitted", "xss", "escape", "display user"),
        title="Showing user comments safely",
        # The literal tag in prose is deliberate: the labeling UI must show it as text, not run it.
        answer=(
            'Treat every comment as untrusted text: if a visitor posts <script>alert("xss")</script> and '
            "the page inserts it as HTML, that script runs in every reader's browser. Escape it instead, "
            "so it shows up as the harmless characters it is."
        ),
        points=(
            "**Escape on output** with your template engine's auto-escaping (Django, Jinja2 and React all "
            "do this by default); never mark user text as safe.",
            "**Render markdown through a sanitiser** that allows a short list of tags and strips attributes "
            "such as `onerror`.",
            "**Set a Content-Security-Policy** that forbids inline scripts, as a second line of defence.",
            "In JavaScript, assign `textContent`, not `innerHTML`.",
        ),
        code=_COMMENTS_CODE,
        code_lang="javascript",
        tangent="Browsers are really complicated programs, millions of lines, amazing that they work at all.",
    ),
    _Topic(
        keys=("list and a tuple", "tuple", "list vs tuple"),
        title="Lists and tuples",
        answer=(
            "A list is mutable and meant for a varying number of similar items; a tuple is immutable and "
            "usually holds a fixed record of possibly different things."
        ),
        points=(
            "Tuples are **hashable** when their items are, so they can be dict keys or set members; lists "
            "cannot.",
            "Lists have `append`, `extend`, `sort` and friends; tuples only `count` and `index`.",
            "Tuples are slightly smaller and faster to create, which rarely matters; pick by meaning.",
        ),
        code=_TUPLE_CODE,
        code_lang="python",
        tangent="In some languages there are also arrays and vectors and slices, which is a lot of names.",
    ),
    _Topic(
        keys=("castling", "chess"),
        title="Castling",
        answer=(
            "Castling moves the king two squares toward a rook and puts that rook on the square the king "
            "crossed, in a single move."
        ),
        points=(
            "Neither the king nor that rook may have moved earlier in the game.",
            "All squares between them must be empty.",
            "The king may not be in check, pass through an attacked square, or land in check.",
            "Kingside (O-O) and queenside (O-O-O) are both allowed under these rules.",
        ),
        tangent="Chess is very old, maybe from India, and there are so many openings it is hard to remember.",
    ),
    _Topic(
        keys=("bakery",),
        title="A name for the bakery",
        answer='**Name:** "Crumb & Corner". **Tagline:** "Baked this morning, two doors down."',
        points=(
            "It is short, easy to say and hints at a neighbourhood shop.",
            "The tagline promises freshness and closeness, the two reasons people pick a local bakery.",
            'Alternatives: "Rise & Shine Bakehouse" ("Up before you, so you don\'t have to be"), '
            '"The Daily Loaf" ("Your street\'s oven").',
        ),
        tangent="I once had a croissant that was very good, I forget where, possibly a train station.",
    ),
)

_OPENERS_CLEAN = ("", "In short: ", "Short answer: ")
_CLOSERS_CLEAN = (
    "That covers the essentials; the details above are what matters most in practice.",
    "If you keep those points in mind you will get this right in almost every case.",
    "Those few rules explain nearly all of the behaviour you will run into.",
)
_OPENERS_NOISY = (
    "Great question!! So basically, ",
    "Ok so this is actually a really interesting topic and there is a lot to say, but ",
    "Well, it depends, but generally speaking and in most cases, kind of, ",
)
_FILLERS_NOISY = (
    "As I said before, ",
    "It is important to note that, ",
    "Basically, ",
    "Again, to reiterate, ",
    "Anyway, ",
)
_CLOSERS_NOISY = (
    "Hope this helps!! Let me know if you have any other questions or anything else.",
    "So yeah, that's basically it, more or less, I think.",
    "There is a lot more to say but that's the gist of it probably.",
)


def _topic_for(prompt: str) -> _Topic:
    low = prompt.lower()
    for topic in _TOPICS:
        if any(key in low for key in topic.keys):
            return topic
    subject = prompt.strip().rstrip("?.!") or "this"
    return _Topic(
        keys=(),
        title=subject[:1].upper() + subject[1:60],
        answer=f"Here is a direct answer to \u201c{subject}\u201d, followed by the points that matter.",
        points=(
            "Start from the goal: what should be true when you are done, and how you will check it.",
            "Split the work into small steps you can verify one at a time.",
            "Prefer the simplest approach that works, then improve what measurement shows is slow or wrong.",
        ),
        tangent="This is a bit like cooking, where you also have steps, and sometimes it burns.",
    )


def _misspell(text: str, rng: random.Random, rate: float) -> str:
    out = []
    for word in text.split(" "):
        if len(word) > 4 and word.isalpha() and rng.random() < rate:
            i = rng.randrange(1, len(word) - 2)
            word = word[:i] + word[i + 1] + word[i] + word[i + 2 :]
        out.append(word)
    return " ".join(out)


def compose_text(prompt: str, *, seed: int, style: str = "clean") -> str:
    """A markdown answer to ``prompt``: helpful and structured when ``style="clean"``, rambling,
    repetitive, off-topic and misspelt when ``"noisy"``. Deterministic for (prompt, seed, style).

    Answers are templated from a small table of topics (the text entries of ``DEMO_PROMPTS``) with
    a generic fallback for other prompts. The answer for the "user comments" prompt quotes a
    literal ``<script>`` tag in its prose, to show that the labeling UI escapes sample text.
    """
    _check_style(style)
    topic = _topic_for(prompt)
    rng = _rng("text", style, seed, prompt)
    points = list(topic.points)
    if style == "clean":
        n = max(2, len(points) - rng.randint(0, 1))
        parts = [f"{rng.choice(_OPENERS_CLEAN)}{topic.answer}"]
        if rng.random() < 0.5:
            parts.insert(0, f"### {topic.title}")
        bullet = rng.choice(["numbered", "dash"])
        parts.append(
            "\n".join(f"{i + 1}. {p}" if bullet == "numbered" else f"- {p}" for i, p in enumerate(points[:n]))
        )
        if topic.code and rng.random() < 0.85:
            parts.append(f"```{topic.code_lang}\n{topic.code}\n```")
        parts.append(rng.choice(_CLOSERS_CLEAN))
        return "\n\n".join(parts) + "\n"

    # The worse generator: no structure, repeats itself, wanders off, drops half the substance.
    rng.shuffle(points)
    kept = points[: max(1, len(points) // 2)]
    answer = topic.answer[0].lower() + topic.answer[1:]
    sentences = [f"{rng.choice(_OPENERS_NOISY)}{answer}"]
    for p in kept:
        plain = p.replace("**", "")
        sentences.append(f"{rng.choice(_FILLERS_NOISY)}{plain[0].lower() + plain[1:]}")
        if rng.random() < 0.5:
            sentences.append(f"{rng.choice(_FILLERS_NOISY)}{answer}")  # repetition
    sentences.insert(rng.randint(1, len(sentences)), topic.tangent)
    paragraph_break = rng.randint(2, max(2, len(sentences) - 1))
    first = " ".join(sentences[:paragraph_break])
    second = " ".join(sentences[paragraph_break:])
    text = _misspell(first, rng, 0.06) + "\n\n" + _misspell(second, rng, 0.06)
    if topic.code and rng.random() < 0.4:
        # Half a code block, without a language tag, cut off mid-way.
        lines = topic.code.splitlines()
        text += "\n\nsomething like:\n\n```\n" + "\n".join(lines[: max(1, len(lines) // 2)]) + "\n```"
    return text + "\n\n" + rng.choice(_CLOSERS_NOISY) + "\n"
