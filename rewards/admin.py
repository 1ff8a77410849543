"""Admin: launch a reward training job with a form, watch it, compare versions, set retraining."""

from __future__ import annotations

import json
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.utils.html import format_html
from django.utils.safestring import mark_safe

from annotate.errors import ServiceError
from annotate.models import DatasetSnapshot, Project
from rewards import plots, services
from rewards.api.views import version_of
from rewards.models import (
    KIND_CHOICES,
    Encoder,
    RewardConfig,
    RewardModelVersion,
    RewardTrainingJob,
)


def _pct(value: Any) -> str:
    return "—" if value is None else f"{100 * float(value):.1f}%"


def _chart(series: dict[str, list[tuple[float, float]]]) -> str:
    svg = plots.line_chart(series, title="held-out accuracy during training", xlabel="step")
    return mark_safe(svg)  # noqa: S308 - plots escape every label


@admin.register(Encoder)
class EncoderAdmin(admin.ModelAdmin):
    list_display = ["name", "family", "model_type", "dim", "path", "created_at"]
    readonly_fields = [
        "fingerprint",
        "name",
        "path",
        "family",
        "model_type",
        "dim",
        "modalities",
        "created_at",
    ]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False


class RewardConfigForm(forms.ModelForm):
    class Meta:
        model = RewardConfig
        fields = [
            "project",
            "encoder_path",
            "kind",
            "hyperparameters",
            "holdout",
            "video_frames",
            "auto_retrain",
            "retrain_min_new_judgments",
            "retrain_every_minutes",
        ]

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        try:
            if data.get("encoder_path"):
                services.encoder_register(path=data["encoder_path"])
            services.reward_hyperparameters_resolve(
                data.get("kind") or "bt", data.get("hyperparameters") or {}, "cpu"
            )
        except ServiceError as exc:
            raise forms.ValidationError(exc.message) from exc
        return data


@admin.register(RewardConfig)
class RewardConfigAdmin(admin.ModelAdmin):
    form = RewardConfigForm
    list_display = [
        "project",
        "kind",
        "encoder_path",
        "auto_retrain",
        "retrain_min_new_judgments",
        "retrain_every_minutes",
    ]
    list_editable = ["auto_retrain", "retrain_min_new_judgments", "retrain_every_minutes"]


