"""Simulated annotators: they log in with a token and judge through the same REST API as people
(``GET next``, ``POST judgments``, ``POST skip``), fetching the media they judge from the same
URLs the labeling page loads (or, in tests, call the services behind those views).

Each has a hidden preference over outputs (a score: higher is better), a noise rate (the verdict
is flipped), a position bias (the left one is picked whatever it shows), a speed (mean think time)
and may be a spammer (a random verdict every time). One implementation serves the demo
(``manage.py simulate_annotators`` and the ``simulate.tasks.simulate_annotators`` task), the
benches and the tests (``tests/rewards/helpers.simulate`` included), where the preference is the
known truth.

Preferences (``preference_from_spec``):
- ``brightness``: the mean luminance of an image or of a video's frames;
- ``color:#rrggbb``: closeness of the mean colour to that colour;
- ``length``: a text's length in characters;
- ``structure``: a tidy text: markdown list items, headings and code fences, less rambling fillers;
- ``keyword:<word>``: how often a text says the word (case-insensitive);
- ``reward_model:<dir>``: a saved reward model version (``RewardFunction.from_pretrained``), the
  hidden "gold" reward.
A ``Rule`` is a preference written as a plain rule over the shown ``Sample`` rows (their metadata,
generator version, prompt): the known truth of a test. A profile may also judge each aspect by its
own preference, and flag artifacts on the samples a predicate holds for.

Transports: ``HttpClient`` talks to a running server (keep-alive http.client); ``DjangoClient``
calls the Django app in-process through its whole request stack (URLs, middleware, DRF), for tests
and Celery tasks that run beside the web process; ``ServiceClient`` calls the labeling services
the views call, with no request stack, for tests where the views are not what is tested.
"""

from __future__ import annotations

import http.client
import io
import json
import math
import random
import re
import threading
import time
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cmp_to_key
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # Django may not be set up where only HttpClient is wanted (the benches)
    from annotate.models import Sample

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


# Lines that give an answer structure: list items, headings, code fences (markdown).
_STRUCTURED_LINE = re.compile(r"^\s*(?:[-*+] |\d+[.)] |#{1,6} |```)")
# Rambling that says nothing (the noisy answers of ``simulate.generators.compose_text`` use these).
_FILLERS = ("basically", "anyway", "as i said", "to reiterate", "it is important to note", "kind of", "!!")


@dataclass
class Structure:
    """A tidy answer: +1 for each markdown list item, heading or code fence line, -1 for each
    filler ("basically", "anyway", "!!", ...). The text loop demo's annotators judge by it."""

    name: str = "structure"

    def scores(self, prompts: Sequence[str], outputs: Sequence[Output]) -> list[float]:
        out = []
        for o in outputs:
            text = o.text.casefold()
            lines = sum(1 for line in o.text.splitlines() if _STRUCTURED_LINE.match(line))
            out.append(float(lines - sum(text.count(f) for f in _FILLERS)))
        return out


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


class RuleError(Exception):
    """A rule answered something other than one of the two samples' ids, "tie" or "both_bad"."""


class Rule:
    """A preference given as a plain rule over the shown ``annotate.models.Sample`` rows, for a
    truth that lives in the database (a sample's metadata, its generator version, its prompt):
    ``rule(a, b)`` returns the preferred sample's id, ``"tie"`` or ``"both_bad"``. A ranking is
    ordered by it (best first; "tie" and "both_bad" keep the shown order).

    The annotator reads the rows itself and fetches no media, so it must run beside the database:
    ``ServiceClient``, ``DjangoClient``, or ``HttpClient`` against a test's live server."""

    name = "rule"

    def __init__(self, rule: Callable[[Sample, Sample], int | str]) -> None:
        self.rule = rule

    def pick(self, left: Sample, right: Sample) -> str:
        """``left``, ``right``, ``tie`` or ``both_bad``, as the rule says."""
        verdict = self.rule(left, right)
        if verdict in ("tie", "both_bad"):
            return str(verdict)
        if verdict == left.id:
            return "left"
        if verdict == right.id:
            return "right"
        raise RuleError(f"the rule answered {verdict!r} for samples {left.id} and {right.id}")

    def rank(self, shown: Sequence[Sample]) -> list[int]:
        """The shown samples' ids, best first."""
        order = {"left": -1, "right": 1}

        def compare(a: Sample, b: Sample) -> int:
            return order.get(self.pick(a, b), 0)

        return [s.id for s in sorted(shown, key=cmp_to_key(compare))]


