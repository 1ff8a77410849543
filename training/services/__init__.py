"""The training app's services, one module per capability (re-exported here)."""

from training.services.jobs import rl_job_cancel, rl_job_create, rl_job_run

__all__ = ["rl_job_cancel", "rl_job_create", "rl_job_run"]
