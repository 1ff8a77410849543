"""RL jobs in the admin: a read-only view of their status, progress and checkpoints (launching from
a form comes with the API)."""

from __future__ import annotations

from typing import Any

from django.contrib import admin

from training.models import RLJob


@admin.register(RLJob)
class RLJobAdmin(admin.ModelAdmin):
    list_display = ("id", "project", "algorithm", "status", "step", "total_steps", "created_at")
    list_filter = ("status", "algorithm")
    readonly_fields = [f.name for f in RLJob._meta.fields]

    def has_add_permission(self, request: Any) -> bool:
        return False
