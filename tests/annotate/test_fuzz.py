"""Property-based tests of the API boundary (hypothesis): whatever a client sends to submit, to
project create or as an import manifest, the answer is never a 5xx, always our JSON shape, and a
refused request changes no row (a digest of every row of every watched table is compared).

``RL_RELIABILITY_REPORT=<file>`` appends each test's tally (inputs tried, refused, 5xx, rows changed
by refusals) as a JSON line: the figures of docs/BENCHMARKS.md's reliability table.
"""

from __future__ import annotations

import csv
import io
import json
import os
import zipfile
from collections import Counter
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from annotate import services
from tests.factories import client_for, png_bytes, rows_digest

pytestmark = pytest.mark.django_db

EXAMPLES = int(os.environ.get("RL_FUZZ_EXAMPLES", "200"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same inputs on every run: CI is reproducible, a failure replays
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)

# Strings that broke storage before: NUL, lone surrogates, over-long, markup, huge numbers as text.
NASTY = st.sampled_from(
    [
        "",
        " ",
        "\x00",
        "a\x00b",
        "\ud800",
        "x\udfff",
        "g" * 201,
        "k" * 70,
        "<script>",
        "9" * 30,
        "NaN",
        "-1",
        "left",
    ]
)
TEXT = st.one_of(NASTY, st.text(max_size=40), st.text(st.characters(codec="utf-8"), max_size=10))
NUMBER = st.one_of(
    st.integers(),
    st.integers(min_value=2**31 - 2, max_value=2**31 + 2),
    st.integers(min_value=2**63 - 2, max_value=2**64),
    st.just(-(2**63) - 1),
    st.floats(allow_nan=True, allow_infinity=True),
)
SCALAR = st.one_of(st.none(), st.booleans(), NUMBER, TEXT)
JSON = st.recursive(
    SCALAR,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)


def _dumps(body: Any) -> bytes:
    # allow_nan: a client can send the NaN/Infinity tokens; the parser must refuse them.
    return json.dumps(body, allow_nan=True).encode()


class Tally:
    def __init__(self, name: str) -> None:
        self.name = name
        self.counts: Counter[str] = Counter()

    def record(self, response: Any, before: dict[str, str], after: dict[str, str]) -> None:
        status = response.status_code
        self.counts["tried"] += 1
        assert status < 500, (status, response.content[:500])
        assert response["Content-Type"].startswith("application/json"), response["Content-Type"]
        body = response.json()
        if status >= 400:
            self.counts["refused"] += 1
            assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}, body
            changed = [t for t in before if before[t] != after[t]]
            self.counts["rows_changed_by_refusals"] += len(changed)
            assert not changed, (status, body, changed)
        else:
            self.counts["accepted"] += 1

    def report(self) -> None:
        path = os.environ.get("RL_RELIABILITY_REPORT")
        if path:
            with open(path, "a") as fh:
                fh.write(json.dumps({"test": self.name, "5xx": 0, **self.counts}) + "\n")


LEASE = object()  # stands for the annotator's current lease id


def test_submit_body_never_5xx_and_refusals_change_nothing(
    manager: Any, annotator: Any, make_project: Any, text_pairs: Any
) -> None:
    project = make_project("fz", annotators=(annotator,), aspects=[{"key": "style"}])
    text_pairs(project, n=EXAMPLES + 5)
    c: Any = client_for(annotator)
    state = {"lease": services.assignment_next(project=project, annotator=annotator)[0]}
    tally = Tally("submit body")
    field_values = {
        "assignment": st.one_of(st.just(LEASE), st.just(LEASE), JSON),
        "choice": st.one_of(st.sampled_from(["left", "right", "tie", "both_bad"]), JSON),
        "ranking": JSON,
        "aspects": st.one_of(
            st.dictionaries(st.sampled_from(["style", "other"]) | TEXT, JSON, max_size=3), JSON
        ),
        "rationale": st.one_of(TEXT, JSON),
        "artifacts": st.one_of(
            st.lists(st.dictionaries(st.sampled_from(["sample", "tags", "regions"]), JSON)), JSON
        ),
        "time_spent_ms": st.one_of(NUMBER, JSON),
        "idempotency_key": st.one_of(TEXT, JSON),
        "source": st.one_of(st.sampled_from(["ui", "api", "simulated", "import"]), JSON),
    }
    bodies = st.one_of(
        st.fixed_dictionaries({}, optional=field_values),
        st.fixed_dictionaries(
            {"assignment": st.just(LEASE), "choice": st.sampled_from(["left", "right"])},
            optional={k: v for k, v in field_values.items() if k not in ("assignment", "choice")},
        ),
        JSON,
    )

    @SETTINGS
    @given(body=bodies, next_n=st.one_of(st.none(), st.sampled_from(["0", "3", "-1", "99", "x", "9" * 30])))
    def run(body: Any, next_n: str | None) -> None:
        if isinstance(body, dict):
            body = {k: (state["lease"].id if v is LEASE else v) for k, v in body.items()}
        url = f"/api/projects/{project.slug}/judgments/" + (f"?next={next_n}" if next_n is not None else "")
        before = rows_digest()
        r = c.generic("POST", url, _dumps(body), "application/json")
        tally.record(r, before, rows_digest())
        if r.status_code in (200, 201):
            state["lease"] = services.assignment_next(project=project, annotator=annotator)[0]

    run()
    tally.report()
    assert tally.counts["refused"] > 0 and tally.counts["accepted"] > 0, tally.counts


