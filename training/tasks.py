"""Celery tasks of the training app: thin wrappers that load by id and call one service. ``gpu_*``
tasks go to the ``gpu`` queue (settings.CELERY_TASK_ROUTES).

An RL job's task is acknowledged late and rejected (requeued) when its worker dies, so a job whose
worker was killed runs again and resumes from its last checkpoint; a failure inside the job is not
retried (it is marked failed with its reason)."""

from celery import shared_task


@shared_task(
    name="training.tasks.gpu_rl_job_run", ignore_result=True, acks_late=True, reject_on_worker_lost=True
)
def gpu_rl_job_run(job_id: int) -> None:
    from training.services.jobs import rl_job_run

    rl_job_run(job_id=job_id)


@shared_task(
    name="training.tasks.gpu_sampling_job_render",
    ignore_result=True,
    acks_late=True,
    reject_on_worker_lost=True,
)
def gpu_sampling_job_render(job_id: int) -> None:
    from training.services.sampling import sampling_job_render

    sampling_job_render(job_id=job_id)


@shared_task(name="training.tasks.sampling_job_queue", ignore_result=True, acks_late=True)
def sampling_job_queue(job_id: int) -> None:
    """Bookkeeping on the default queue: it never waits behind a long GPU job."""
    from training.services.sampling import sampling_job_queue as queue

    queue(job_id=job_id)


@shared_task(name="training.tasks.loop_tick", ignore_result=True)
def loop_tick() -> None:
    """The loop controller's beat tick, on the default queue: cheap, and claimed step by step, so a
    tick that fires before the last one finished advances nothing twice."""
    from training.services.loop import loop_tick_all

    loop_tick_all()
