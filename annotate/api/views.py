"""REST API: one view per operation, each with its own small serializers. Thin: parse, call a
service or selector, render. Permissions are checked by the services/selectors."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from typing import Any

from django.conf import settings
from django.contrib.auth import authenticate, get_user_model
from django.http import HttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_serializer,
    inline_serializer,
)
from rest_framework import serializers, status
from rest_framework.authentication import TokenAuthentication
from rest_framework.authtoken.models import Token
from rest_framework.exceptions import APIException
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.permissions import AllowAny
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from annotate import ratelimit, selectors, services
from annotate.api.parsers import FormParser, JSONParser, MultiPartParser
from annotate.errors import Invalid, NotFound, TooLarge
from annotate.models import Judgment, Modality, Project, ProjectMember
from annotate.validation import as_id


def _int_param(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise Invalid(f"query parameter {name!r} must be an integer") from exc
    if not lo <= value <= hi:
        raise Invalid(f"query parameter {name!r} must be between {lo} and {hi}")
    return value


def _upload_length_check(request: Request) -> None:
    """Refuse a body over ``RL_MAX_UPLOAD_BYTES`` from its ``Content-Length``, before reading it."""
    raw = request.META.get("CONTENT_LENGTH") or "0"
    try:
        length = int(raw)
    except ValueError as exc:
        raise Invalid(f"Content-Length must be an integer, got {raw[:40]!r}") from exc
    if length > settings.RL_MAX_UPLOAD_BYTES:
        raise TooLarge(f"request is {length} bytes; the upload limit is {settings.RL_MAX_UPLOAD_BYTES} bytes")


# --- OpenAPI: the shapes of the bodies the views build by hand (documentation only) --------------
# Views render dicts (or PostgreSQL's JSON); these serializers describe them for /api/schema/ and
# the clients generated from it. tests/test_openapi.py checks live responses against them.
@extend_schema_serializer(component_name="ErrorBody")
class ErrorBodySerializer(serializers.Serializer):
    code = serializers.CharField(help_text="machine-readable: invalid, not_found, already_judged, ...")
    message = serializers.CharField(help_text="for humans")
    details = serializers.DictField(help_text="more about the refusal, e.g. {'fields': {...}}, {'index': 3}")


@extend_schema_serializer(component_name="Error")
class ErrorSerializer(serializers.Serializer):
    error = ErrorBodySerializer()


_ERROR_MEANING = {
    400: "Invalid input (`invalid`, `option_disabled`, `bad_credentials`, ...); nothing was stored.",
    401: "No or unknown credentials (send `Authorization: Token <key>`).",
    403: "Authenticated, but the role does not allow this (or a session request without CSRF token).",
    404: "No such project (or not a member of it), or no such object in it.",
    409: "Conflicts with the current state (`slug_taken`, `already_judged`, `lease_released`, ...).",
    413: "The request body is larger than the server accepts.",
    415: "Unsupported request content type.",
    429: "Too many requests; retry later.",
    503: "Temporarily unavailable (e.g. the database is busy); retry later.",
}
# Every authenticated operation can answer these: a bad parameter or body (400), authentication,
# role or membership, project (401, 403, 404), the database unreachable (503).
AUTHED_ERRORS = (400, 401, 403, 404, 503)
# ... and every one with a request body these.
BODY_ERRORS = (413, 415)
INT64_MAX = 2**63 - 1


class FiniteFloatField(serializers.FloatField):
    """A float that is a number: DRF's FloatField takes "nan" and "inf" (as strings, too)."""

    def to_internal_value(self, data: Any) -> float:
        value = super().to_internal_value(data)
        if not math.isfinite(value):
            self.fail("invalid")
        return value


def errors(*codes: int) -> dict[int, OpenApiResponse]:
    """The shared error body under each status code, for ``extend_schema(responses=...)``."""
    return {code: OpenApiResponse(ErrorSerializer, description=_ERROR_MEANING[code]) for code in codes}


def _binary(description: str, *media_types: str) -> dict[tuple[int, str], OpenApiResponse]:
    return {(200, t): OpenApiResponse(OpenApiTypes.BINARY, description=description) for t in media_types}


@extend_schema_serializer(component_name="Aspect")
class AspectSerializer(serializers.Serializer):
    key = serializers.CharField()
    label = serializers.CharField()  # type: ignore[assignment]  # a field named like Field.label


@extend_schema_serializer(component_name="LabelingOptions")
class OptionsSerializer(serializers.Serializer):
    tie = serializers.BooleanField()
    both_bad = serializers.BooleanField()


@extend_schema_serializer(component_name="Project")
class ProjectOut(serializers.Serializer):
    """``project_detail``."""

    slug = serializers.SlugField()
    name = serializers.CharField()
    modality = serializers.ChoiceField(choices=Modality.values, allow_blank=True, help_text="'' = mixed")
    instructions = serializers.CharField(allow_blank=True)
    options = OptionsSerializer()
    aspects = AspectSerializer(many=True)
    mode = serializers.ChoiceField(choices=Project.Mode.values)
    k = serializers.IntegerField()
    overlap = serializers.IntegerField()
    gold_rate = serializers.FloatField()
    lease_seconds = serializers.IntegerField()
    undo_seconds = serializers.IntegerField()


@extend_schema_serializer(component_name="ProjectWithRole")
class ProjectWithRoleOut(ProjectOut):
    role = serializers.ChoiceField(choices=ProjectMember.Role.values, help_text="the caller's role")


@extend_schema_serializer(component_name="SampleShown")
class SampleShownOut(serializers.Serializer):
    """A sample as ``selectors.sample_payload`` and ``rl_payload`` show it."""

    id = serializers.IntegerField()
    modality = serializers.ChoiceField(choices=Modality.values)
    url = serializers.CharField(allow_null=True, help_text="the media file; null for text samples")
    text = serializers.CharField(allow_null=True, allow_blank=True, help_text="raw markdown; null for media")
    mime_type = serializers.CharField(allow_blank=True)
    width = serializers.IntegerField(allow_null=True)
    height = serializers.IntegerField(allow_null=True)
    duration = serializers.FloatField(allow_null=True, help_text="seconds (video)")
    fps = serializers.FloatField(allow_null=True)


