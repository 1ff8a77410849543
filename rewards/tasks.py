"""Celery tasks of the rewards app: thin wrappers around services. ``gpu_*`` tasks are routed to
the ``gpu`` queue (settings.CELERY_TASK_ROUTES); a CPU worker serving that queue runs them too."""

from celery import shared_task
from django.core.cache import cache

from rewards import services
from rewards.models import RewardModelVersion


@shared_task(name="rewards.tasks.gpu_train_reward_model", ignore_result=True)
def gpu_train_reward_model(job_id: int) -> None:
    # No automatic retry: a failed job is marked failed with its error; relaunching is a decision.
    services.reward_job_run(job_id=job_id)


@shared_task(name="rewards.tasks.gpu_score_samples", ignore_result=True)
def gpu_score_samples(version_id: int, only_new: bool = False) -> None:
    try:
        services.version_score_samples(version_id=version_id, only_new=only_new)
    finally:
        if only_new:
            version = RewardModelVersion.objects.filter(id=version_id).first()
            if version is not None:
                cache.delete(services.score_refresh_key(version))


@shared_task(name="rewards.tasks.scores_refresh", ignore_result=True)
def scores_refresh() -> list[int]:
    return services.scores_refresh()


@shared_task(name="rewards.tasks.retrain_due", ignore_result=True)
def retrain_due() -> list[int]:
    return services.retrain_due()