def preference_from_spec(spec: str) -> Preference:
    """A preference from its spec (see the module docstring); ``ValueError`` names what is wrong."""
    kind, _, arg = spec.partition(":")
    if kind == "brightness" and not arg:
        return Brightness()
    if kind == "length" and not arg:
        return Length()
    if kind == "structure" and not arg:
        return Structure()
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
        f"unknown preference {spec!r}: brightness, color:#rrggbb, length, structure, keyword:<word> or "
        "reward_model:<dir>"
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


class ServiceClient:
    """The labeling services the views call (``labeling_next``, ``labeling_submit``,
    ``assignment_skip``), in-process with no request stack: the same three operations, JSON bodies
    and refusals (a ``ServiceError`` as the status and error body the API sends) as the REST API,
    at the cost of the SQL alone. For tests that need judged comparisons where the views are not
    what is tested; it answers only the paths a ``SimulatedAnnotator`` uses.

    Like any service caller it is trusted: ``source`` is taken as sent, and ``fetch`` reads a
    sample's file from storage without the media view's membership check."""

    _LABELING = re.compile(r"/api/projects/(?P<slug>[^/]+)/(?P<op>next|judgments|skip)/(?:\?(?P<query>.*))?")
    _MEDIA = re.compile(r"/media/samples/(?P<id>\d+)(?:\?.*)?")

    def __init__(self, annotator: Any) -> None:
        self.annotator = annotator

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        from annotate import selectors, services
        from annotate.errors import NotFound, ServiceError

        m = self._LABELING.fullmatch(path)
        b = body or {}
        try:
            if m is None or (method == "GET") != (m["op"] == "next"):
                raise NotFound(f"{method} {path} is not a labeling operation")
            slug = m["slug"]
            if m["op"] == "next":
                query = urllib.parse.parse_qs(m["query"] or "")
                n = int(query.get("n", ["1"])[0])
                return 200, json.loads(services.labeling_next(slug=slug, annotator=self.annotator, n=n))
            if m["op"] == "judgments":
                done = services.labeling_submit(
                    slug=slug,
                    annotator=self.annotator,
                    assignment_id=int(b["assignment"]),
                    choice=b.get("choice"),
                    ranking=b.get("ranking"),
                    aspects=b.get("aspects") or {},
                    rationale=str(b.get("rationale", "")),
                    artifacts=b.get("artifacts") or [],
                    time_spent_ms=int(b.get("time_spent_ms", 0)),
                    idempotency_key=str(b.get("idempotency_key", "")),
                    source=str(b.get("source") or "api"),  # a token client's default
                )
                return (201 if done.created else 200), json.loads(done.body)
            project, _ = selectors.project_for_member(slug=slug, user=self.annotator)
            a = services.assignment_skip(
                project=project, annotator=self.annotator, assignment_id=int(b["assignment"])
            )
            return 200, {"assignment": a.id, "status": a.status}
        except ServiceError as exc:
            return exc.status, {"error": {"code": exc.code, "message": exc.message, "details": exc.details}}

    def fetch(self, path: str) -> bytes:
        from annotate.models import Sample

        m = self._MEDIA.fullmatch(path)
        sample = Sample.objects.filter(id=int(m["id"])).first() if m else None
        if sample is None or not sample.media:
            raise OSError(f"GET {path}: 404")
        with sample.media.open("rb") as fh:
            return bytes(fh.read())

    def close(self) -> None:
        pass