@extend_schema_serializer(component_name="LeasePrompt")
class LeasePromptOut(serializers.Serializer):
    id = serializers.IntegerField()
    text = serializers.CharField(allow_blank=True)


@extend_schema_serializer(component_name="Lease")
class LeaseOut(serializers.Serializer):
    assignment = serializers.IntegerField(help_text="the lease id to submit or skip")
    comparison = serializers.IntegerField()
    expires_at = serializers.DateTimeField()
    prompt = LeasePromptOut()
    samples = SampleShownOut(many=True, help_text="in the order to show, left to right")


@extend_schema_serializer(component_name="Leases")
class LeasesOut(serializers.Serializer):
    """``rl_payload`` (migration 0005): what the labeling page needs to show leases."""

    items = LeaseOut(many=True)
    options = OptionsSerializer()
    aspects = AspectSerializer(many=True)
    mode = serializers.ChoiceField(choices=Project.Mode.values)


@extend_schema_serializer(component_name="JudgmentStored")
class JudgmentOut(serializers.Serializer):
    """``rl_judgment_json`` (migration 0005)."""

    id = serializers.IntegerField()
    comparison = serializers.IntegerField()
    outcome = serializers.ChoiceField(choices=Judgment.Outcome.values, help_text="in canonical order")
    winner = serializers.IntegerField(allow_null=True, help_text="the winning sample; null for tie/both bad")
    created_at = serializers.DateTimeField()


@extend_schema_serializer(component_name="JudgmentSubmitted")
class JudgmentSubmittedOut(serializers.Serializer):
    judgment = JudgmentOut()
    next = LeasesOut(required=False, help_text="with ?next=n > 0: my next leases")


@extend_schema_serializer(component_name="DatasetSnapshot")
class SnapshotOut(serializers.Serializer):
    """``_snapshot_out``."""

    id = serializers.IntegerField()
    name = serializers.CharField(allow_blank=True)
    status = serializers.ChoiceField(choices=["queued", "running", "done", "failed"])
    spec = serializers.DictField(help_text="the export parameters it was built with")
    rows_expected = serializers.IntegerField(allow_null=True)
    rows_written = serializers.IntegerField()
    row_count = serializers.IntegerField(allow_null=True)
    sha256 = serializers.CharField(allow_blank=True)
    byte_size = serializers.IntegerField(allow_null=True)
    error = serializers.CharField(allow_blank=True)
    created_at = serializers.DateTimeField()
    finished_at = serializers.DateTimeField(allow_null=True)
    download = serializers.CharField(allow_null=True, help_text="the file's URL once status is done")


class TokenView(APIView):
    authentication_classes: list[Any] = []
    permission_classes = [AllowAny]

    @extend_schema_serializer(component_name="TokenCredentials")
    class InputSerializer(serializers.Serializer):
        username = serializers.CharField()
        password = serializers.CharField(style={"input_type": "password"})

    @extend_schema_serializer(component_name="Token")
    class OutputSerializer(serializers.Serializer):
        token = serializers.CharField()

    @extend_schema(
        request=InputSerializer,
        responses={200: OutputSerializer, **errors(400, 413, 415, 429, 503)},
        operation_id="auth_token",
        auth=[],
    )
    def post(self, request: Request) -> Response:
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        username, ip = data.validated_data["username"], ratelimit.client_ip(request)
        ratelimit.login_check(username=username, ip=ip)  # 429 while over the failed-login limits
        user = authenticate(request, username=username, password=data.validated_data["password"])
        if user is None:
            ratelimit.login_failed(username=username, ip=ip)
            return Response(
                {
                    "error": {
                        "code": "bad_credentials",
                        "message": "wrong username or password",
                        "details": {},
                    }
                },
                status=status.HTTP_400_BAD_REQUEST,
            )
        ratelimit.login_succeeded(username=username)
        token, _ = Token.objects.get_or_create(user=user)
        return Response({"token": token.key})


class ProjectListCreateView(APIView):
    @extend_schema_serializer(component_name="ProjectCreate")
    class InputSerializer(serializers.Serializer):
        slug = serializers.SlugField(max_length=80)
        name = serializers.CharField(max_length=200)
        modality = serializers.ChoiceField(
            choices=Modality.values, allow_blank=True, required=False, default="", help_text="'' = mixed"
        )
        instructions = serializers.CharField(required=False, allow_blank=True, default="")
        allow_tie = serializers.BooleanField(required=False, default=True)
        allow_both_bad = serializers.BooleanField(required=False, default=True)
        aspects = serializers.ListField(child=serializers.DictField(), required=False, default=list)
        mode = serializers.ChoiceField(choices=Project.Mode.values, required=False, default="pairwise")
        k = serializers.IntegerField(required=False, default=2, min_value=2, max_value=16)
        overlap = serializers.IntegerField(required=False, default=1, min_value=1, max_value=100)
        gold_rate = FiniteFloatField(required=False, default=0.0, min_value=0.0, max_value=1.0)
        lease_seconds = serializers.IntegerField(required=False, default=900, min_value=10, max_value=604_800)
        undo_seconds = serializers.IntegerField(required=False, default=30, min_value=0, max_value=3600)

    @extend_schema_serializer(component_name="ProjectListItem")
    class ListItemSerializer(serializers.Serializer):
        slug = serializers.SlugField()
        name = serializers.CharField()
        role = serializers.ChoiceField(choices=ProjectMember.Role.values)
        modality = serializers.ChoiceField(choices=Modality.values, allow_blank=True)
        mode = serializers.ChoiceField(choices=Project.Mode.values)

    @extend_schema(
        operation_id="projects_list",
        responses={
            200: inline_serializer("ProjectList", {"projects": ListItemSerializer(many=True)}),
            **errors(400, 401, 403, 503),
        },
    )
    def get(self, request: Request) -> Response:
        return Response({"projects": selectors.projects_of_user(user=request.user)})

    @extend_schema(
        request=InputSerializer,
        responses={201: ProjectOut, **errors(400, 401, 403, 409, 413, 415, 503)},
        operation_id="projects_create",
    )
    def post(self, request: Request) -> Response:
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        project = services.project_create(creator=request.user, **data.validated_data)
        return Response(project_detail(project), status=status.HTTP_201_CREATED)


