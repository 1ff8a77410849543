"""A project's reward settings (``RewardConfig``): read without writing for launch checks, created on first use elsewhere."""

from __future__ import annotations

import logging

from annotate.models import Project
from rewards.models import (
    RewardConfig,
)

log = logging.getLogger(__name__)


def reward_config_get(*, project: Project) -> RewardConfig:
    """The project's reward settings (created with defaults on first use)."""
    config, _ = RewardConfig.objects.get_or_create(project=project)
    return config


def reward_config_read(project: Project) -> RewardConfig:
    """The project's reward settings without writing anything: an unsaved default when it has none
    (a launch that is refused must leave no row behind)."""
    return RewardConfig.objects.filter(project=project).first() or RewardConfig(project=project)
