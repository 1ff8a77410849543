"""Admin: launch an RL job with a form, watch it (progress, per-step metrics plotted, checkpoints,
the sampling job its feedback queued), cancel it; sampling jobs and their rounds."""

from __future__ import annotations

import json
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db import transaction
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.template.response import TemplateResponse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe

from annotate.errors import ServiceError
from annotate.models import Project
from training import plots, services
from training.algorithms import ALGORITHM_CHOICES
from training.models import LoopConfig, LoopRound, RLJob, SamplingJob


def _json_object(value: str, *, required: bool) -> dict[str, Any] | None:
    if not value.strip():
        if required:
            return {}
        return None
    try:
        data = json.loads(value)
    except json.JSONDecodeError as exc:
        raise forms.ValidationError(f"not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise forms.ValidationError("a JSON object is expected")
    return data


class LaunchForm(forms.Form):
    project = forms.ModelChoiceField(queryset=Project.objects.order_by("slug"))
    algorithm = forms.ChoiceField(choices=ALGORITHM_CHOICES, initial="ddpo")
    config = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 8, "cols": 70}),
        initial='{"pipeline": "", "iterations": 10, "device": "cpu"}',
        help_text="the algorithm's config as JSON (training/ml/&lt;algorithm&gt;/config.py); "
        "pipeline or policy: a model directory on the server",
    )
    feedback = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 3, "cols": 70}),
        required=False,
        initial='{"prompts": 16, "within_pairs": 1, "render": {"per_prompt": 2}}',
        help_text="optional: at the end, render the newest prompts with the last checkpoint and queue "
        "them for judging against the base model (empty: no feedback)",
    )

    reward = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 2, "cols": 70}),
        required=False,
        initial="",
        help_text='optional, every key optional: {"version": reward model number (default: the active '
        'one), "conservative_k": 1.0 (ensembles: mean - k * std), "artifact_version": an artifact '
        'classifier\'s number, "artifact_weight": 1.0}',
    )

    def clean_config(self) -> dict[str, Any]:
        return _json_object(self.cleaned_data["config"], required=True) or {}

    def clean_feedback(self) -> dict[str, Any] | None:
        return _json_object(self.cleaned_data.get("feedback") or "", required=False)

    def clean_reward(self) -> dict[str, Any] | None:
        return _json_object(self.cleaned_data.get("reward") or "", required=False)


def metric_charts(metrics: list[dict[str, Any]]) -> str:
    """One small SVG chart per number the trainer logged, over its iterations or steps."""
    charts = plots.metric_charts(metrics)
    if not charts:
        return "no steps yet"
    return "".join(f'<div style="display:inline-block;margin:0 8px 8px 0">{c}</div>' for c in charts)


@admin.register(RLJob)
class RLJobAdmin(admin.ModelAdmin):
    list_display = ("id", "project", "algorithm", "status", "progress_display", "created_at")
    list_filter = ("status", "algorithm", "project")
    readonly_fields = [
        "project",
        "algorithm",
        "status",
        "progress_display",
        "metrics_plot",
        "reward_version",
        "artifact_version",
        "reward_options",
        "base_version",
        "config_display",
        "feedback",
        "checkpoints_display",
        "sampling_links",
        "cancel_requested",
        "error",
        "created_by",
        "created_at",
        "started_at",
        "finished_at",
    ]
    exclude = ["metrics", "config", "checkpoints", "output_dir", "step", "total_steps"]
    actions = ["cancel_jobs"]
    list_select_related = ["project"]

    @admin.display(description="progress")
    def progress_display(self, job: RLJob) -> str:
        last = job.metrics[-1] if job.metrics else {}
        reward = last.get("reward_mean", last.get("reward"))
        tail = f", reward {reward:.4f}" if isinstance(reward, int | float) else ""
        return f"{job.step}/{job.total_steps}{tail}"

    @admin.display(description="per-step metrics")
    def metrics_plot(self, job: RLJob) -> str:
        return mark_safe(metric_charts(list(job.metrics)))  # noqa: S308 - plots escape every label

    @admin.display(description="config")
    def config_display(self, job: RLJob) -> str:
        return format_html("<pre>{}</pre>", json.dumps(job.config, indent=2, sort_keys=True))

    @admin.display(description="checkpoints")
    def checkpoints_display(self, job: RLJob) -> str:
        if not job.checkpoints:
            return "—"
        return format_html(
            "<ul>{}</ul>", format_html_join("", "<li><code>{}</code></li>", ((c,) for c in job.checkpoints))
        )

    @admin.display(description="feedback (sampling jobs)")
    def sampling_links(self, job: RLJob) -> str:
        rows = [(s.id, s.round, s.status, s.comparisons_created) for s in job.sampling_jobs.order_by("id")]
        if not rows:
            return "—"
        return format_html_join(
            " ", '<a href="../../../samplingjob/{}/change/">round {} ({}, {} comparisons)</a>', rows
        )

    def get_form(self, request: HttpRequest, obj: Any = None, change: bool = False, **kwargs: Any) -> Any:
        if obj is None:
            return LaunchForm
        return super().get_form(request, obj, change=change, **kwargs)

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return self.readonly_fields if obj is not None else []

    def add_view(self, request: HttpRequest, form_url: str = "", extra_context: Any = None) -> HttpResponse:
        form = LaunchForm(request.POST) if request.method == "POST" else LaunchForm()
        if request.method == "POST" and form.is_valid():
            d = form.cleaned_data
            try:
                job = services.rl_job_create(
                    project=d["project"],
                    actor=request.user,
                    algorithm=d["algorithm"],
                    config=d["config"],
                    feedback=d["feedback"],
                    reward=d["reward"],
                )
            except ServiceError as exc:
                form.add_error(None, exc.message)
            else:
                self.message_user(request, f"RL job {job.id} queued on the gpu queue.", messages.SUCCESS)
                return redirect(f"../{job.id}/change/")
        context = {
            **self.admin_site.each_context(request),
            "title": "Launch an RL job",
            "form": form,
            "opts": self.model._meta,
        }
        return TemplateResponse(request, "admin/rewards/launch.html", context)

    def change_view(
        self, request: HttpRequest, object_id: str, form_url: str = "", extra_context: Any = None
    ) -> HttpResponse:
        job = RLJob.objects.filter(id=object_id).first()
        extra = dict(extra_context or {})
        # Watching a running job: the page reloads itself every 2 s until the job ends.
        extra["auto_refresh"] = job is not None and job.status in ("queued", "running")
        return super().change_view(request, object_id, form_url, extra_context=extra)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return obj is None and super().has_change_permission(request, obj)

    @admin.action(description="Cancel the selected jobs")
    def cancel_jobs(self, request: HttpRequest, queryset: Any) -> None:
        n = 0
        for job in queryset.select_related("project"):
            try:
                services.rl_job_cancel(job=job, actor=request.user)
                n += 1
            except ServiceError as exc:
                self.message_user(request, f"job {job.id}: {exc.message}", messages.WARNING)
        self.message_user(request, f"{n} job(s) asked to stop.")