def project_detail(project: Project) -> dict[str, Any]:
    return {
        "slug": project.slug,
        "name": project.name,
        "modality": project.modality,
        "instructions": project.instructions,
        "options": {"tie": project.allow_tie, "both_bad": project.allow_both_bad},
        "aspects": project.aspects,
        "mode": project.mode,
        "k": project.k,
        "overlap": project.overlap,
        "gold_rate": project.gold_rate,
        "lease_seconds": project.lease_seconds,
        "undo_seconds": project.undo_seconds,
    }


class ProjectDetailView(APIView):
    @extend_schema(
        operation_id="project_detail", responses={200: ProjectWithRoleOut, **errors(*AUTHED_ERRORS)}
    )
    def get(self, request: Request, slug: str) -> Response:
        project, member = selectors.project_for_member(slug=slug, user=request.user)
        return Response({**project_detail(project), "role": member.role})


class MemberSetView(APIView):
    @extend_schema_serializer(component_name="MemberSet")
    class InputSerializer(serializers.Serializer):
        username = serializers.CharField()
        role = serializers.ChoiceField(choices=ProjectMember.Role.values, default="annotator")
        paused = serializers.BooleanField(required=False, default=False)

    @extend_schema_serializer(component_name="Member")
    class OutputSerializer(serializers.Serializer):
        username = serializers.CharField()
        role = serializers.ChoiceField(choices=ProjectMember.Role.values)
        paused = serializers.BooleanField()

    @extend_schema(
        request=InputSerializer,
        responses={200: OutputSerializer, **errors(*AUTHED_ERRORS, 413, 415)},
        operation_id="project_member_set",
    )
    def post(self, request: Request, slug: str) -> Response:
        project, _ = selectors.project_for_member(slug=slug, user=request.user)
        # Managers only, checked before the body is read: nobody else learns which usernames exist.
        selectors.member_role_require(project=project, user=request.user, roles=(ProjectMember.Role.MANAGER,))
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        user = get_user_model().objects.filter(username=data.validated_data["username"]).first()
        if user is None:
            raise NotFound(f"no user {data.validated_data['username']!r}")
        m = services.project_member_set(
            project=project,
            actor=request.user,
            user=user,
            role=data.validated_data["role"],
            paused=data.validated_data["paused"],
        )
        return Response({"username": user.get_username(), "role": m.role, "paused": m.paused})


def _sample_out(result: services.SampleResult) -> dict[str, Any]:
    s = result.sample
    return {
        **selectors.sample_payload(s),
        "prompt": s.prompt_id,
        "content_hash": s.content_hash,
        "created": result.created,
    }


class SampleUploadView(APIView):
    parser_classes = [MultiPartParser, FormParser, JSONParser]

    @extend_schema_serializer(component_name="TextSample")
    class TextSampleSerializer(serializers.Serializer):
        prompt = serializers.CharField(trim_whitespace=False)
        text = serializers.CharField(trim_whitespace=False)
        generator = serializers.CharField(required=False, allow_blank=True, default="", max_length=200)
        generator_version = serializers.CharField(
            required=False, allow_blank=True, default="", max_length=200
        )
        metadata = serializers.DictField(required=False, default=dict)

    class TextInputSerializer(serializers.Serializer):
        samples = serializers.ListField(min_length=1, max_length=10_000)

    @extend_schema_serializer(component_name="MediaSampleUpload")
    class MediaInputSerializer(serializers.Serializer):
        """Documents the multipart form ``_media`` reads."""

        file = serializers.FileField(help_text="an image or video; its type is sniffed from the bytes")
        prompt = serializers.CharField()
        generator = serializers.CharField(required=False, allow_blank=True, max_length=200)
        generator_version = serializers.CharField(required=False, allow_blank=True, max_length=200)
        metadata = serializers.CharField(required=False, help_text="a JSON object, as a string")

    @extend_schema_serializer(component_name="SampleStored")
    class OutputItemSerializer(SampleShownOut):
        prompt = serializers.IntegerField()
        content_hash = serializers.CharField()
        created = serializers.BooleanField(help_text="false: the same bytes were already stored")

    stored = inline_serializer("SamplesStored", {"samples": OutputItemSerializer(many=True)})

    @extend_schema(
        operation_id="samples_upload",
        description="One image/video as multipart, or up to 10,000 text samples as JSON. "
        "201 when anything was created, 200 when every sample already existed.",
        request={
            "multipart/form-data": MediaInputSerializer,
            "application/json": inline_serializer(
                "TextSamplesUpload",
                {
                    "samples": serializers.ListField(
                        child=TextSampleSerializer(), min_length=1, max_length=10_000
                    )
                },
            ),
        },
        responses={
            201: stored,
            200: stored,
            **errors(*AUTHED_ERRORS, *BODY_ERRORS),
        },
    )
    def post(self, request: Request, slug: str) -> Response:
        project, _ = selectors.project_for_member(slug=slug, user=request.user)
        _upload_length_check(request)
        if "file" in request.FILES:
            return self._media(request, project)
        if request.content_type.startswith("multipart/"):
            raise Invalid("multipart upload without a 'file' field")
        data = self.TextInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        items = []
        for i, raw in enumerate(data.validated_data["samples"]):
            item = self.TextSampleSerializer(data=raw)
            if not item.is_valid():
                raise Invalid(
                    f"sample {i}: " + "; ".join(f"{k}: {v[0]}" for k, v in item.errors.items()),
                    details={"index": i},
                )
            items.append(item.validated_data)
        results = services.sample_create_texts(project=project, actor=request.user, items=items)
        code = status.HTTP_201_CREATED if any(r.created for r in results) else status.HTTP_200_OK
        return Response({"samples": [_sample_out(r) for r in results]}, status=code)

    def _media(self, request: Request, project: Project) -> Response:
        upload = request.FILES["file"]
        form: Any = request.data  # a QueryDict for multipart bodies
        prompt = form.get("prompt", "")
        if not isinstance(prompt, str) or not prompt.strip():
            raise Invalid("'prompt' is required")
        metadata: dict[str, Any] = {}
        raw_meta = form.get("metadata")
        if raw_meta:
            try:
                metadata = json.loads(raw_meta)
            except (ValueError, RecursionError) as exc:
                raise Invalid("'metadata' must be a JSON object") from exc
            if not isinstance(metadata, dict):
                raise Invalid("'metadata' must be a JSON object")
        result = services.sample_create_media(
            project=project,
            actor=request.user,
            file=upload,
            filename=upload.name or "upload",
            prompt=prompt,
            generator=str(form.get("generator", "")),
            generator_version=str(form.get("generator_version", "")),
            metadata=metadata,
        )
        code = status.HTTP_201_CREATED if result.created else status.HTTP_200_OK
        return Response({"samples": [_sample_out(result)]}, status=code)


