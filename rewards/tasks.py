"""Celery tasks of the rewards app: thin wrappers around services. ``gpu_*`` tasks are routed to
the ``gpu`` queue (settings.CELERY_TASK_ROUTES); a CPU worker serving that queue runs them too."""

from celery import shared_task

from rewards import services


@shared_task(name="rewards.tasks.gpu_train_reward_model", ignore_result=True)
def gpu_train_reward_model(job_id: int) -> None:
    # No automatic retry: a failed job is marked failed with its error; relaunching is a decision.
    services.reward_job_run(job_id=job_id)


@shared_task(name="rewards.tasks.gpu_score_samples", ignore_result=True)
def gpu_score_samples(version_id: int) -> None:
    services.version_score_samples(version_id=version_id)


@shared_task(name="rewards.tasks.retrain_due", ignore_result=True)
def retrain_due() -> list[int]:
    return services.retrain_due()
