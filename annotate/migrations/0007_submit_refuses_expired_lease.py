"""``rl_submit`` refuses a lease past its ``expires_at`` at submit time, not only once the beat sweep
(``leases_expire``, every 30 s) has marked it expired.

Until the sweep ran, a lease past its expiry was still ``active`` and a submit on it was stored,
although its slot could already have been counted as free by the time the sweep came. Now the
submit expires it itself, as the sweep would (status ``expired``, its slot returned to the
comparison), and answers 409 ``lease_expired``. That refusal cannot be an exception (it would
roll back the expiry with it), so the function returns ``judgment_id`` NULL with the error as
``body``, and ``services.labeling_submit`` raises the ``Conflict``. The rest of the function is
0005's, unchanged.
"""

import importlib
from typing import Any

from django.db import migrations

SQL = r"""
-- As in 0005, plus: an active lease past its expires_at is expired (slot returned) and refused with
-- judgment_id NULL and body {"error": {"code": "lease_expired", ...}}.
CREATE OR REPLACE FUNCTION rl_submit(p_slug text, p_user integer, p_staff boolean,
    p_assignment bigint, p_choice text, p_ranking jsonb, p_aspects jsonb, p_rationale text,
    p_artifacts jsonb, p_time_spent integer, p_key text, p_source text, p_now timestamptz,
    p_next integer, OUT created boolean, OUT judgment_id bigint, OUT body json)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    e record;
    v_holder integer;
    v_status text;
    v_display jsonb;
    v_comparison bigint;
    v_canonical bigint[];
    v_shown bigint[];
    v_rank bigint[];
    v_outcome text;
    v_winner bigint;
    v_aspects jsonb := '{}'::jsonb;
    v_prior record;
    v_known text[];
    v_unknown text[];
    v_key text;
    v_value text;
    v_bad bigint;
    v_ids bigint[];
    v_next json;
    v_expires timestamptz;
BEGIN
    SELECT * INTO e FROM rl_enter(p_slug, p_user, p_staff);
    SELECT a.annotator_id, a.status, a.display_order, a.comparison_id, a.expires_at
      INTO v_holder, v_status, v_display, v_comparison, v_expires
      FROM annotate_assignment a WHERE a.id = p_assignment AND a.project_id = e.project_id;
    IF NOT FOUND THEN
        PERFORM rl_fail('RL404', 'not_found', format('no lease %s in project %s', p_assignment, p_slug));
    END IF;
    IF v_holder <> p_user THEN
        PERFORM rl_fail('RL403', 'not_your_lease', 'this comparison is not leased to you');
    END IF;
    created := false;
    IF v_status = 'done' THEN
        SELECT j.id, j.idempotency_key INTO v_prior FROM annotate_judgment j WHERE j.assignment_id = p_assignment;
        IF v_prior.id IS NULL OR p_key = '' OR v_prior.idempotency_key <> p_key THEN
            PERFORM rl_fail('RL409', 'already_judged', 'you already judged this comparison');
        END IF;
        judgment_id := v_prior.id;
    ELSIF v_status <> 'active' THEN
        PERFORM rl_fail('RL409', 'lease_released',
            format('this lease was %s; fetch a new comparison', v_status));
    ELSIF v_expires <= p_now THEN
        -- Past its expiry but not swept yet: expire it here as leases_expire would (its slot goes
        -- back to the pool) and refuse. Not an exception: that would undo the expiry too; the
        -- caller raises the 409 from the NULL judgment_id. If the sweep got there first, it
        -- already returned the slot.
        UPDATE annotate_assignment SET status = 'expired', finished_at = p_now
         WHERE annotate_assignment.id = p_assignment AND annotate_assignment.status = 'active';
        IF FOUND THEN
            UPDATE annotate_comparison SET slots_taken = slots_taken - 1
             WHERE annotate_comparison.id = v_comparison;
        END IF;
        created := false;
        judgment_id := NULL;
        body := json_build_object('error', json_build_object('code', 'lease_expired',
            'message', 'this lease expired; fetch a new comparison', 'details', '{}'::json));
        RETURN;
    ELSE
        v_canonical := ARRAY(SELECT cs.sample_id FROM annotate_comparisonsample cs
                              WHERE cs.comparison_id = v_comparison ORDER BY cs.position);
        v_shown := ARRAY(SELECT x.v::bigint FROM jsonb_array_elements_text(v_display) WITH ORDINALITY x(v, i)
                          ORDER BY x.i);
        IF e.mode = 'ranking' THEN
            IF p_ranking IS NULL THEN
                PERFORM rl_fail('RL400', 'invalid', 'this project wants a full ''ranking'' (sample ids, best first)');
            END IF;
            v_rank := ARRAY(SELECT x.v::bigint FROM jsonb_array_elements_text(p_ranking) WITH ORDINALITY x(v, i)
                             ORDER BY x.i);
            IF ARRAY(SELECT u FROM unnest(v_rank) u ORDER BY u)
               IS DISTINCT FROM ARRAY(SELECT u FROM unnest(v_canonical) u ORDER BY u) THEN
                PERFORM rl_fail('RL400', 'invalid', 'ranking must list each sample of the comparison exactly once');
            END IF;
            v_outcome := 'ranking';
            v_winner := v_rank[1];
        ELSE
            IF p_ranking IS NOT NULL THEN
                PERFORM rl_fail('RL400', 'invalid', 'this is a pairwise project: send ''choice'', not ''ranking''');
            END IF;
            SELECT m.outcome, m.winner INTO v_outcome, v_winner
              FROM rl_map_choice(p_choice, 'choice', v_canonical, v_shown, e.allow_tie, e.allow_both_bad) m;
        END IF;
        IF p_aspects IS NOT NULL AND p_aspects <> '{}'::jsonb THEN
            v_known := ARRAY(SELECT x->>'key' FROM jsonb_array_elements(e.aspects) x
                               ORDER BY (x->>'key') COLLATE "C");
            v_unknown := ARRAY(SELECT k FROM jsonb_object_keys(p_aspects) k
                                WHERE k <> ALL(v_known) ORDER BY k COLLATE "C");
            IF cardinality(v_unknown) > 0 THEN
                PERFORM rl_fail('RL400', 'invalid', format('unknown aspects [%s]; this project has [%s]',
                    (SELECT string_agg(quote_literal(u), ', ' ORDER BY ord) FROM unnest(v_unknown) WITH ORDINALITY t(u, ord)),
                    COALESCE((SELECT string_agg(quote_literal(k), ', ' ORDER BY ord)
                                FROM unnest(v_known) WITH ORDINALITY t(k, ord)), '')));
            END IF;
            IF e.mode <> 'pairwise' THEN
                PERFORM rl_fail('RL400', 'invalid', 'per-aspect outcomes are for pairwise projects');
            END IF;
            FOR v_key, v_value IN SELECT k, v FROM jsonb_each_text(p_aspects) x(k, v) LOOP
                v_aspects := v_aspects || jsonb_build_object(v_key,
                    (rl_map_choice(v_value, format('aspect %L', v_key), v_canonical, v_shown,
                                   e.allow_tie, e.allow_both_bad)).outcome);
            END LOOP;
        END IF;
        SELECT x.i - 1 INTO v_bad
          FROM jsonb_array_elements(COALESCE(p_artifacts, '[]'::jsonb)) WITH ORDINALITY x(v, i)
         WHERE NOT ((x.v->>'sample')::bigint = ANY(v_canonical))
         ORDER BY x.i LIMIT 1;
        IF v_bad IS NOT NULL THEN
            PERFORM rl_fail('RL400', 'invalid',
                format('artifact %s: ''sample'' must be one of the comparison''s samples', v_bad));
        END IF;
        INSERT INTO annotate_judgment (project_id, comparison_id, annotator_id, assignment_id, outcome,
            winner_id, ranking, aspects, rationale, artifacts, displayed_order, time_spent_ms,
            idempotency_key, source, created_at)
        VALUES (e.project_id, v_comparison, p_user, p_assignment, v_outcome, v_winner,
            CASE WHEN v_outcome = 'ranking' THEN to_jsonb(v_rank) END, v_aspects, p_rationale,
            COALESCE(p_artifacts, '[]'::jsonb), to_jsonb(v_shown), p_time_spent, p_key, p_source, p_now)
        ON CONFLICT (annotator_id, idempotency_key) WHERE NOT (idempotency_key = '') DO NOTHING
        RETURNING annotate_judgment.id INTO judgment_id;
        IF judgment_id IS NULL THEN
            -- The idempotency key was used before, on another lease: nothing was written.
            SELECT j.id, j.assignment_id INTO v_prior
              FROM annotate_judgment j WHERE j.annotator_id = p_user AND j.idempotency_key = p_key;
            IF v_prior.assignment_id IS NOT NULL AND v_prior.assignment_id <> p_assignment THEN
                PERFORM rl_fail('RL409', 'idempotency_key_reused',
                    'this idempotency key was already used for another lease');
            END IF;
            judgment_id := v_prior.id;
        ELSE
            created := true;
            -- No row lock was taken on the lease when it was read: this update takes it, and if the
            -- lease meanwhile expired (lease expiry runs concurrently), the error undoes the insert.
            UPDATE annotate_assignment SET status = 'done', finished_at = p_now
             WHERE annotate_assignment.id = p_assignment AND annotate_assignment.status = 'active';
            IF NOT FOUND THEN
                PERFORM rl_fail('RL409', 'lease_released', format('this lease was %s; fetch a new comparison',
                    (SELECT a.status FROM annotate_assignment a WHERE a.id = p_assignment)));
            END IF;
            UPDATE annotate_comparison SET judgments_count = judgments_count + 1,
                status = CASE WHEN judgments_count + 1 >= overlap AND status = 'open' THEN 'complete' ELSE status END
             WHERE annotate_comparison.id = v_comparison;
        END IF;
    END IF;
    IF p_next > 0 THEN
        -- Two statements: the payload must see the leases just inserted (a later snapshot).
        v_ids := ARRAY(
            SELECT l.id FROM rl_leases(e.project_id, p_user, p_next, p_now, e.lease_seconds, e.paused)
                   WITH ORDINALITY l ORDER BY l.ordinality);
        v_next := rl_payload(e.project_id, v_ids);
        body := json_build_object('judgment', rl_judgment_json(judgment_id), 'next', v_next);
    ELSE
        body := json_build_object('judgment', rl_judgment_json(judgment_id));
    END IF;
END $$;
"""


def _restore_0005(apps: Any, schema_editor: Any) -> None:
    # Back to 0005's rl_submit: re-run that migration's (idempotent) CREATE OR REPLACE statements.
    previous = importlib.import_module("annotate.migrations.0005_labeling_functions")
    schema_editor.execute(previous.SQL, params=None)  # None: its % signs are not placeholders


class Migration(migrations.Migration):
    dependencies = [("annotate", "0006_drop_redundant_fk_indexes")]

    operations = [
        migrations.RunSQL(sql=SQL, reverse_sql=migrations.RunSQL.noop),
        migrations.RunPython(migrations.RunPython.noop, reverse_code=_restore_0005),
    ]
