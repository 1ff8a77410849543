"""Real public preference data imports as it is: Anthropic HH-RLHF (harmless-base test, 2,312 TRL
rows, implicit prompt) with its empty completions and its refusals repeated under many prompts;
broken rows refuse the whole file by default, or are skipped and reported with on_error=skip."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import call_command
from django.core.management.base import CommandError

from annotate import exports, imports
from annotate.errors import Invalid
from annotate.models import Comparison, ComparisonSample, Judgment, Project, Prompt, Sample
from tests.factories import client_for

DATA = Path(__file__).resolve().parent.parent / "data"
HH = DATA / "hh_rlhf" / "harmless-base-test.jsonl.gz"
BROKEN = DATA / "imports" / "broken.jsonl"


def _expected(path: Path) -> tuple[int, int, set[tuple[str, str]], int]:
    """Counted from the file with the plain rule, not by the importer: rows, empty completions,
    distinct (prompt, text) samples, and texts that appear under more than one prompt."""
    rows, empty = 0, 0
    samples: set[tuple[str, str]] = set()
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        lines = fh.readlines()
    for line in lines:
        row = json.loads(line)
        chosen, rejected = row["chosen"], row["rejected"]
        k = 0
        while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
            k += 1
        while k > 0 and not chosen[k - 1].isspace():
            k -= 1
        prompt = chosen[:k]
        rows += 1
        for text in (chosen[k:], rejected[k:]):
            empty += text == ""
            samples.add((prompt, text))
    prompts_of: dict[str, set[str]] = {}
    for prompt, text in samples:
        prompts_of.setdefault(text, set()).add(prompt)
    shared = sum(1 for ps in prompts_of.values() if len(ps) > 1)
    return rows, empty, samples, shared


def _counts() -> dict[str, int]:
    return {
        m.__name__: m.objects.count()
        for m in (Project, Prompt, Sample, Comparison, ComparisonSample, Judgment)
    }


def test_hh_rlhf_imports_whole(manager: Any) -> None:
    rows, empty, samples, shared = _expected(HH)
    assert rows == 2312 and empty > 0 and shared > 0  # the cases the old importer refused
    project = imports.project_for_import(slug="hh", actor=manager, fmt="trl")
    with gzip.open(HH, "rb") as fh:
        result = imports.preferences_import(
            project=project, actor=manager, fmt="trl", file=io.BytesIO(fh.read())
        )
    assert (result.rows, result.comparisons, result.judgments, result.skipped) == (rows, rows, rows, 0)
    assert Sample.objects.filter(project=project).count() == len(samples) == result.created
    assert Sample.objects.filter(project=project, text="").count() == len({p for p, t in samples if t == ""})
    # The same text under two prompts is two samples.
    texts = Sample.objects.filter(project=project).values_list("text", "prompt_id")
    by_text: dict[str, set[int]] = {}
    for text, prompt_id in texts:
        by_text.setdefault(text, set()).add(prompt_id)
    assert sum(1 for ps in by_text.values() if len(ps) > 1) == shared
    assert Judgment.objects.filter(project=project, source="import").count() == rows


def test_broken_rows_refuse_the_whole_file_by_default(manager: Any) -> None:
    imports.project_for_import(slug="broken", actor=manager, fmt="trl")
    before = _counts()
    r = client_for(manager).post(
        "/api/projects/broken/imports/preferences/?format=trl",
        {"file": SimpleUploadedFile("b.jsonl", BROKEN.read_bytes())},
        format="multipart",
    )
    assert r.status_code == 400
    assert r.json()["error"]["message"].startswith("row 5: not valid JSON")
    assert _counts() == before


def test_on_error_skip_imports_the_rest_and_reports_each_broken_row(manager: Any) -> None:
    project = imports.project_for_import(slug="broken", actor=manager, fmt="trl")
    r = client_for(manager).post(
        "/api/projects/broken/imports/preferences/?format=trl&on_error=skip",
        {"file": SimpleUploadedFile("b.jsonl", BROKEN.read_bytes())},
        format="multipart",
    )
    assert r.status_code == 201, r.json()
    body = r.json()
    assert (body["rows"], body["judgments"], body["skipped"]) == (9, 4, 5)
    assert [s["row"] for s in body["skipped_rows"]] == [5, 6, 7, 8, 9]
    reasons = {s["row"]: s["reason"] for s in body["skipped_rows"]}
    assert reasons[5].startswith("row 5: not valid JSON")
    assert reasons[6] == "row 6: missing column(s) rejected"
    assert reasons[7] == reasons[8].replace("row 8", "row 7") == "row 7: both sides are the same content"
    assert reasons[9].startswith("row 9: empty prompt")
    # Good rows: 4 comparisons, 8 samples (the refusal under two prompts is two samples), one empty.
    assert Sample.objects.filter(project=project).count() == 8
    assert Sample.objects.filter(project=project, text="").count() == 1
    refusals = Sample.objects.filter(project=project, text="I can't help with that.")
    assert refusals.count() == 2 and len({s.prompt_id for s in refusals}) == 2
    # Importing the same file again reuses every sample.
    again = imports.preferences_import(
        project=project, actor=manager, fmt="trl", file=io.BytesIO(BROKEN.read_bytes()), on_error="skip"
    )
    assert (again.created, again.duplicates, again.skipped) == (0, 8, 5)


def test_on_error_is_validated_and_the_cli_skips_too(manager: Any, tmp_path: Path) -> None:
    manager.is_superuser = True
    manager.save()
    imports.project_for_import(slug="broken", actor=manager, fmt="trl")
    before = _counts()
    r = client_for(manager).post(
        "/api/projects/broken/imports/preferences/?format=trl&on_error=ignore",
        {"file": SimpleUploadedFile("b.jsonl", BROKEN.read_bytes())},
        format="multipart",
    )
    assert r.status_code == 400 and "on_error must be one of fail, skip" in r.json()["error"]["message"]
    assert _counts() == before
    with pytest.raises(CommandError, match="row 5: not valid JSON"):
        call_command("import_preferences", str(BROKEN), "--format", "trl", "--project", "broken")
    assert _counts() == before
    out = io.StringIO()
    call_command(
        "import_preferences",
        str(BROKEN),
        "--format",
        "trl",
        "--project",
        "broken",
        "--on-error",
        "skip",
        stdout=out,
    )
    text = out.getvalue()
    assert "4 judgments" in text and "5 broken rows skipped" in text
    assert "skipped row 6: row 6: missing column(s) rejected" in text


def test_every_row_broken_is_refused(manager: Any) -> None:
    project = imports.project_for_import(slug="allbad", actor=manager, fmt="trl")
    with pytest.raises(Invalid, match="every row is broken"):
        imports.preferences_import(
            project=project, actor=manager, fmt="trl", file=io.BytesIO(b"{nope\n[1]\n"), on_error="skip"
        )
    assert Judgment.objects.filter(project=project).count() == 0


def test_hh_rlhf_round_trip(manager: Any) -> None:
    source = imports.project_for_import(slug="hh-a", actor=manager, fmt="trl")
    with gzip.open(HH, "rb") as fh:
        head = b"".join(fh.readlines()[:400])
    imports.preferences_import(project=source, actor=manager, fmt="trl", file=io.BytesIO(head))
    spec = exports.ExportSpec(schema="trl", aggregate="none")
    first = b"".join(exports.stream(project=source, spec=spec))
    assert first.count(b"\n") == 400
    target = imports.project_for_import(slug="hh-b", actor=manager, fmt="trl")
    imports.preferences_import(project=target, actor=manager, fmt="trl", file=io.BytesIO(first))
    assert b"".join(exports.stream(project=target, spec=spec)) == first