class ComparisonCreateView(APIView):
    @extend_schema_serializer(component_name="ComparisonSpec")
    class SpecSerializer(serializers.Serializer):
        samples = serializers.ListField(
            child=serializers.IntegerField(min_value=1, max_value=INT64_MAX), min_length=2, max_length=16
        )
        priority = FiniteFloatField(required=False, default=0.0)
        overlap = serializers.IntegerField(required=False, min_value=1, max_value=100)
        gold_answer = serializers.JSONField(required=False)

    class InputSerializer(serializers.Serializer):
        comparisons = serializers.ListField(required=False, max_length=100_000)
        random_pairs_per_prompt = serializers.IntegerField(required=False, min_value=1, max_value=1000)
        seed = serializers.IntegerField(required=False)

    @extend_schema(
        request=inline_serializer(
            "ComparisonsCreate",
            {
                "comparisons": serializers.ListField(
                    child=SpecSerializer(), required=False, max_length=100_000
                ),
                "random_pairs_per_prompt": serializers.IntegerField(
                    required=False, min_value=1, max_value=1000
                ),
                "seed": serializers.IntegerField(required=False),
            },
        ),
        description="Send either `comparisons` or `random_pairs_per_prompt` (with an optional `seed`).",
        responses={
            201: inline_serializer(
                "ComparisonsCreated",
                {
                    "created": serializers.IntegerField(),
                    "ids": serializers.ListField(child=serializers.IntegerField()),
                },
            ),
            **errors(*AUTHED_ERRORS, 409, *BODY_ERRORS),
        },
        operation_id="comparisons_create",
    )
    def post(self, request: Request, slug: str) -> Response:
        project, _ = selectors.project_for_member(slug=slug, user=request.user)
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        if ("comparisons" in v) == ("random_pairs_per_prompt" in v):
            raise Invalid("send either 'comparisons' or 'random_pairs_per_prompt'")
        if "comparisons" in v:
            specs = []
            for i, raw in enumerate(v["comparisons"]):
                spec = self.SpecSerializer(data=raw)
                if not spec.is_valid():
                    raise Invalid(
                        f"comparison {i}: " + "; ".join(f"{k}: {e[0]}" for k, e in spec.errors.items()),
                        details={"index": i},
                    )
                specs.append(spec.validated_data)
            created = services.comparisons_create(project=project, actor=request.user, specs=specs)
        else:
            created = services.comparisons_create_random_pairs(
                project=project,
                actor=request.user,
                pairs_per_prompt=v["random_pairs_per_prompt"],
                seed=v.get("seed"),
            )
        return Response(
            {"created": len(created), "ids": [c.id for c in created]}, status=status.HTTP_201_CREATED
        )


class _JSONOnly(DefaultContentNegotiation):
    """The labeling endpoints answer JSON whatever the Accept header says: PostgreSQL builds their
    body. Parsing Accept against the renderers was about 5% of their CPU in Django, for nothing."""

    def select_renderer(
        self, request: Request, renderers: Iterable[BaseRenderer], format_suffix: str | None = None
    ) -> tuple[BaseRenderer, str]:
        renderer = next(iter(renderers))
        return renderer, renderer.media_type


class NextView(APIView):
    renderer_classes = [JSONRenderer]
    content_negotiation_class = _JSONOnly

    @extend_schema(
        parameters=[
            OpenApiParameter(
                "n", {"type": "integer", "minimum": 1, "maximum": 20}, description="leases wanted (1-20)"
            )
        ],
        responses={200: LeasesOut, **errors(*AUTHED_ERRORS)},
        operation_id="next_comparisons",
    )
    def get(self, request: Request, slug: str) -> HttpResponse:
        try:
            n = _int_param(request, "n", 1, 1, 20)
        except Invalid:
            selectors.project_for_member(slug=slug, user=request.user)  # a stranger's 404 first
            raise
        # The labeling hot path: PostgreSQL builds the JSON (one statement); passed on as is.
        body = services.labeling_next(slug=slug, annotator=request.user, n=n)
        return HttpResponse(body, content_type="application/json")


_SUBMIT_SOURCES = (Judgment.Source.UI, Judgment.Source.API, Judgment.Source.SIMULATED)


