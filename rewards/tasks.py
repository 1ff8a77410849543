"""Celery tasks of the rewards app: thin wrappers that load by id and call one service. ``gpu_*``
tasks are routed to the ``gpu`` queue (settings.CELERY_TASK_ROUTES); a CPU worker serving that
queue runs them too.

One direction: services import this module at module level and queue its tasks on commit; a task
imports its service inside its body (this module imports no service at import time)."""

from celery import shared_task


@shared_task(name="rewards.tasks.gpu_train_reward_model", ignore_result=True)
def gpu_train_reward_model(job_id: int) -> None:
    from rewards.services.jobs import reward_job_run

    # No automatic retry: a failed job is marked failed with its error; relaunching is a decision.
    reward_job_run(job_id=job_id)


@shared_task(name="rewards.tasks.gpu_score_samples", ignore_result=True)
def gpu_score_samples(version_id: int, only_new: bool = False) -> None:
    from rewards.services.scoring import version_score_refresh, version_score_samples

    if only_new:
        version_score_refresh(version_id=version_id)
    else:
        version_score_samples(version_id=version_id)


@shared_task(name="rewards.tasks.scores_refresh", ignore_result=True)
def scores_refresh() -> list[int]:
    from rewards.services.scoring import scores_refresh

    return scores_refresh()


@shared_task(name="rewards.tasks.retrain_due", ignore_result=True)
def retrain_due() -> list[int]:
    from rewards.services.retraining import retrain_due

    return retrain_due()
