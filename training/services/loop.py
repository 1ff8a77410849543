"""The closed loop, one project at a time: a beat tick (``loop_tick``) advances the project's open
round by at most one state:

    waiting_for_labels -> reward_training -> rl -> sampling -> awaiting_verdicts -> evaluated | flagged

1. **waiting_for_labels**: when ``retrain_after`` new judgments arrived since the last round's
   reward job was launched (the last round's verdicts count), a reward job is launched (rewards'
   champion/challenger decides whether its version is promoted).
2. **reward_training**: when it ends, an RL job is launched on the project's active reward model
   (the new version if it was promoted, else the champion), with feedback. It continues the adapter
   of the last good round (``last_good_round``: evaluated, and people preferred it), which is the
   round's incumbent; without one it starts a fresh adapter on the base model, the incumbent.
3. **rl**: when it ends, its feedback sampling job (the new version's outputs against the
   incumbent's on the same prompts and seeds) is the round's.
4. **sampling**: when the comparisons are queued, the round waits for people.
5. **awaiting_verdicts**: with ``verdicts_needed`` verdicts on new-vs-incumbent comparisons (served
   first, in an order fair to every prompt, which active learning leaves alone until then), the
   round is evaluated: the reward model's predicted win rate of the new version next to the human
   win rate (ties half) and its 95% Wilson interval. The **guard** flags reward hacking when the
   human rate falls short of the predicted one by more than ``guard_margin`` or its interval lies
   below 1/2; the loop then stops and says why, and the incumbent stays.

Every transition is claimed with a conditional update (``filter(id=..., state=old).update(...)``)
inside the transaction that launches the next job, so two ticks never advance a round twice and a
refused launch leaves the round where it was. A paused loop is left exactly where it is.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from django.db import IntegrityError, transaction
from django.utils import timezone

from annotate.errors import Invalid, NotFound, ServiceError
from annotate.models import Comparison, Judgment, ProjectMember
from annotate.selectors import member_role_require
from annotate.services import comparison_priorities_release
from rewards.models import RewardModelVersion, RewardTrainingJob
from training.algorithms import ALGORITHMS
from training.models import LoopConfig, LoopRound, SamplingJob

log = logging.getLogger(__name__)
State = LoopRound.State
DONE = ("succeeded",)
ENDED_BADLY = ("failed", "cancelled")


# --- Settings ----------------------------------------------------------------------------------
def loop_config_set(
    *,
    project: Any,
    actor: Any,
    algorithm: str,
    rl_config: dict[str, Any],
    feedback: dict[str, Any] | None = None,
    reward_kind: str = "bt",
    reward_hyperparameters: dict[str, Any] | None = None,
    encoder_path: str = "",
    retrain_after: int = 50,
    verdicts_needed: int = 20,
    guard_margin: float = 0.15,
    max_rounds: int = 10,
    enabled: bool = True,
) -> LoopConfig:
    """Set (and by default switch on) a project's loop. Managers only; every setting is checked
    as an RL launch would check it (algorithm, modality, config, model directory, feedback), with
    nothing stored on a refusal."""
    from rewards.ml.names import KINDS as REWARD_KINDS
    from training.services.jobs import feedback_check, launch_config_check

    member_role_require(project=project, user=actor, roles=(ProjectMember.Role.MANAGER,))
    algo = ALGORITHMS.get(algorithm)
    if algo is None or not algo.online:
        online = ", ".join(a.name for a in ALGORITHMS.values() if a.online)
        raise Invalid(f"algorithm: the loop runs an online algorithm: {online}", code="bad_algorithm")
    resolved = launch_config_check(project=project, algo=algo, config=rl_config, field="rl_config")
    checked_feedback = feedback_check(project, feedback or {})
    if reward_kind not in REWARD_KINDS or reward_kind == "artifact":
        raise Invalid("reward_kind: a reward model kind (not an artifact classifier)", code="bad_config")
    limits = (
        ("retrain_after", retrain_after, 1, 1_000_000),
        ("verdicts_needed", verdicts_needed, 1, 100_000),
        ("max_rounds", max_rounds, 1, 1000),
    )
    for name, value, low, high in limits:
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise Invalid(f"{name} must be an integer {low}..{high}", code="bad_config")
    if not isinstance(guard_margin, int | float) or not 0.0 <= float(guard_margin) <= 1.0:
        raise Invalid("guard_margin must be a number in [0, 1]", code="bad_config")
    defaults: dict[str, Any] = {
        "enabled": enabled,
        "algorithm": algorithm,
        "rl_config": resolved.to_dict(),
        "feedback": checked_feedback,
        "reward_kind": reward_kind,
        "reward_hyperparameters": dict(reward_hyperparameters or {}),
        "encoder_path": encoder_path,
        "retrain_after": retrain_after,
        "verdicts_needed": verdicts_needed,
        "guard_margin": float(guard_margin),
        "max_rounds": max_rounds,
        "owner": actor,
    }
    if enabled:  # switched on again: the last stop's reason is history
        defaults["stopped_reason"] = ""
    config, _ = LoopConfig.objects.update_or_create(project=project, defaults=defaults)
    return config


def loop_pause(*, project: Any, actor: Any, paused: bool = True) -> LoopConfig:
    """Pause (or resume) a project's loop where it is: the open round keeps its state and its jobs
    run on; the tick just does not advance it until resumed."""
    member_role_require(project=project, user=actor, roles=(ProjectMember.Role.MANAGER,))
    config = LoopConfig.objects.filter(project=project).first()
    if config is None:
        raise NotFound(f"project {project.slug} has no loop")
    LoopConfig.objects.filter(id=config.id).update(paused=paused, updated_at=timezone.now())
    config.refresh_from_db()
    return config


# --- The tick ----------------------------------------------------------------------------------
def _move(r: LoopRound, old: str, new: str, **fields: Any) -> bool:
    """Claim ``old -> new`` for round ``r``; False when another tick got there first."""
    history = [*r.history, {"state": new, "at": timezone.now().isoformat()}]
    finished = {"finished_at": timezone.now()} if new not in LoopRound.OPEN else {}
    n = LoopRound.objects.filter(id=r.id, state=old).update(state=new, history=history, **finished, **fields)
    r.refresh_from_db()  # moved by us, or by the tick that got there first
    return n == 1


def _stop(config: LoopConfig, reason: str) -> None:
    LoopConfig.objects.filter(id=config.id).update(
        enabled=False, stopped_reason=reason, updated_at=timezone.now()
    )


def _fail(config: LoopConfig, r: LoopRound, old: str, reason: str) -> LoopRound:
    if _move(r, old, State.FAILED, reason=reason):
        _stop(config, f"round {r.number} failed: {reason}")
    return r


def loop_tick(*, project_id: int, dispatch: bool = True) -> LoopRound | None:
    """Advance the project's loop by at most one step (see the module docstring). Returns the
    round it looked at, or None when the loop is off, paused or done."""
    config = (
        LoopConfig.objects.filter(project_id=project_id, enabled=True, paused=False)
        .select_related("project", "owner")
        .first()
    )
    if config is None:
        return None
    r = LoopRound.objects.filter(project_id=project_id, state__in=LoopRound.OPEN).first()
    if r is None:
        return _round_start(config)
    step = {
        State.WAITING_FOR_LABELS: _waiting_for_labels,
        State.REWARD_TRAINING: _reward_training,
        State.RL: _rl,
        State.SAMPLING: _sampling,
        State.AWAITING_VERDICTS: _awaiting_verdicts,
    }[LoopRound.State(r.state)]
    return step(config, r, dispatch)


def _round_start(config: LoopConfig) -> LoopRound | None:
    project = config.project
    last = LoopRound.objects.filter(project=project).order_by("-number").first()
    if last is not None and last.number >= config.max_rounds:
        _stop(config, f"done: {config.max_rounds} rounds")
        return None
    try:
        with transaction.atomic():
            return LoopRound.objects.create(
                project=project,
                number=(last.number + 1) if last else 1,
                judgments_at_start=_labels_seen(project, last),
                history=[{"state": State.WAITING_FOR_LABELS, "at": timezone.now().isoformat()}],
            )
    except IntegrityError:  # another tick started it (the one-open-round constraint)
        return LoopRound.objects.filter(project=project, state__in=LoopRound.OPEN).first()


def _labels_seen(project: Any, last: LoopRound | None) -> int:
    """The judgments the last reward model could have learned from: those made before the last
    round's reward job was launched. Everything after, the last round's verdicts on its new
    version included, is new to the next one; so the verdicts feed the next round, and a loop
    whose annotators judged everything in sight does not wait for labels that cannot come."""
    judgments = Judgment.objects.filter(project=project)
    if last is not None and last.reward_job is not None:
        judgments = judgments.filter(created_at__lt=last.reward_job.created_at)
    return judgments.count()


def _waiting_for_labels(config: LoopConfig, r: LoopRound, dispatch: bool) -> LoopRound:
    from rewards.services import reward_job_create

    new = Judgment.objects.filter(project=config.project).count() - r.judgments_at_start
    if new < config.retrain_after:
        LoopRound.objects.filter(id=r.id).update(reason=f"{new} of {config.retrain_after} new judgments")
        r.refresh_from_db()
        return r
    try:
        with transaction.atomic():
            if not _move(r, State.WAITING_FOR_LABELS, State.REWARD_TRAINING, reason=""):
                return r
            job = reward_job_create(
                project=config.project,
                actor=config.owner,
                kind=config.reward_kind,
                encoder_path=config.encoder_path or None,
                hyperparameters=config.reward_hyperparameters,
                trigger=RewardTrainingJob.Trigger.AUTO,
                dispatch=dispatch,
            )
            LoopRound.objects.filter(id=r.id).update(reward_job=job)
    except ServiceError as exc:  # not enough pairs yet, say: the round waits, saying why
        LoopRound.objects.filter(id=r.id).update(reason=f"reward training not launched: {exc.message}")
    r.refresh_from_db()
    return r


def last_good_round(project: Any) -> LoopRound | None:
    """The round the next one builds on (its adapter continued, its version the incumbent): the
    last evaluated round that people preferred to its incumbent (human win rate at least 1/2). A
    round the guard let pass with people against it (an interval still reaching 1/2) is not built
    on; None: start from the base model."""
    return (
        LoopRound.objects.filter(
            project=project, state=State.EVALUATED, new_version__isnull=False, human_win_rate__gte=0.5
        )
        .select_related("new_version")
        .order_by("-number")
        .first()
    )


def _reward_training(config: LoopConfig, r: LoopRound, dispatch: bool) -> LoopRound:
    from training.services.jobs import rl_job_create

    job = r.reward_job
    if job is None:
        return _fail(config, r, State.REWARD_TRAINING, "its reward job was deleted")
    if job.status in ENDED_BADLY:
        return _fail(config, r, State.REWARD_TRAINING, f"reward job {job.id} {job.status}: {job.error}")
    if job.status not in DONE:
        return r
    active = RewardModelVersion.objects.filter(project=config.project, is_active=True).first()
    if active is None:
        return _fail(config, r, State.REWARD_TRAINING, "no active reward model after training")
    last_good = last_good_round(config.project)
    start = last_good.new_version if last_good is not None else None
    try:
        with transaction.atomic():
            if not _move(r, State.REWARD_TRAINING, State.RL, reason=f"RL on reward model v{active.number}"):
                return r
            rl = rl_job_create(
                project=config.project,
                actor=config.owner,
                algorithm=config.algorithm,
                config=_round_rl_config(config, r),
                feedback=config.feedback,
                reward={"version": active.number},
                start_version=start,
                dispatch=dispatch,
            )
            LoopRound.objects.filter(id=r.id).update(rl_job=rl, incumbent=rl.start_version or rl.base_version)
    except ServiceError as exc:
        r.refresh_from_db()
        return _fail(config, r, State.REWARD_TRAINING, f"RL job refused: {exc.message}")
    r.refresh_from_db()
    return r


def _round_rl_config(config: LoopConfig, r: LoopRound) -> dict[str, Any]:
    """The RL settings of round ``r``: the loop's, with the seed moved on by the round number. A
    round that starts from the same adapter and reward model as an earlier one (the earlier round
    was not built on, and no better reward model was promoted) would otherwise replay it sample for
    sample and come back with the very same version."""
    rl = dict(config.rl_config)
    rl["seed"] = int(rl.get("seed") or 0) + r.number - 1
    return rl


def _rl(config: LoopConfig, r: LoopRound, dispatch: bool) -> LoopRound:
    job = r.rl_job
    if job is None:
        return _fail(config, r, State.RL, "its RL job was deleted")
    if job.status in ENDED_BADLY:
        return _fail(config, r, State.RL, f"RL job {job.id} {job.status}: {job.error}")
    if job.status not in DONE:
        return r
    sampling = SamplingJob.objects.filter(rl_job=job).order_by("-id").first()
    if sampling is None:
        return _fail(
            config, r, State.RL, f"RL job {job.id} queued no feedback: {job.error or 'no checkpoint'}"
        )
    kls = [m["kl"] for m in job.metrics if isinstance(m.get("kl"), int | float)]
    _move(
        r, State.RL, State.SAMPLING, sampling_job=sampling, new_version=sampling.version,
        incumbent=sampling.incumbent, kl=float(kls[-1]) if kls else None,
    )  # fmt: skip
    return r


def _sampling(config: LoopConfig, r: LoopRound, dispatch: bool) -> LoopRound:
    job = r.sampling_job
    if job is None:
        return _fail(config, r, State.SAMPLING, "its sampling job was deleted")
    if job.status == SamplingJob.Status.FAILED:
        return _fail(config, r, State.SAMPLING, f"sampling job {job.id} failed: {job.error}")
    if job.status == SamplingJob.Status.SUCCEEDED:
        _move(r, State.SAMPLING, State.AWAITING_VERDICTS)
    return r


def round_verdicts(r: LoopRound) -> tuple[list[float], list[tuple[int, int]]]:
    """The human scores of the new version on the round's new-vs-incumbent comparisons (1 a win,
    1/2 a tie, 0 a loss; "both bad" says nothing and is left out) and those comparisons as
    (new sample, incumbent sample) pairs."""
    job = r.sampling_job
    if job is None:
        return [], []
    new = {int(s) for _, _, s in (job.outputs or {}).get("new", [])}
    old = {int(s) for _, _, s in (job.outputs or {}).get("incumbent", [])}
    pairs: dict[int, tuple[int, int]] = {}
    comps = Comparison.objects.filter(project_id=r.project_id, origin="loop", origin_round=job.round)
    for cid, sid in comps.values_list("id", "samples__id"):
        pairs.setdefault(cid, (0, 0))
        a, b = pairs[cid]
        if sid in new:
            pairs[cid] = (sid, b)
        elif sid in old:
            pairs[cid] = (a, sid)
    versus = {cid: p for cid, p in pairs.items() if p[0] and p[1]}
    scores = []
    for cid, outcome, winner in Judgment.objects.filter(comparison_id__in=list(versus)).values_list(
        "comparison_id", "outcome", "winner_id"
    ):
        if outcome == "tie":
            scores.append(0.5)
        elif outcome in ("a", "b") and winner is not None:
            scores.append(1.0 if winner == versus[cid][0] else 0.0)
    return scores, list(versus.values())


def wilson_interval(score: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a rate ``score / n`` (ties count half)."""
    if n == 0:
        return 0.0, 1.0
    p = score / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def predicted_win_rate(version: RewardModelVersion, pairs: list[tuple[int, int]]) -> float | None:
    """The reward model's mean P(new beats incumbent) over the pairs (Bradley-Terry on its scores)."""
    from rewards.models import SampleScore
    from rewards.services.scoring import version_score_samples

    if not pairs:
        return None
    version_score_samples(version_id=version.id, only_new=True)
    ids = {s for pair in pairs for s in pair}
    reward = dict(
        SampleScore.objects.filter(version=version, sample_id__in=ids).values_list("sample_id", "reward")
    )
    probs = [1 / (1 + math.exp(-(reward[a] - reward[b]))) for a, b in pairs if a in reward and b in reward]
    return sum(probs) / len(probs) if probs else None