def _submit_input(data: Any) -> dict[str, Any]:
    """Validate a judgment body like ``JudgmentSubmitView.InputSerializer`` does (same fields,
    defaults, limits and error shape: a 400 naming each bad field)."""
    if not isinstance(data, dict):
        raise serializers.ValidationError({"non_field_errors": ["expected a JSON object"]})
    errors: dict[str, list[str]] = {}
    out: dict[str, Any] = {}

    def integer(name: str, lo: int | None = None, hi: int | None = None, default: int | None = None) -> None:
        raw = data.get(name, default)
        if raw is None:
            errors[name] = ["This field is required."]
            return
        if isinstance(raw, bool) or not isinstance(raw, int | str):
            errors[name] = ["A valid integer is required."]
            return
        try:
            value = int(raw)
        except ValueError:
            errors[name] = ["A valid integer is required."]
            return
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            errors[name] = [f"Ensure this value is between {lo} and {hi}."]
            return
        out[name] = value

    def text(name: str, max_length: int) -> None:
        raw = data.get(name, "")
        if raw is None or isinstance(raw, bool | dict | list):
            errors[name] = ["Not a valid string."]
            return
        value = str(raw).strip()
        if len(value) > max_length:
            errors[name] = [f"Ensure this field has no more than {max_length} characters."]
            return
        out[name] = value

    def choice(name: str, choices: Sequence[str], default: str | None) -> None:
        raw = data.get(name, default)
        if raw is None:
            return
        if raw not in choices:
            errors[name] = [f'"{raw}" is not a valid choice.']
            return
        out[name] = str(raw)

    integer("assignment", 1, INT64_MAX)
    choice("choice", services.CHOICES, None)
    if "ranking" in data:
        ranking = data["ranking"]
        if not isinstance(ranking, list) or len(ranking) > 16:
            errors["ranking"] = ["Expected a list of at most 16 items."]
        elif any(as_id(x) is None for x in ranking):
            errors["ranking"] = ["A valid integer is required."]
        else:
            out["ranking"] = [int(x) for x in ranking]  # ASCII digits within bigint, checked above
    aspects = data.get("aspects", {})
    if not isinstance(aspects, dict) or not all(
        isinstance(x, str | int | float) and not isinstance(x, bool) for x in aspects.values()
    ):
        errors["aspects"] = ["Expected a dictionary of strings."]
    else:
        out["aspects"] = {str(k): str(x) for k, x in aspects.items()}
    text("rationale", 10_000)
    artifacts = data.get("artifacts", [])
    if not isinstance(artifacts, list) or not all(isinstance(x, dict) for x in artifacts):
        errors["artifacts"] = ["Expected a list of objects."]
    else:
        out["artifacts"] = artifacts
    integer("time_spent_ms", 0, 86_400_000, default=0)
    text("idempotency_key", 64)
    choice("source", _SUBMIT_SOURCES, None)  # absent: how the request authenticated (_judgment_source)
    if errors:
        raise serializers.ValidationError(errors)
    return out


def _is_simulated(user: Any) -> bool:
    """Whether ``user`` is in the simulated annotators' group. Remembered on the user object, which
    the token cache (``CachedTokenAuthentication``) keeps for ``RL_TOKEN_CACHE_SECONDS``: a
    simulated annotator's submit stays one SQL statement, not two."""
    flag = getattr(user, "_rl_simulated", None)
    if flag is None:
        flag = user.groups.filter(name=Judgment.SIMULATED_GROUP).exists()
        user._rl_simulated = flag
    return bool(flag)


def _judgment_source(request: Request, claimed: str | None) -> str:
    """A judgment's source is how its request authenticated: ``ui`` for the session, ``api`` for a
    token. A body may repeat it, not change it; only a token user in the ``Judgment.SIMULATED_GROUP``
    Django group (a simulated annotator) may say ``simulated``."""
    own = (
        Judgment.Source.API
        if isinstance(request.successful_authenticator, TokenAuthentication)
        else Judgment.Source.UI
    )
    if claimed is None or claimed == own:
        return own
    if claimed == Judgment.Source.SIMULATED and own == Judgment.Source.API and _is_simulated(request.user):
        return claimed
    raise serializers.ValidationError(
        {
            "source": [
                f'"{claimed}" is not this request\'s source ("{own}"); only token users in the '
                f'"{Judgment.SIMULATED_GROUP}" group may send "simulated"'
            ]
        }
    )


class JudgmentSubmitView(APIView):
    renderer_classes = [JSONRenderer]
    content_negotiation_class = _JSONOnly

    @extend_schema_serializer(component_name="JudgmentSubmit")
    class InputSerializer(serializers.Serializer):
        assignment = serializers.IntegerField()
        choice = serializers.ChoiceField(choices=services.CHOICES, required=False)
        ranking = serializers.ListField(child=serializers.IntegerField(), required=False, max_length=16)
        aspects = serializers.DictField(child=serializers.CharField(), required=False, default=dict)
        rationale = serializers.CharField(required=False, allow_blank=True, default="", max_length=10_000)
        artifacts = serializers.ListField(child=serializers.DictField(), required=False, default=list)
        time_spent_ms = serializers.IntegerField(required=False, default=0, min_value=0, max_value=86_400_000)
        idempotency_key = serializers.CharField(required=False, allow_blank=True, default="", max_length=64)
        source = serializers.ChoiceField(  # type: ignore[assignment]  # a field named like Field.source
            choices=[Judgment.Source.UI, Judgment.Source.API, Judgment.Source.SIMULATED],
            required=False,
            help_text="default and only allowed value: ui with the session, api with a token "
            "(simulated: token users in the 'simulated' group)",
        )

    @extend_schema(
        request=InputSerializer,
        operation_id="judgment_submit",
        parameters=[
            OpenApiParameter(
                "next",
                {"type": "integer", "minimum": 0, "maximum": 20},
                description="also return my next n leases (0-20)",
            )
        ],
        description="201: stored; 200: the idempotency key was already used for this lease "
        "(the first judgment is returned, nothing is written).",
        responses={
            201: JudgmentSubmittedOut,
            200: JudgmentSubmittedOut,
            **errors(*AUTHED_ERRORS, 409, *BODY_ERRORS),
        },
    )
    def post(self, request: Request, slug: str) -> HttpResponse:
        # The labeling hot path: the same rules as InputSerializer (which documents the schema),
        # checked by hand (a 9-field DRF serializer cost ~0.8 ms per label); the judgment and the
        # next leases are one statement whose JSON PostgreSQL builds.
        try:
            v = _submit_input(request.data)
            done = services.labeling_submit(
                slug=slug,
                annotator=request.user,
                assignment_id=v["assignment"],
                choice=v.get("choice"),
                ranking=v.get("ranking"),
                aspects=v["aspects"],
                rationale=v["rationale"],
                artifacts=v["artifacts"],
                time_spent_ms=v["time_spent_ms"],
                idempotency_key=v["idempotency_key"],
                source=_judgment_source(request, v.get("source")),
                next_n=_int_param(request, "next", 0, 0, 20),
            )
        except (APIException, Invalid):
            # Whatever the body, a stranger gets the project's 404 (the SQL checks membership
            # before anything else; checks made here in Python come before it).
            selectors.project_for_member(slug=slug, user=request.user)
            raise
        return HttpResponse(
            done.body,
            content_type="application/json",
            status=status.HTTP_201_CREATED if done.created else status.HTTP_200_OK,
        )