@admin.register(SamplingJob)
class SamplingJobAdmin(admin.ModelAdmin):
    list_display = (
        "id",
        "project",
        "round",
        "version",
        "incumbent",
        "status",
        "progress_display",
        "comparisons_created",
    )
    list_filter = ("status", "project")
    readonly_fields = [
        "project",
        "round",
        "version",
        "incumbent",
        "rl_job",
        "status",
        "progress_display",
        "prompts_count",
        "within_pairs",
        "config",
        "samples_created",
        "samples_reused",
        "comparisons_created",
        "identical",
        "error",
        "created_by",
        "created_at",
        "started_at",
        "rendered_at",
        "finished_at",
    ]
    exclude = ["prompt_ids", "outputs", "done", "total"]
    list_select_related = ["project", "version", "incumbent"]

    @admin.display(description="rendered")
    def progress_display(self, job: SamplingJob) -> str:
        return f"{job.done}/{job.total}"

    @admin.display(description="prompts")
    def prompts_count(self, job: SamplingJob) -> int:
        return len(job.prompt_ids)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # launched from the API or by an RL job's feedback

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return obj is None and super().has_change_permission(request, obj)

    def change_view(
        self, request: HttpRequest, object_id: str, form_url: str = "", extra_context: Any = None
    ) -> HttpResponse:
        job = SamplingJob.objects.filter(id=object_id).first()
        extra = dict(extra_context or {})
        extra["auto_refresh"] = job is not None and job.status in ("queued", "rendering", "rendered")
        return super().change_view(request, object_id, form_url, extra_context=extra)


class LoopConfigForm(forms.ModelForm):
    """The loop's settings; saved only when the loop service accepts them (it checks every setting
    as an RL launch would)."""

    user: Any = None

    class Meta:
        model = LoopConfig
        fields = [
            "project", "enabled", "paused", "algorithm", "rl_config", "feedback", "reward_kind",
            "reward_hyperparameters", "encoder_path", "retrain_after", "verdicts_needed", "guard_margin",
            "max_rounds",
        ]  # fmt: skip

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if self.errors:
            return data
        fields = ("algorithm", "rl_config", "feedback", "reward_kind", "reward_hyperparameters", "encoder_path",
                  "retrain_after", "verdicts_needed", "guard_margin", "max_rounds", "enabled")  # fmt: skip
        try:
            with transaction.atomic():  # checked by the service, then rolled back: the admin saves it
                services.loop_config_set(
                    project=data["project"], actor=self.user, **{k: data[k] for k in fields if k in data}
                )
                transaction.set_rollback(True)
        except ServiceError as exc:
            raise forms.ValidationError(exc.message) from exc
        return data


@admin.register(LoopConfig)
class LoopConfigAdmin(admin.ModelAdmin):
    form = LoopConfigForm
    list_display = (
        "project",
        "enabled",
        "paused",
        "algorithm",
        "retrain_after",
        "verdicts_needed",
        "stopped_reason",
    )
    list_filter = ("enabled", "paused")
    readonly_fields = ["owner", "stopped_reason", "page_link"]

    @admin.display(description="project page")
    def page_link(self, config: LoopConfig) -> str:
        return format_html('<a href="/projects/{}/loop/">timeline and guard plot</a>', config.project.slug)

    def get_form(self, request: HttpRequest, obj: Any = None, change: bool = False, **kwargs: Any) -> Any:
        form = super().get_form(request, obj, change=change, **kwargs)
        form.user = request.user  # type: ignore[attr-defined]  # the manager the service checks
        return form

    def save_model(self, request: HttpRequest, obj: LoopConfig, form: Any, change: bool) -> None:
        obj.owner = request.user  # type: ignore[assignment]
        if obj.enabled:
            obj.stopped_reason = ""
        super().save_model(request, obj, form, change)


@admin.register(LoopRound)
class LoopRoundAdmin(admin.ModelAdmin):
    list_display = (
        "project",
        "number",
        "state",
        "verdicts",
        "human_win_rate",
        "predicted_win_rate",
        "started_at",
    )
    list_filter = ("state", "project")
    readonly_fields = [f.name for f in LoopRound._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # rounds are started by the loop's tick

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return obj is None and super().has_change_permission(request, obj)
