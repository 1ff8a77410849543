"""The registry: champion/challenger decisions on the same held-out pairs, and activating a version."""

from __future__ import annotations

import logging
from typing import Any

from django.db import transaction
from django.utils import timezone

from annotate.errors import Invalid
from annotate.models import Project, ProjectMember
from annotate.services import member_role_require, task_dispatch
from rewards import tasks
from rewards.ml.names import ACTIVE_KINDS
from rewards.models import (
    RewardModelVersion,
)
from rewards.services.embeddings import embeddings_ensure, features_load, version_embedding_input
from rewards.services.pairs import Split

log = logging.getLogger(__name__)


def version_model_load(version: RewardModelVersion, device: str = "cpu") -> Any:
    from rewards.ml.model import load_reward_model

    return load_reward_model(version.path, device=device)


def _better(challenger: dict[str, Any], champion: dict[str, Any]) -> bool:
    ca, cb = challenger.get("accuracy"), champion.get("accuracy")
    if ca is None:
        return False
    if cb is None or ca > cb + 1e-12:
        return True
    if abs(ca - cb) <= 1e-12:
        return (challenger.get("log_loss") or float("inf")) < (champion.get("log_loss") or float("inf"))
    return False


def version_decide(
    *, version: RewardModelVersion, model: Any = None, split: Split | None = None
) -> RewardModelVersion:
    """Champion/challenger: ``version`` becomes active only if it beats the active version on the
    same held-out pairs (accuracy, then log loss on a tie). The decision and both sets of figures
    are stored on the version."""
    from rewards.ml import metrics
    from rewards.ml.data import PairSet

    project = version.project
    if version.kind not in ACTIVE_KINDS:
        decision = {
            "promoted": False,
            "reason": f"a {version.kind} model is not a reward model; it is used beside one",
        }
        RewardModelVersion.objects.filter(id=version.id).update(decision=decision)
        version.decision = decision
        return version
    challenger_figs = (version.metrics or {}).get("holdout") or {}
    with transaction.atomic():
        Project.objects.select_for_update().filter(id=project.id).first()
        champion = (
            RewardModelVersion.objects.filter(project=project, is_active=True).exclude(id=version.id).first()
        )
        if challenger_figs.get("accuracy") is None:
            # Never promote without evidence: no held-out figure says this version is any good.
            decision = {
                "promoted": False,
                "reason": "no held-out figures: it was evaluated on no held-out pairs, so nothing shows "
                "it is any good (a manager can still activate it by hand)",
                "holdout_pairs": int((version.metrics or {}).get("holdout_pairs") or 0),
                "challenger": _brief(challenger_figs, version),
                **({"champion_version": champion.number} if champion is not None else {}),
            }
        elif champion is None:
            decision = {
                "promoted": True,
                "reason": "no active model yet",
                "challenger": _brief(challenger_figs, version),
            }
        elif split is None or split.holdout.num_pairs == 0:
            decision = {
                "promoted": False,
                "reason": "no held-out pairs to compare on",
                "champion_version": champion.number,
            }
        else:
            champ_model = version_model_load(champion)
            held = split.holdout
            form = version_embedding_input(champion)
            if champion.encoder_id != version.encoder_id or form != version_embedding_input(version):
                embeddings_ensure(
                    encoder=champion.encoder,
                    sample_ids=split.sample_ids,
                    frames=version.job.video_frames,
                    input=form,
                )
                x, mask, prompt = features_load(
                    encoder=champion.encoder, sample_ids=split.sample_ids, input=form
                )
                held = PairSet(
                    x=x,
                    mask=mask,
                    prompt=prompt,
                    a=held.a,
                    b=held.b,
                    outcome=held.outcome,
                    weight=held.weight,
                    aspects=held.aspects,
                    comparison=held.comparison,
                )
            champion_figs = metrics.evaluate(champ_model, held)
            promoted = _better(challenger_figs, champion_figs)
            decision = {
                "promoted": promoted,
                "reason": "beats the active model on the same held-out pairs"
                if promoted
                else "does not beat the active model on the same held-out pairs",
                "pairs": int(held.num_pairs),
                "challenger": _brief(challenger_figs, version),
                "champion": _brief(champion_figs, champion),
            }
        if decision["promoted"]:
            RewardModelVersion.objects.filter(project=project, is_active=True).update(is_active=False)
            version.is_active = True
        version.decision = decision
        version.save(update_fields=["is_active", "decision"])
    return version


def _brief(figs: dict[str, Any], version: RewardModelVersion) -> dict[str, Any]:
    return {"version": version.number, **{k: figs.get(k) for k in ("accuracy", "log_loss", "ece", "pairs")}}


def version_activate(*, version: RewardModelVersion, actor: Any) -> RewardModelVersion:
    """Make ``version`` the active model by hand (managers only), e.g. to roll back."""
    member_role_require(project=version.project, user=actor, roles=(ProjectMember.Role.MANAGER,))
    if version.kind not in ACTIVE_KINDS:
        raise Invalid(f"a {version.kind} model cannot be the project's reward model")
    with transaction.atomic():
        Project.objects.select_for_update().filter(id=version.project_id).first()
        RewardModelVersion.objects.filter(project_id=version.project_id, is_active=True).update(
            is_active=False
        )
        version.is_active = True
        version.decision = {
            **(version.decision or {}),
            "activated_by": actor.username,
            "activated_at": timezone.now().isoformat(),
        }
        version.save(update_fields=["is_active", "decision"])

        # With the broker down the activation stands: beat's scores_refresh queues the scoring of
        # the active version's unscored samples once the broker is back.
        task_dispatch(tasks.gpu_score_samples, version.id, undo=None)
    return version