# --- The annotator ------------------------------------------------------------------------------
@dataclass
class Profile:
    """How one simulated annotator judges."""

    preference: Preference | Rule
    noise: float = 0.0  # probability that a verdict is flipped (never a tie or both_bad)
    position_bias: float = 0.0  # probability of picking the left output whatever it shows
    think_ms: float = 0.0  # mean time spent per judgment (exponential), slept before submitting
    spammer: bool = False  # a random verdict every time
    tie_margin: float = 0.0  # scores this close are a tie (where the project allows ties)
    seed: int = 0
    # Per-aspect outcomes (pairwise projects). None: every aspect gets the overall verdict. A
    # mapping: each aspect it names is judged by its own preference (and noise), the others are
    # left unanswered, as a person may leave them.
    aspects: Mapping[str, Preference | Rule] | None = None
    # Flags every shown sample it holds for with ``artifact_tags`` (reads the rows, like ``Rule``).
    artifacts: Callable[[Sample], bool] | None = None
    artifact_tags: tuple[str, ...] = ("blur",)

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
        self._rows: dict[int, Sample] = {}
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

    def _shown(self, item: dict[str, Any]) -> list[Sample]:
        """The shown samples as ``Sample`` rows, in shown order (for rules and artifact flags).
        Kept for the run like decoded media: a sample comes back in many comparisons, and its
        row (with the related rows a rule reads) does not change while it is judged."""
        from annotate.models import Sample

        ids = [int(s["id"]) for s in item["samples"]]
        if missing := [i for i in ids if i not in self._rows]:
            if len(self._rows) > 4096:
                self._rows.clear()
            self._rows |= Sample.objects.in_bulk(missing)
        return [self._rows[i] for i in ids]

    def _pick(
        self,
        preference: Preference | Rule,
        item: dict[str, Any],
        options: dict[str, Any],
        shown: Callable[[], list[Sample]],
    ) -> str:
        """The pairwise verdict ``preference`` gives, before noise."""
        if isinstance(preference, Rule):
            left_row, right_row = shown()[:2]
            return preference.pick(left_row, right_row)
        outs = [self._output(s) for s in item["samples"][:2]]
        prompt = str((item.get("prompt") or {}).get("text") or "")
        left, right = preference.scores([prompt, prompt], outs)
        if options.get("tie") and abs(left - right) <= self.profile.tie_margin:
            return "tie"
        return "left" if left > right else "right" if right > left else self.rng.choice(["left", "right"])

    def _noisy(self, pick: str) -> str:
        """``pick``, flipped with probability ``noise``; a tie or both_bad never is."""
        if pick in ("left", "right") and self.rng.random() < self.profile.noise:
            return "right" if pick == "left" else "left"
        return pick

    def verdict(
        self,
        item: dict[str, Any],
        options: dict[str, Any],
        mode: str,
        aspects: Sequence[dict[str, Any]] = (),
    ) -> dict[str, Any]:
        """The judgment body for one lease (without assignment, key and timing): the choice or the
        ranking, the outcome for each of the project's ``aspects``, the artifact flags.

        Random draws, in this order: the spammer's verdict; the position bias (only where it is
        above 0); a coin for equal scores; the noise of the verdict, then of each aspect judged on
        its own, in the project's order (only for a left/right verdict). So a profile without
        bias draws once per flippable verdict, as ``tests/rewards/helpers.simulate`` always did."""
        p, rng = self.profile, self.rng
        rows: list[Sample] = []

        def shown() -> list[Sample]:  # read at most once per lease, and only when asked for
            if not rows:
                rows.extend(self._shown(item))
            return rows

        body: dict[str, Any]
        if mode == "ranking":
            ids = [int(s["id"]) for s in item["samples"]]
            if p.spammer:
                rng.shuffle(ids)
                body = {"ranking": ids}
            else:
                if isinstance(p.preference, Rule):
                    ranked = p.preference.rank(shown())
                else:
                    outs = [self._output(s) for s in item["samples"]]
                    prompt = str((item.get("prompt") or {}).get("text") or "")
                    scores = p.preference.scores([prompt] * len(outs), outs)
                    ranked = [i for _, i in sorted(zip(scores, ids, strict=True), key=lambda t: -t[0])]
                for k in range(len(ranked) - 1):  # noise: neighbours swapped
                    if rng.random() < p.noise:
                        ranked[k], ranked[k + 1] = ranked[k + 1], ranked[k]
                body = {"ranking": ranked}
        else:
            choices = ["left", "right"] + (["tie"] if options.get("tie") else [])
            own_aspects = p.aspects
            if p.spammer:
                choice, own_aspects = rng.choice(choices), None
            elif p.position_bias and rng.random() < p.position_bias:
                choice, own_aspects = "left", None
            else:
                choice = self._noisy(self._pick(p.preference, item, options, shown))
            body = {"choice": choice}
            keys = [str(a["key"]) for a in aspects]
            if own_aspects is None:
                if keys and choice in ("left", "right", "tie"):
                    body["aspects"] = {k: choice for k in keys}
            elif judged := [k for k in keys if k in own_aspects]:
                body["aspects"] = {
                    k: self._noisy(self._pick(own_aspects[k], item, options, shown)) for k in judged
                }
        if p.artifacts is not None:
            flags = [{"sample": s.id, "tags": list(p.artifact_tags)} for s in shown() if p.artifacts(s)]
            if flags:
                body["artifacts"] = flags
        return body

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
                body = self.verdict(item, options, str(mode or "pairwise"), aspects)
            except (OSError, ValueError) as exc:  # media that cannot be fetched or decoded: skip it
                errors[f"media:{type(exc).__name__}"] += 1
                code, _ = self.client.request(
                    "POST", f"{self.base}/skip/", {"assignment": item["assignment"]}
                )
                res.skips += int(code == 200)
                continue
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