def _awaiting_verdicts(config: LoopConfig, r: LoopRound, dispatch: bool) -> LoopRound:
    scores, pairs = round_verdicts(r)
    LoopRound.objects.filter(id=r.id).update(verdicts=len(scores))
    if len(scores) < config.verdicts_needed:
        r.refresh_from_db()
        return r
    human = sum(scores) / len(scores)
    low, high = wilson_interval(sum(scores), len(scores))
    version = r.rl_job.reward_version if r.rl_job else None
    predicted = predicted_win_rate(version, pairs) if version is not None else None
    fields = {
        "human_win_rate": human,
        "human_ci_low": low,
        "human_ci_high": high,
        "predicted_win_rate": predicted,
    }
    hacked = []
    if predicted is not None and human < predicted - config.guard_margin:
        hacked.append(
            f"people preferred the new version {human:.0%} of the time, the reward model predicted "
            f"{predicted:.0%} (margin {config.guard_margin:.0%})"
        )
    if high < 0.5:
        hacked.append(f"the human win rate's 95% interval ({low:.0%}-{high:.0%}) lies below 50%")
    if hacked:
        reason = "reward hacking suspected: " + "; ".join(hacked) + ". The incumbent stays; the loop stopped."
        if _move(r, State.AWAITING_VERDICTS, State.FLAGGED, reason=reason, **fields):
            _stop(config, f"round {r.number} flagged: {reason}")
            _versus_release(r)
        return r
    if _move(
        r, State.AWAITING_VERDICTS, State.EVALUATED,
        reason=f"people preferred the new version {human:.0%} of the time ({low:.0%}-{high:.0%})", **fields,
    ):  # fmt: skip
        _versus_release(r)
    return r