class LaunchForm(forms.Form):
    project = forms.ModelChoiceField(queryset=Project.objects.order_by("slug"))
    kind = forms.ChoiceField(choices=KIND_CHOICES, initial="bt")
    encoder_path = forms.CharField(
        required=False, help_text="Local encoder directory; blank: the project's reward config."
    )
    snapshot = forms.ModelChoiceField(
        queryset=DatasetSnapshot.objects.filter(status="done", spec__schema="raw").order_by("-created_at"),
        required=False,
        help_text="A raw snapshot to train on; blank: a new snapshot of every judgment.",
    )
    hyperparameters = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 4, "cols": 60}),
        required=False,
        initial="{}",
        help_text='JSON object of the kind\'s config fields, e.g. {"epochs": 20, "lr": 0.001}.',
    )
    holdout = forms.FloatField(initial=0.2, min_value=0.05, max_value=0.5)
    device = forms.CharField(initial="cpu")
    promote = forms.BooleanField(
        initial=True, required=False, help_text="Run champion/challenger afterwards."
    )

    def clean_hyperparameters(self) -> dict[str, Any]:
        raw = self.cleaned_data.get("hyperparameters") or "{}"
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise forms.ValidationError(f"not JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise forms.ValidationError("a JSON object is expected")
        return value


@admin.register(RewardTrainingJob)
class RewardTrainingJobAdmin(admin.ModelAdmin):
    list_display = [
        "id",
        "project",
        "kind",
        "status",
        "progress_display",
        "trigger",
        "created_at",
        "version_link",
    ]
    list_filter = ["status", "kind", "trigger", "project"]
    readonly_fields = [
        "project",
        "kind",
        "encoder",
        "encoder_path",
        "snapshot",
        "config",
        "holdout",
        "video_frames",
        "device",
        "promote",
        "trigger",
        "status",
        "progress_display",
        "cancel_requested",
        "error",
        "created_by",
        "created_at",
        "started_at",
        "finished_at",
        "version_link",
    ]
    exclude = ["progress"]
    actions = ["cancel_jobs"]
    list_select_related = ["project", "version"]

    @admin.display(description="progress")
    def progress_display(self, job: RewardTrainingJob) -> str:
        p = job.progress or {}
        phase = p.get("phase", "")
        if phase == "training" and p.get("total_steps"):
            eta = f", ETA {p['eta_s']:.0f} s" if p.get("eta_s") is not None else ""
            loss = f", loss {p['loss']:.4f}" if p.get("loss") is not None else ""
            return f"training {p.get('step', 0)}/{p['total_steps']} (epoch {p.get('epoch')}/{p.get('epochs')}{loss}{eta})"
        if phase == "embedding" and p.get("total"):
            return f"embedding {p.get('done', 0)}/{p['total']}"
        return phase

    @admin.display(description="version")
    def version_link(self, job: RewardTrainingJob) -> str:
        version = version_of(job)
        if version is None:
            return "—"
        return format_html(
            '<a href="../../rewardmodelversion/{}/change/">v{}</a>', version.id, version.number
        )

    def get_form(self, request: HttpRequest, obj: Any = None, change: bool = False, **kwargs: Any) -> Any:
        if obj is None:
            return LaunchForm
        return super().get_form(request, obj, change=change, **kwargs)

    def get_fieldsets(self, request: HttpRequest, obj: Any = None) -> Any:
        if obj is None:
            return [(None, {"fields": list(LaunchForm.base_fields)})]
        return super().get_fieldsets(request, obj)

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return self.readonly_fields if obj is not None else []

    def add_view(self, request: HttpRequest, form_url: str = "", extra_context: Any = None) -> HttpResponse:
        if request.method == "POST":
            form = LaunchForm(request.POST)
            if form.is_valid():
                d = form.cleaned_data
                try:
                    job = services.reward_job_create(
                        project=d["project"],
                        actor=request.user,
                        kind=d["kind"],
                        encoder_path=d["encoder_path"] or None,
                        snapshot=d["snapshot"],
                        hyperparameters=d["hyperparameters"],
                        holdout=d["holdout"],
                        device=d["device"],
                        promote=d["promote"],
                    )
                except ServiceError as exc:
                    form.add_error(None, exc.message)
                else:
                    self.message_user(request, f"Job {job.id} queued on the gpu queue.", messages.SUCCESS)
                    from django.shortcuts import redirect

                    return redirect(f"../{job.id}/change/")
            context = {
                **self.admin_site.each_context(request),
                "title": "Launch a reward training job",
                "form": form,
                "opts": self.model._meta,
            }
            return TemplateResponse(request, "admin/rewards/launch.html", context)
        context = {
            **self.admin_site.each_context(request),
            "title": "Launch a reward training job",
            "form": LaunchForm(),
            "opts": self.model._meta,
        }
        return TemplateResponse(request, "admin/rewards/launch.html", context)

    def change_view(
        self, request: HttpRequest, object_id: str, form_url: str = "", extra_context: Any = None
    ) -> HttpResponse:
        job = RewardTrainingJob.objects.filter(id=object_id).first()
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
                services.reward_job_cancel(job=job, actor=request.user)
                n += 1
            except ServiceError as exc:
                self.message_user(request, f"job {job.id}: {exc.message}", messages.WARNING)
        self.message_user(request, f"{n} job(s) asked to stop.")


@admin.register(RewardModelVersion)
class RewardModelVersionAdmin(admin.ModelAdmin):
    list_display = [
        "__str__",
        "is_active",
        "holdout_acc",
        "gold_acc",
        "majority",
        "ece",
        "decision_text",
        "created_at",
    ]
    list_filter = ["project", "kind", "is_active"]
    readonly_fields = [
        "project",
        "number",
        "job",
        "kind",
        "encoder",
        "snapshot",
        "path",
        "is_active",
        "metrics_table",
        "curves_plot",
        "decision",
        "created_at",
    ]
    exclude = ["metrics", "curves"]
    actions = ["make_active", "compare"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    @admin.display(description="held-out acc")
    def holdout_acc(self, v: RewardModelVersion) -> str:
        return _pct(v.metrics.get("holdout_accuracy"))

    @admin.display(description="gold acc")
    def gold_acc(self, v: RewardModelVersion) -> str:
        return _pct(v.metrics.get("gold_accuracy"))

    @admin.display(description="majority agreement")
    def majority(self, v: RewardModelVersion) -> str:
        return _pct(v.metrics.get("majority_agreement"))

    @admin.display(description="ECE")
    def ece(self, v: RewardModelVersion) -> str:
        value = v.metrics.get("ece")
        return "—" if value is None else f"{value:.3f}"

    @admin.display(description="champion/challenger")
    def decision_text(self, v: RewardModelVersion) -> str:
        return str((v.decision or {}).get("reason", ""))

    @admin.display(description="metrics")
    def metrics_table(self, v: RewardModelVersion) -> str:
        rows = "".join(
            format_html("<tr><th>{}</th><td>{}</td></tr>", key, json.dumps(value))
            for key, value in (v.metrics or {}).items()
        )
        return mark_safe(f"<table>{rows}</table>")  # noqa: S308 - every cell escaped by format_html

    @admin.display(description="training curves")
    def curves_plot(self, v: RewardModelVersion) -> str:
        curves = v.curves or []
        charts = [plots.curves_chart(curves, "loss", title="training loss")]
        if any(c.get("holdout_accuracy") is not None for c in curves):
            charts.append(plots.curves_chart(curves, "holdout_accuracy", title="held-out accuracy"))
        return mark_safe("<div>" + "".join(charts) + "</div>")  # noqa: S308 - plots escape their labels

    @admin.action(description="Make the selected version active")
    def make_active(self, request: HttpRequest, queryset: Any) -> None:
        if queryset.count() != 1:
            self.message_user(request, "Select exactly one version.", messages.WARNING)
            return
        try:
            v = services.version_activate(
                version=queryset.select_related("project").first(), actor=request.user
            )
        except ServiceError as exc:
            self.message_user(request, exc.message, messages.ERROR)
            return
        self.message_user(request, f"v{v.number} is now active for {v.project.slug}.")

    @admin.action(description="Compare the selected versions")
    def compare(self, request: HttpRequest, queryset: Any) -> HttpResponse:
        versions = list(queryset.select_related("project", "encoder").order_by("project_id", "number"))
        keys = [
            "holdout_accuracy",
            "gold_accuracy",
            "majority_agreement",
            "ece",
            "train_pairs",
            "holdout_pairs",
        ]
        series = {
            f"{v.project.slug} v{v.number}": [
                (float(c["step"]), float(c["holdout_accuracy"]))
                for c in (v.curves or [])
                if c.get("holdout_accuracy") is not None
            ]
            for v in versions
        }
        rows = [
            {
                "version": v,
                "values": [v.metrics.get(k) for k in keys],
                "aspects": v.metrics.get("aspect_accuracy") or {},
            }
            for v in versions
        ]
        context = {
            **self.admin_site.each_context(request),
            "title": "Compare reward model versions",
            "keys": keys,
            "rows": rows,
            "chart": _chart(series),
            "opts": self.model._meta,
        }
        return TemplateResponse(request, "admin/rewards/compare.html", context)