class SkipView(APIView):
    @extend_schema_serializer(component_name="AssignmentSkip")
    class InputSerializer(serializers.Serializer):
        assignment = serializers.IntegerField(min_value=1, max_value=INT64_MAX)

    @extend_schema_serializer(component_name="AssignmentSkipped")
    class OutputSerializer(serializers.Serializer):
        assignment = serializers.IntegerField()
        status = serializers.ChoiceField(choices=["active", "done", "skipped", "expired"])

    @extend_schema(
        request=InputSerializer,
        responses={200: OutputSerializer, **errors(*AUTHED_ERRORS, 409, *BODY_ERRORS)},
        operation_id="assignment_skip",
    )
    def post(self, request: Request, slug: str) -> Response:
        project, _ = selectors.project_for_member(slug=slug, user=request.user)
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        a = services.assignment_skip(
            project=project, annotator=request.user, assignment_id=data.validated_data["assignment"]
        )
        return Response({"assignment": a.id, "status": a.status})


class UndoView(APIView):
    @extend_schema(
        request=None,
        responses={200: LeasesOut, **errors(*AUTHED_ERRORS, 409)},
        operation_id="judgment_undo",
        description="Delete my last judgment (within the project's undo_seconds) and lease it again.",
    )
    def post(self, request: Request, slug: str) -> Response:
        project, _ = selectors.project_for_member(slug=slug, user=request.user)
        selectors.member_role_require(project=project, user=request.user)
        a = services.judgment_undo(project=project, annotator=request.user)
        return Response(selectors.leases_payload(project=project, leases=[a]))


class ProgressView(APIView):
    @extend_schema(
        operation_id="progress",
        responses={
            200: inline_serializer(
                "Progress",
                {
                    "me": inline_serializer(
                        "ProgressMine",
                        {
                            "judged": serializers.IntegerField(),
                            "skipped": serializers.IntegerField(),
                            "active_leases": serializers.IntegerField(),
                            "available": serializers.IntegerField(),
                        },
                    ),
                    "project": inline_serializer(
                        "ProgressProject",
                        {
                            "comparisons": serializers.IntegerField(),
                            "complete": serializers.IntegerField(),
                            "judgments": serializers.IntegerField(),
                            "stuck": serializers.IntegerField(
                                help_text="open comparisons skipped by every active annotator who "
                                "could still be served them (a manager must act)"
                            ),
                        },
                    ),
                },
            ),
            **errors(*AUTHED_ERRORS),
        },
    )
    def get(self, request: Request, slug: str) -> Response:
        project, _ = selectors.project_for_member(slug=slug, user=request.user)
        return Response(selectors.annotator_progress(project=project, annotator=request.user))


@extend_schema_serializer(component_name="LeaderboardRow")
class LeaderboardRowOut(serializers.Serializer):
    version = serializers.IntegerField(help_text="the generator version's id")
    generator = serializers.CharField()
    name = serializers.CharField(help_text="the version's name")
    rating = serializers.FloatField(help_text="Bradley-Terry rating on the Elo scale (1000: the average)")
    ci_low = serializers.FloatField(help_text="95% bootstrap interval, lower end")
    ci_high = serializers.FloatField(help_text="95% bootstrap interval, upper end")
    games = serializers.IntegerField(help_text="judged pairs against another version")
    wins = serializers.IntegerField()
    ties = serializers.IntegerField()


class LeaderboardView(APIView):
    @extend_schema(
        operation_id="leaderboard",
        description="Generator versions ranked by Bradley-Terry maximum-likelihood ratings from this "
        "project's judgments (ties as half wins, both-bad left out, rankings as all their pairs), best "
        "first, with 95% bootstrap intervals; `aspect` ranks by that aspect's verdicts.",
        parameters=[OpenApiParameter("aspect", str, description="an aspect key of the project")],
        responses={
            200: inline_serializer(
                "Leaderboard",
                {"aspect": serializers.CharField(allow_null=True), "versions": LeaderboardRowOut(many=True)},
            ),
            **errors(*AUTHED_ERRORS),
        },
    )
    def get(self, request: Request, slug: str) -> Response:
        project, _ = selectors.project_for_member(slug=slug, user=request.user)
        aspect = request.query_params.get("aspect") or None
        if aspect is not None and aspect not in {a["key"] for a in project.aspects}:
            raise Invalid(f"unknown aspect {aspect[:100]!r}", details={"field": "aspect"})
        return Response({"aspect": aspect, "versions": selectors.leaderboard(project=project, aspect=aspect)})