def _versus_release(r: LoopRound) -> None:
    """With its verdicts in, the round's versus comparisons still open go back to active learning
    (they were served first, in a fixed order fair to every prompt: ``sampling._versus_order``)."""
    job = r.sampling_job
    if job is None:
        return
    ids = Comparison.objects.filter(
        project_id=r.project_id, origin=Comparison.Origin.LOOP, origin_round=job.round, priority_fixed=True
    ).values_list("id", flat=True)
    comparison_priorities_release(project_id=r.project_id, comparison_ids=list(ids))


def loop_tick_all(*, dispatch: bool = True) -> list[int]:
    """One tick for every project whose loop is on (the beat task); returns the rounds looked at."""
    seen = []
    for project_id in LoopConfig.objects.filter(enabled=True, paused=False).values_list(
        "project_id", flat=True
    ):
        try:
            r = loop_tick(project_id=project_id, dispatch=dispatch)
        except Exception:  # one project's trouble must not stall the others' loops
            log.exception("loop tick of project %s failed; the next tick tries again", project_id)
            continue
        if r is not None:
            seen.append(r.id)
    return seen


__all__ = [
    "loop_config_set",
    "loop_pause",
    "loop_tick",
    "loop_tick_all",
    "predicted_win_rate",
    "round_verdicts",
    "wilson_interval",
]