def test_project_body_never_5xx_and_refusals_change_nothing(manager: Any) -> None:
    c: Any = client_for(manager)
    tally = Tally("project body")
    fields = {
        "slug": st.one_of(st.from_regex(r"[a-z0-9_-]{1,12}", fullmatch=True), JSON),
        "name": st.one_of(st.text(min_size=1, max_size=20), JSON),
        "modality": st.one_of(st.sampled_from(["", "image", "video", "text", "audio"]), JSON),
        "instructions": st.one_of(TEXT, JSON),
        "allow_tie": JSON,
        "allow_both_bad": JSON,
        "aspects": st.one_of(
            st.lists(st.fixed_dictionaries({"key": TEXT}, optional={"label": TEXT}), max_size=3), JSON
        ),
        "mode": st.one_of(st.sampled_from(["pairwise", "ranking", "other"]), JSON),
        "k": st.one_of(st.integers(0, 20), NUMBER, JSON),
        "overlap": st.one_of(st.integers(0, 120), NUMBER),
        "gold_rate": st.one_of(st.floats(-1, 2), NUMBER, JSON),
        "lease_seconds": st.one_of(st.integers(0, 10**6), NUMBER),
        "undo_seconds": st.one_of(st.integers(-1, 4000), NUMBER),
    }
    bodies = st.one_of(
        st.fixed_dictionaries(
            {
                "slug": st.from_regex(r"[a-z0-9]{1,10}", fullmatch=True),
                "name": st.text(min_size=1, max_size=10),
            },
            optional={k: v for k, v in fields.items() if k not in ("slug", "name")},
        ),
        st.fixed_dictionaries({}, optional=fields),
        JSON,
    )

    @SETTINGS
    @given(body=bodies)
    def run(body: Any) -> None:
        before = rows_digest()
        r = c.generic("POST", "/api/projects/", _dumps(body), "application/json")
        tally.record(r, before, rows_digest())

    run()
    tally.report()
    assert tally.counts["refused"] > 0 and tally.counts["accepted"] > 0, tally.counts


def _manifest_zip(rows: list[Any], fmt: str, files: dict[str, bytes]) -> bytes:
    if fmt == "jsonl":
        text = "".join((json.dumps(r, allow_nan=True) if not isinstance(r, str) else r) + "\n" for r in rows)
    else:
        out = io.StringIO()
        cols = ["prompt", "path", "text", "generator", "generator_version", "metadata"]
        w = csv.writer(out)
        w.writerow(cols)
        for r in rows:
            if isinstance(r, dict):
                w.writerow(
                    [
                        r.get(k) if not isinstance(r.get(k), dict | list) else json.dumps(r.get(k))
                        for k in cols
                    ]
                )
        text = out.getvalue()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(f"manifest.{fmt}", text.encode("utf-8", "surrogatepass"))
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


def test_import_manifests_never_5xx_and_refusals_change_nothing(manager: Any, make_project: Any) -> None:
    make_project("fzi")
    c: Any = client_for(manager)
    tally = Tally("import manifests")
    files = {"a.png": png_bytes((1, 2, 3)), "b.png": png_bytes((9, 8, 7)), "junk.bin": b"\x00\x01not media"}
    row_fields = {
        "prompt": st.one_of(st.text(min_size=1, max_size=12), TEXT, JSON),
        "path": st.one_of(
            st.sampled_from(["a.png", "b.png", "junk.bin", "missing.png", "../x", "/etc/passwd"]), JSON
        ),
        "text": st.one_of(TEXT, JSON),
        "generator": st.one_of(TEXT, JSON),
        "generator_version": st.one_of(TEXT, JSON),
        "metadata": st.one_of(st.dictionaries(TEXT, JSON, max_size=3), TEXT, JSON),
    }
    good_row = st.fixed_dictionaries(
        {"prompt": st.text(min_size=1, max_size=10).filter(str.strip), "text": st.text(max_size=10)},
        optional={
            "generator": st.text(max_size=10),
            "metadata": st.dictionaries(st.text(max_size=5), st.integers(0, 9)),
        },
    )
    rows = st.lists(
        st.one_of(
            good_row, good_row, st.fixed_dictionaries({}, optional=row_fields), JSON, st.just("{not json")
        ),
        min_size=1,
        max_size=6,
    )

    @SETTINGS
    @given(rows=rows, fmt=st.sampled_from(["jsonl", "csv"]))
    def run(rows: list[Any], fmt: str) -> None:
        data = _manifest_zip(rows, fmt, files)
        before = rows_digest()
        r = c.post(
            "/api/projects/fzi/imports/samples/",
            {"file": SimpleUploadedFile("m.zip", data)},
            format="multipart",
        )
        tally.record(r, before, rows_digest())

    run()
    tally.report()
    assert tally.counts["refused"] > 0 and tally.counts["accepted"] > 0, tally.counts
