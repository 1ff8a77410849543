"""Request-body parsers: DRF's, plus the storability check of ``annotate.validation``.

Every API body passes through one of these (``DEFAULT_PARSER_CLASSES``; views that pick their
parsers pick from here), so no view sees a NUL character, a lone surrogate, an integer past 64
bits, a non-finite number or a 64-deep nesting: those are a 400 before any view code runs.
"""

from __future__ import annotations

from typing import Any

from rest_framework import parsers
from rest_framework.exceptions import ParseError

from annotate.validation import json_problem, text_problem


def _refuse(where: str, reason: str) -> ParseError:
    return ParseError(f"{where}: {reason}")


class JSONParser(parsers.JSONParser):
    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        try:
            data = super().parse(stream, media_type, parser_context)
        except RecursionError as exc:
            raise ParseError("JSON parse error - nested too deeply") from exc
        found = json_problem(data)
        if found is not None:
            raise _refuse(*found)
        return data


def _check_form(data: Any, files: Any = None) -> None:
    for key, values in data.lists():
        problem = text_problem(key)
        if problem:
            raise _refuse("form field name", problem)
        for v in values:
            if isinstance(v, str):
                problem = text_problem(v)
                if problem:
                    raise _refuse(key, problem)
    for key, upload in files.items() if files is not None else ():
        problem = text_problem(key) or text_problem(upload.name or "")
        if problem:
            raise _refuse(f"{key} file name", problem)


class FormParser(parsers.FormParser):
    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        data = super().parse(stream, media_type, parser_context)
        _check_form(data)
        return data


class MultiPartParser(parsers.MultiPartParser):
    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        result = super().parse(stream, media_type, parser_context)
        _check_form(result.data, result.files)
        return result
