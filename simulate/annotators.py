"""Simulated annotators: they log in with a token and judge through the same REST API as people
(``GET next``, ``POST judgments``, ``POST skip``), fetching the media they judge from the same
URLs the labeling page loads.

Each has a hidden preference over outputs (a score: higher is better), a noise rate (the verdict
is flipped), a position bias (the left one is picked whatever it shows), a speed (mean think time)
and may be a spammer (a random verdict every time). One implementation serves the demo
(``manage.py simulate_annotators`` and the ``simulate.tasks.simulate_annotators`` task), the
benches and the end-to-end tests, where the preference is the known truth.

Preferences (``preference_from_spec``):
- ``brightness``: the mean luminance of an image or of a video's frames;
- ``color:#rrggbb``: closeness of the mean colour to that colour;
- ``length``: a text's length in characters;
- ``keyword:<word>``: how often a text says the word (case-insensitive);
- ``reward_model:<dir>``: a saved reward model version (``RewardFunction.from_pretrained``), the
  hidden "gold" reward.

Transports: ``HttpClient`` talks to a running server (keep-alive http.client); ``DjangoClient``
calls the Django app in-process through its whole request stack (URLs, middleware, DRF), for tests
and Celery tasks that run beside the web process.
"""

from __future__ import annotations

import http.client
import io
import json
import math
import random
import threading
import time
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from PIL import Image

REQUEST_TIMEOUT_S = 30.0
MAX_FAILURES = 20  # refused submissions in a row before an annotator gives up


# --- What a simulated annotator sees ------------------------------------------------------------
@dataclass
class Output:
    """One sample as shown: its text, or its decoded image, or its video's frames."""

    modality: str
    text: str = ""
    image: Image.Image | None = None
    frames: list[Image.Image] = field(default_factory=list)

    def pictures(self) -> list[Image.Image]:
        return [self.image] if self.image is not None else list(self.frames)


def decode(modality: str, data: bytes, *, max_frames: int = 8) -> Output:
    """An image or a video (up to ``max_frames`` evenly spread frames, through PyAV) from its bytes."""
    if modality == "image":
        with Image.open(io.BytesIO(data)) as im:
            return Output("image", image=im.convert("RGB"))
    import av

    with av.open(io.BytesIO(data), mode="r") as container:
        frames = [f.to_image().convert("RGB") for f in container.decode(video=0)]
    if len(frames) > max_frames:
        step = len(frames) / max_frames
        frames = [frames[int(k * step)] for k in range(max_frames)]
    return Output("video", frames=frames)


# --- Preferences -------------------------------------------------------------------------------
class Preference(Protocol):
    """A hidden preference: ``scores(prompts, outputs)`` gives one float per output, higher better."""

    name: str

    def scores(self, prompts: Sequence[str], outputs: Sequence[Output]) -> list[float]: ...


def _luminance(im: Image.Image) -> float:
    return float(np.asarray(im.convert("L"), dtype=np.float64).mean() / 255.0)


@dataclass
class Brightness:
    name: str = "brightness"

    def scores(self, prompts: Sequence[str], outputs: Sequence[Output]) -> list[float]:
        return [
            float(np.mean([_luminance(p) for p in o.pictures()])) if o.pictures() else 0.0 for o in outputs
        ]


@dataclass
class Colour:
    rgb: tuple[int, int, int]
    name: str = "color"

    def scores(self, prompts: Sequence[str], outputs: Sequence[Output]) -> list[float]:
        target = np.array(self.rgb, dtype=np.float64)
        out = []
        for o in outputs:
            pics = o.pictures()
            if not pics:
                out.append(-math.inf)
                continue
            mean = np.mean([np.asarray(p, dtype=np.float64).reshape(-1, 3).mean(0) for p in pics], axis=0)
            out.append(-float(np.linalg.norm(mean - target)) / 441.7)  # 0 best, -1 the far corner
        return out


@dataclass
class Length:
    name: str = "length"

    def scores(self, prompts: Sequence[str], outputs: Sequence[Output]) -> list[float]:
        return [float(len(o.text)) for o in outputs]


@dataclass
class Keyword:
    word: str
    name: str = "keyword"

    def scores(self, prompts: Sequence[str], outputs: Sequence[Output]) -> list[float]:
        w = self.word.casefold()
        return [float(o.text.casefold().count(w)) for o in outputs]


class GoldRewardModel:
    """A saved reward model version as the hidden truth (loaded once, shared by threads)."""

    name = "reward_model"

    def __init__(self, directory: str) -> None:
        from rewards.ml.reward_fn import RewardFunction

        self.directory = directory
        self.reward = RewardFunction.from_pretrained(directory)
        self._lock = threading.Lock()

    def scores(self, prompts: Sequence[str], outputs: Sequence[Output]) -> list[float]:
        items: list[Any] = [o.text if o.modality == "text" else (o.image or o.frames) for o in outputs]
        with self._lock:  # one model, many annotator threads
            return self.reward(list(prompts), items)


