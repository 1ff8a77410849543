"""Celery tasks of the annotation app: thin wrappers around services."""

from celery import shared_task

from annotate import services


@shared_task(name="annotate.tasks.expire_leases", ignore_result=True)
def expire_leases() -> int:
    return services.leases_expire()


@shared_task(name="annotate.tasks.build_snapshot", ignore_result=True)
def build_snapshot(snapshot_id: int) -> None:
    services.snapshot_build(snapshot_id=snapshot_id)
