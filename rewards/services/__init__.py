"""Reward-model services, one module per capability:

- ``encoders``: default encoders, registering and inspecting encoder directories, loading them;
- ``embeddings``: the embedding cache (each sample and prompt embedded once per encoder);
- ``pairs``: judged pairs of a snapshot and the held-out split (numpy rules in ``rewards.ml.pairs``);
- ``jobs``: launch, cancel and run training jobs;
- ``registry``: champion/challenger decisions and the active version;
- ``scoring``: sample scores and active-learning priorities;
- ``retraining``: the periodic retrain check;
- ``config``: a project's reward settings.

The torch code lives in ``rewards.ml`` (no Django there); these functions move data between
PostgreSQL and it. Every launch is validated here, so a bad encoder path, too few pairs or an
out-of-range hyperparameter is a clear 400 when the job is created, not a crashed worker.
``from rewards import services; services.reward_job_create(...)`` keeps working: the public
functions are re-exported here.
"""

from __future__ import annotations

from rewards.services.config import (
    reward_config_get,
    reward_config_read,
)
from rewards.services.embeddings import (
    EMBED_BATCH,
    embeddings_ensure,
    features_load,
)
from rewards.services.encoders import (
    BUILTIN,
    builtin_encoder_path,
    encoder_default_path,
    encoder_inspect,
    encoder_known,
    encoder_load,
    encoder_record,
    encoder_register,
    encoder_supports,
    project_modalities,
    sample_image_open,
)
from rewards.services.jobs import (
    cancel_key,
    reward_hyperparameters_resolve,
    reward_job_cancel,
    reward_job_create,
    reward_job_run,
)
from rewards.services.pairs import (
    min_holdout_pairs,
    min_pairs,
    pairs_split,
    snapshot_pairs,
    split_check,
)
from rewards.services.registry import (
    version_activate,
    version_decide,
    version_model_load,
)
from rewards.services.retraining import (
    jobs_fail_stale,
    retrain_due,
)
from rewards.services.scoring import (
    comparison_priorities_update,
    score_refresh_key,
    scores_refresh,
    version_score_refresh,
    version_score_samples,
)

__all__ = [
    "BUILTIN",
    "EMBED_BATCH",
    "builtin_encoder_path",
    "cancel_key",
    "comparison_priorities_update",
    "embeddings_ensure",
    "encoder_default_path",
    "encoder_inspect",
    "encoder_known",
    "encoder_load",
    "encoder_record",
    "encoder_register",
    "encoder_supports",
    "features_load",
    "jobs_fail_stale",
    "min_holdout_pairs",
    "min_pairs",
    "pairs_split",
    "project_modalities",
    "retrain_due",
    "reward_config_get",
    "reward_config_read",
    "reward_hyperparameters_resolve",
    "reward_job_cancel",
    "reward_job_create",
    "reward_job_run",
    "sample_image_open",
    "score_refresh_key",
    "scores_refresh",
    "snapshot_pairs",
    "split_check",
    "version_activate",
    "version_decide",
    "version_model_load",
    "version_score_refresh",
    "version_score_samples",
]
