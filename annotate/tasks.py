"""Celery tasks of the annotation app: thin wrappers that call one service.

One direction: services import this module at module level and queue its tasks on commit; a task
imports its service inside its body (this module imports no service at import time)."""

from celery import shared_task


@shared_task(name="annotate.tasks.expire_leases", ignore_result=True)
def expire_leases() -> int:
    from annotate.services import leases_expire

    return leases_expire()


@shared_task(name="annotate.tasks.build_snapshot", ignore_result=True)
def build_snapshot(snapshot_id: int) -> None:
    from annotate.services import snapshot_build

    snapshot_build(snapshot_id=snapshot_id)