# --- Datasets: export and snapshots --------------------------------------------------------------
class ExportView(APIView):
    """Stream a preference dataset. Rows leave as the database cursor yields them."""

    @extend_schema(
        operation_id="dataset_export",
        responses={
            **_binary(
                "the rows, streamed (JSON lines, CSV or Parquet by `format`)",
                "application/x-ndjson",
                "text/csv",
                "application/vnd.apache.parquet",
            ),
            **errors(*AUTHED_ERRORS),
        },
        parameters=[
            OpenApiParameter("schema", str, enum=["trl", "pickapic", "aspects", "ranking", "raw"]),
            OpenApiParameter("format", str, enum=["jsonl", "csv", "parquet"]),
            OpenApiParameter("aggregate", str, enum=["none", "majority", "soft"]),
            OpenApiParameter("media", str, enum=["url", "bytes"]),
            OpenApiParameter("since", OpenApiTypes.DATETIME, description="ISO 8601; judgments at or after"),
            OpenApiParameter("until", OpenApiTypes.DATETIME, description="ISO 8601; judgments before"),
            OpenApiParameter("min_agreement", {"type": "number", "minimum": 0, "maximum": 1}),
            OpenApiParameter("exclude_paused", bool),
            OpenApiParameter("gold", str, enum=["any", "only", "exclude"]),
            OpenApiParameter("aspect", str),
            OpenApiParameter(
                "generator_versions", str, description="comma-separated ids or generator@version"
            ),
            OpenApiParameter("modality", str, enum=["image", "video", "text"]),
        ],
    )
    def get(self, request: Request, slug: str) -> Any:
        from django.http import StreamingHttpResponse

        from annotate import exports

        project, _ = selectors.project_for_member(slug=slug, user=request.user)
        selectors.member_role_require(project=project, user=request.user, roles=(ProjectMember.Role.MANAGER,))
        spec = exports.spec_from_params(
            request.query_params, base_url=request.build_absolute_uri("/").rstrip("/")
        )
        exports.validate_for_project(project=project, spec=spec)
        response = StreamingHttpResponse(
            exports.stream(project=project, spec=spec), content_type=exports.CONTENT_TYPES[spec.format]
        )
        response["Content-Disposition"] = f'attachment; filename="{project.slug}-{spec.schema}.{spec.format}"'
        response["X-Accel-Buffering"] = "no"
        return response


def _rows_written(snap: Any) -> int:
    if snap.status == "running":
        from django.core.cache import cache

        return int(cache.get(services.snapshot_progress_key(snap.id)) or 0)
    return int(snap.rows_written)


def _snapshot_out(snap: Any) -> dict[str, Any]:
    return {
        "id": snap.id,
        "name": snap.name,
        "status": snap.status,
        "spec": snap.spec,
        "rows_expected": snap.rows_expected,
        "rows_written": _rows_written(snap),
        "row_count": snap.row_count,
        "sha256": snap.sha256,
        "byte_size": snap.byte_size,
        "error": snap.error,
        "created_at": snap.created_at.isoformat(),
        "finished_at": snap.finished_at.isoformat() if snap.finished_at else None,
        "download": f"/api/projects/{snap.project.slug}/snapshots/{snap.id}/download/"
        if snap.status == "done"
        else None,
    }


class SnapshotListCreateView(APIView):
    @extend_schema(
        operation_id="snapshots_list",
        responses={
            200: inline_serializer("SnapshotList", {"snapshots": SnapshotOut(many=True)}),
            **errors(*AUTHED_ERRORS),
        },
    )
    def get(self, request: Request, slug: str) -> Response:
        from annotate.models import DatasetSnapshot

        project, _ = selectors.project_for_member(slug=slug, user=request.user)
        snaps = (
            DatasetSnapshot.objects.filter(project=project)
            .select_related("project")
            .order_by("-created_at")[:200]
        )
        return Response({"snapshots": [_snapshot_out(s) for s in snaps]})

    @extend_schema_serializer(component_name="SnapshotCreate")
    class InputSerializer(serializers.Serializer):
        """The export parameters (as for ``export/``) and a name; ``exports.spec_from_params``
        checks the values."""

        name = serializers.CharField(required=False, allow_blank=True, max_length=200)
        schema = serializers.ChoiceField(
            choices=["trl", "pickapic", "aspects", "ranking", "raw"], required=False
        )
        format = serializers.ChoiceField(choices=["jsonl", "csv", "parquet"], required=False)
        aggregate = serializers.ChoiceField(choices=["none", "majority", "soft"], required=False)
        media = serializers.ChoiceField(choices=["url", "bytes"], required=False)
        since = serializers.DateTimeField(required=False, allow_null=True)
        until = serializers.DateTimeField(required=False, allow_null=True)
        min_agreement = FiniteFloatField(required=False, allow_null=True, min_value=0.0, max_value=1.0)
        exclude_paused = serializers.BooleanField(required=False)
        gold = serializers.ChoiceField(choices=["any", "only", "exclude"], required=False)
        aspect = serializers.CharField(required=False, allow_blank=True, max_length=40)
        generator_versions = serializers.ListField(
            child=serializers.CharField(max_length=401),
            required=False,
            help_text="generator version ids or generator@version",
        )
        modality = serializers.ChoiceField(choices=Modality.values, required=False)

    @extend_schema(
        operation_id="snapshot_create",
        description="Build an immutable dataset snapshot on Celery. "
        "Body: the export parameters (schema, format, aggregate, filters) and an optional name.",
        request=InputSerializer,
        responses={202: SnapshotOut, **errors(*AUTHED_ERRORS, *BODY_ERRORS)},
    )
    def post(self, request: Request, slug: str) -> Response:
        from annotate import exports

        project, _ = selectors.project_for_member(slug=slug, user=request.user)
        body = self.InputSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data: dict[str, Any] = dict(body.validated_data)
        spec = exports.spec_from_params(data)
        exports.validate_for_project(project=project, spec=spec)
        snap = services.snapshot_create(
            project=project, actor=request.user, spec=spec, name=str(data.get("name") or "")
        )
        return Response(_snapshot_out(snap), status=status.HTTP_202_ACCEPTED)