def preference_from_spec(spec: str) -> Preference:
    """A preference from its spec (see the module docstring); ``ValueError`` names what is wrong."""
    kind, _, arg = spec.partition(":")
    if kind == "brightness" and not arg:
        return Brightness()
    if kind == "length" and not arg:
        return Length()
    if kind == "keyword" and arg.strip():
        return Keyword(arg.strip())
    if kind == "color":
        value = arg.strip().lstrip("#")
        if len(value) == 6 and all(c in "0123456789abcdefABCDEF" for c in value):
            rgb = (int(value[0:2], 16), int(value[2:4], 16), int(value[4:6], 16))
            return Colour(rgb)
        raise ValueError(f"color needs #rrggbb, got {arg!r}")
    if kind == "reward_model" and arg:
        return GoldRewardModel(arg)
    raise ValueError(
        f"unknown preference {spec!r}: brightness, color:#rrggbb, length, keyword:<word> or reward_model:<dir>"
    )


# --- Transports ---------------------------------------------------------------------------------
class Client(Protocol):
    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]: ...

    def fetch(self, path: str) -> bytes: ...

    def close(self) -> None: ...


class HttpClient:
    """A lean keep-alive HTTP/1.1 JSON client (http.client): a load generator that shares the cores
    with the server it drives should spend as little CPU per request as it can."""

    def __init__(self, url: str, token: str, *, timeout: float = REQUEST_TIMEOUT_S) -> None:
        parts = urllib.parse.urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.headers = {"Authorization": f"Token {token}", "Accept": "application/json"}
        self.timeout = timeout
        self.conn: http.client.HTTPConnection | None = None

    def _send(self, method: str, path: str, data: bytes | None, headers: dict[str, str]) -> tuple[int, bytes]:
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self.conn.request(method, path, body=data, headers=headers)
                resp = self.conn.getresponse()
                raw = resp.read()
            except (http.client.HTTPException, OSError):
                self.close()
                if attempt:
                    raise
                continue  # the server closed an idle keep-alive connection: reconnect once
            if resp.getheader("Connection", "").lower() == "close":
                self.close()
            return resp.status, raw
        raise AssertionError("unreachable")

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        headers = dict(self.headers)
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        code, raw = self._send(method, path, data, headers)
        return code, (json.loads(raw) if raw else None)

    def fetch(self, path: str) -> bytes:
        code, raw = self._send("GET", path, None, {"Authorization": self.headers["Authorization"]})
        if code != 200:
            raise OSError(f"GET {path}: {code}")
        return raw

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class DjangoClient:
    """The Django app in-process (``django.test.Client``): every request goes through URL routing,
    middleware, authentication and the views, as over HTTP, without a socket."""

    def __init__(self, token: str) -> None:
        from django.test import Client as _Client

        self.client = _Client(HTTP_AUTHORIZATION=f"Token {token}", HTTP_ACCEPT="application/json")

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        if method == "GET":
            resp = self.client.get(path)
        else:
            resp = self.client.post(path, json.dumps(body or {}), content_type="application/json")
        raw = resp.content
        return resp.status_code, (json.loads(raw) if raw else None)

    def fetch(self, path: str) -> bytes:
        resp = self.client.get(path)
        if resp.status_code != 200:
            raise OSError(f"GET {path}: {resp.status_code}")
        return resp.getvalue()  # streamed (a FileResponse) or not

    def close(self) -> None:
        pass


# --- The annotator ------------------------------------------------------------------------------
@dataclass
class Profile:
    """How one simulated annotator judges."""

    preference: Preference
    noise: float = 0.0  # probability that a verdict is flipped
    position_bias: float = 0.0  # probability of picking the left output whatever it shows
    think_ms: float = 0.0  # mean time spent per judgment (exponential), slept before submitting
    spammer: bool = False  # a random verdict every time
    tie_margin: float = 0.0  # scores this close are a tie (where the project allows ties)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("noise", "position_bias"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if self.think_ms < 0 or self.tie_margin < 0:
            raise ValueError("think_ms and tie_margin must be >= 0")


@dataclass
class Result:
    labels: int = 0
    skips: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    exhausted: bool = False  # stopped because nothing was left to judge


