"""The training app's services, one module per capability (re-exported here)."""

from training.services.jobs import rl_job_cancel, rl_job_create, rl_job_run
from training.services.loop import loop_config_set, loop_pause, loop_tick, loop_tick_all
from training.services.sampling import (
    generator_model_register,
    generator_models_of,
    sampling_job_create,
    sampling_job_queue,
    sampling_job_render,
)

__all__ = [
    "generator_model_register",
    "generator_models_of",
    "loop_config_set",
    "loop_pause",
    "loop_tick",
    "loop_tick_all",
    "rl_job_cancel",
    "rl_job_create",
    "rl_job_run",
    "sampling_job_create",
    "sampling_job_queue",
    "sampling_job_render",
]