class SnapshotDetailView(APIView):
    @extend_schema(operation_id="snapshot_detail", responses={200: SnapshotOut, **errors(*AUTHED_ERRORS)})
    def get(self, request: Request, slug: str, snapshot_id: int) -> Response:
        from annotate.models import DatasetSnapshot

        project, _ = selectors.project_for_member(slug=slug, user=request.user)
        snap = (
            DatasetSnapshot.objects.filter(project=project, id=snapshot_id).select_related("project").first()
        )
        if snap is None:
            raise NotFound(f"no snapshot {snapshot_id} in {slug}")
        return Response(_snapshot_out(snap))


class SnapshotDownloadView(APIView):
    @extend_schema(
        operation_id="snapshot_download",
        responses={
            **_binary(
                "the snapshot's file (ETag: its sha256)",
                "application/x-ndjson",
                "text/csv",
                "application/vnd.apache.parquet",
            ),
            **errors(*AUTHED_ERRORS),
        },
    )
    def get(self, request: Request, slug: str, snapshot_id: int) -> Any:
        from django.http import FileResponse

        from annotate import exports
        from annotate.models import DatasetSnapshot

        project, _ = selectors.project_for_member(slug=slug, user=request.user)
        selectors.member_role_require(project=project, user=request.user, roles=(ProjectMember.Role.MANAGER,))
        snap = DatasetSnapshot.objects.filter(project=project, id=snapshot_id).first()
        if snap is None or snap.status != DatasetSnapshot.Status.DONE:
            raise NotFound(f"snapshot {snapshot_id} is not built (yet)")
        fmt = snap.spec.get("format", "jsonl")
        response = FileResponse(
            snap.file.open("rb"), content_type=exports.CONTENT_TYPES.get(fmt, "application/octet-stream")
        )
        response["Content-Disposition"] = (
            f'attachment; filename="{(snap.file.name or "").rsplit("/", 1)[-1]}"'
        )
        response["ETag"] = f'"{snap.sha256}"'
        return response


class SamplesImportView(APIView):
    parser_classes = [MultiPartParser]

    @extend_schema(
        operation_id="samples_import",
        request={
            "multipart/form-data": inline_serializer(
                "SamplesImportUpload", {"file": serializers.FileField(help_text="the zip")}
            )
        },
        responses={
            201: inline_serializer(
                "SamplesImported",
                {
                    "rows": serializers.IntegerField(),
                    "created": serializers.IntegerField(),
                    "duplicates": serializers.IntegerField(),
                    "sample_ids": serializers.ListField(child=serializers.IntegerField()),
                },
            ),
            **errors(*AUTHED_ERRORS, *BODY_ERRORS),
        },
        description="multipart: `file` = a zip with manifest.jsonl or "
        "manifest.csv (prompt, path|text, generator, generator_version, metadata) and the media.",
    )
    def post(self, request: Request, slug: str) -> Response:
        from annotate import imports

        project, _ = selectors.project_for_member(slug=slug, user=request.user)
        _upload_length_check(request)  # before the body is read
        upload = request.FILES.get("file")
        if upload is None:
            raise Invalid("upload the zip as the 'file' field")
        result = imports.samples_import(project=project, actor=request.user, source=upload)
        return Response(
            {
                "rows": result.rows,
                "created": result.created,
                "duplicates": result.duplicates,
                "sample_ids": result.sample_ids,
            },
            status=status.HTTP_201_CREATED,
        )


class PreferencesImportView(APIView):
    parser_classes = [MultiPartParser]

    @extend_schema(
        operation_id="preferences_import",
        parameters=[
            OpenApiParameter("format", str, enum=["trl", "pickapic"]),
            OpenApiParameter(
                "on_error",
                str,
                enum=["fail", "skip"],
                description="fail (default): one broken row refuses the file and stores nothing; "
                "skip: import the other rows and list the broken ones in `skipped_rows`",
            ),
        ],
        request={
            "multipart/form-data": inline_serializer(
                "PreferencesImportUpload",
                {
                    "file": serializers.FileField(help_text="TRL JSONL or Pick-a-Pic Parquet"),
                    "format": serializers.ChoiceField(
                        choices=["trl", "pickapic"], required=False, help_text="if not in the query"
                    ),
                    "on_error": serializers.ChoiceField(
                        choices=["fail", "skip"], required=False, help_text="if not in the query"
                    ),
                },
            )
        },
        responses={
            201: inline_serializer(
                "PreferencesImported",
                {
                    "rows": serializers.IntegerField(),
                    "judgments": serializers.IntegerField(),
                    "comparisons": serializers.IntegerField(),
                    "samples_created": serializers.IntegerField(),
                    "samples_reused": serializers.IntegerField(),
                    "skipped": serializers.IntegerField(help_text="broken rows left out (on_error=skip)"),
                    "skipped_rows": inline_serializer(
                        "PreferencesSkippedRow",
                        {"row": serializers.IntegerField(), "reason": serializers.CharField()},
                        many=True,
                        help_text="the first 1,000 skipped rows with the reason",
                    ),
                },
            ),
            **errors(*AUTHED_ERRORS, *BODY_ERRORS),
        },
        description="multipart: `file` = TRL-style JSONL or Pick-a-Pic-style Parquet.",
    )
    def post(self, request: Request, slug: str) -> Response:
        from annotate import imports

        project, _ = selectors.project_for_member(slug=slug, user=request.user)
        _upload_length_check(request)  # before the body is read
        upload = request.FILES.get("file")
        if upload is None:
            raise Invalid("upload the data as the 'file' field")
        form: Any = request.data
        fmt = request.query_params.get("format") or form.get("format") or ""
        on_error = request.query_params.get("on_error") or form.get("on_error") or "fail"
        result = imports.preferences_import(
            project=project, actor=request.user, fmt=str(fmt), file=upload, on_error=str(on_error)
        )
        return Response(
            {
                "rows": result.rows,
                "judgments": result.judgments,
                "comparisons": result.comparisons,
                "samples_created": result.created,
                "samples_reused": result.duplicates,
                "skipped": result.skipped,
                "skipped_rows": result.skipped_rows,
            },
            status=status.HTTP_201_CREATED,
        )