class SimulatedAnnotator:
    """Judges ``project``'s comparisons through ``client`` as ``profile`` says, until ``max_labels``
    judgments are made, nothing is left to judge, or ``stop()`` is called."""

    def __init__(self, client: Client, project: str, profile: Profile) -> None:
        self.client = client
        self.base = f"/api/projects/{project}"
        self.profile = profile
        self.rng = random.Random(profile.seed)
        self._stop = threading.Event()
        self._media: dict[str, Output] = {}
        self.result = Result()  # updated as it goes (read by progress reports)

    def stop(self) -> None:
        self._stop.set()

    def _output(self, sample: dict[str, Any]) -> Output:
        if sample.get("modality") == "text":
            return Output("text", text=str(sample.get("text") or ""))
        url = str(sample["url"])
        if url not in self._media:
            if len(self._media) > 512:
                self._media.clear()
            self._media[url] = decode(str(sample["modality"]), self.client.fetch(url))
        return self._media[url]

    def verdict(self, item: dict[str, Any], options: dict[str, Any], mode: str) -> dict[str, Any]:
        """The judgment body for one lease (without assignment, key and timing)."""
        p, rng = self.profile, self.rng
        samples = item["samples"]
        if mode == "ranking":
            ids = [int(s["id"]) for s in samples]
            if p.spammer:
                rng.shuffle(ids)
                return {"ranking": ids}
            outs = [self._output(s) for s in samples]
            prompt = str((item.get("prompt") or {}).get("text") or "")
            scores = p.preference.scores([prompt] * len(outs), outs)
            ranked = [i for _, i in sorted(zip(scores, ids, strict=True), key=lambda t: -t[0])]
            for k in range(len(ranked) - 1):  # noise: neighbours swapped
                if rng.random() < p.noise:
                    ranked[k], ranked[k + 1] = ranked[k + 1], ranked[k]
            return {"ranking": ranked}
        choices = ["left", "right"] + (["tie"] if options.get("tie") else [])
        if p.spammer:
            return {"choice": rng.choice(choices)}
        if rng.random() < p.position_bias:
            return {"choice": "left"}
        outs = [self._output(s) for s in samples[:2]]
        prompt = str((item.get("prompt") or {}).get("text") or "")
        left, right = p.preference.scores([prompt, prompt], outs)
        if options.get("tie") and abs(left - right) <= p.tie_margin:
            return {"choice": "tie"}
        pick = "left" if left > right else "right" if right > left else rng.choice(["left", "right"])
        if rng.random() < p.noise:
            pick = "right" if pick == "left" else "left"
        return {"choice": pick}

    def run(self, *, max_labels: int | None = None, idle_polls: int = 3, idle_wait_s: float = 0.2) -> Result:
        res = self.result = Result()
        errors: Counter[str] = Counter()
        idle = failing = 0
        pending: list[dict[str, Any]] = []
        options: dict[str, Any] = {}
        aspects: list[dict[str, Any]] = []
        mode = "pairwise"
        while not self._stop.is_set() and (max_labels is None or res.labels < max_labels):
            if not pending:
                # Never lease more than it will judge: a held lease is withheld from everyone else.
                n = 5 if max_labels is None else max(1, min(5, max_labels - res.labels))
                code, body = self.client.request("GET", f"{self.base}/next/?n={n}")
                if code != 200:
                    errors[f"next:{code}"] += 1
                    if errors[f"next:{code}"] > 20:
                        break
                    time.sleep(idle_wait_s)
                    continue
                pending = list(body.get("items") or [])
                options, aspects, mode = (
                    body.get("options") or {},
                    body.get("aspects") or [],
                    body.get("mode"),
                )
                if not pending:
                    idle += 1
                    if idle >= idle_polls:
                        res.exhausted = True
                        break
                    time.sleep(idle_wait_s)
                    continue
                idle = 0
            item = pending.pop(0)
            started = time.monotonic()
            try:
                body = self.verdict(item, options, str(mode or "pairwise"))
            except (OSError, ValueError) as exc:  # media that cannot be fetched or decoded: skip it
                errors[f"media:{type(exc).__name__}"] += 1
                code, _ = self.client.request(
                    "POST", f"{self.base}/skip/", {"assignment": item["assignment"]}
                )
                res.skips += int(code == 200)
                continue
            if aspects and body.get("choice") in ("left", "right", "tie"):
                body["aspects"] = {a["key"]: body["choice"] for a in aspects}
            if self.profile.think_ms:
                time.sleep(self.rng.expovariate(1.0 / self.profile.think_ms) / 1000)
            body |= {
                "assignment": item["assignment"],
                "time_spent_ms": int((time.monotonic() - started) * 1000),
                "idempotency_key": uuid.uuid4().hex,
                "source": "simulated",
            }
            code, reply = self.client.request("POST", f"{self.base}/judgments/", body)
            if code in (200, 201):
                res.labels += int(code == 201)
                failing = 0
            else:
                errors[f"submit:{code}"] += 1
                failing += 1
                if failing >= MAX_FAILURES:  # the server keeps refusing: stop, do not spin
                    errors[f"gave up: {str((reply or {}).get('error', {}).get('message', ''))[:200]}"] += 1
                    break
                time.sleep(idle_wait_s)
        self.client.close()
        res.errors = dict(errors)
        return res


def run_all(
    annotators: Sequence[SimulatedAnnotator],
    *,
    max_labels: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[Result]:
    """Run annotators side by side (one thread each) and wait for all; ``progress`` is called with
    the total judgments made so far, about twice a second."""

    def one(k: int) -> None:
        annotators[k].run(max_labels=max_labels)

    threads = [threading.Thread(target=one, args=(k,), daemon=True) for k in range(len(annotators))]
    for t in threads:
        t.start()
    try:
        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(timeout=0.5)
            if progress is not None:
                progress(sum(a.result.labels for a in annotators))
    except KeyboardInterrupt:
        for a in annotators:
            a.stop()
        for t in threads:
            t.join()
    return [a.result for a in annotators]
