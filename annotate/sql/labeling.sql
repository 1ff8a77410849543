-- The labeling hot path: PostgreSQL functions behind `next` and `submit (+ next)`.
--
-- This file is the source. Migrations never read it: each migration that changes these functions
-- loads its own frozen copy (annotate/migrations/sql/<migration>.sql), so an old migration replays the
-- functions as they were. To change a function: edit this file, copy it to
-- annotate/migrations/sql/<new migration>.sql and add a migration that runs that copy (see 0009).
-- tests/annotate/test_labeling_sql.py checks that the installed functions equal this file.
--
-- Entry points run with plan_cache_mode = force_generic_plan (planned once per connection).
-- Errors: SQLSTATE RL400/RL403/RL404/RL409 (the HTTP status), MESSAGE the message, HINT the API code;
-- a raised error rolls back the whole statement.
CREATE OR REPLACE FUNCTION rl_fail(p_state text, p_code text, p_message text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = p_state, MESSAGE = p_message, HINT = p_code;
END $$;

-- The project and the caller's membership, then a transaction-scoped advisory lock on (project,
-- caller) held to the end of the transaction: it serialises one annotator's requests in a project
-- (two tabs, parallel prefetches) so that they agree on the leases held. An advisory lock lives in
-- memory; a row lock on the membership would write the row and WAL at every request. Statements
-- after this one take fresh snapshots, so they see what the request before committed.
-- Non-members get 404, as if the project did not exist; staff act without a membership.
CREATE OR REPLACE FUNCTION rl_enter(p_slug text, p_user integer, p_staff boolean,
    OUT project_id bigint, OUT allow_tie boolean, OUT allow_both_bad boolean, OUT aspects jsonb,
    OUT mode text, OUT lease_seconds integer, OUT paused boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_role text;
BEGIN
    SELECT p.id, p.allow_tie, p.allow_both_bad, p.aspects, p.mode, p.lease_seconds, m.role, m.paused
      INTO project_id, allow_tie, allow_both_bad, aspects, mode, lease_seconds, v_role, paused
      FROM annotate_project p
      LEFT JOIN annotate_projectmember m ON m.project_id = p.id AND m.user_id = p_user
     WHERE p.slug = p_slug;
    IF NOT FOUND OR (v_role IS NULL AND NOT p_staff) THEN
        PERFORM rl_fail('RL404', 'not_found', format('no project %L', p_slug));
    END IF;
    IF v_role IS NOT NULL AND v_role NOT IN ('manager', 'annotator') THEN
        PERFORM rl_fail('RL403', 'forbidden',
            format('this needs the manager or annotator role in %s', p_slug));
    END IF;
    paused := COALESCE(paused, false);
    PERFORM pg_advisory_xact_lock((rl_enter.project_id % 2147483648)::integer, p_user);
END $$;

-- The caller's unexpired active leases (oldest first), then new ones to make p_n. SKIP LOCKED
-- passes over comparisons other annotators are taking right now; a pick can come back short
-- when a row changed under it, so it looks again (twice at most), each look a fresh snapshot.
-- The display order is shuffled per lease and stored with it. Rows come out in the order to show:
-- held ones oldest first, then new ones by id (callers keep it WITH ORDINALITY).
CREATE OR REPLACE FUNCTION rl_leases(p_project bigint, p_user integer, p_n integer,
    p_now timestamptz, p_lease_seconds integer, p_paused boolean)
RETURNS TABLE (fresh boolean, id bigint, comparison_id bigint, display_order jsonb,
               leased_at timestamptz, expires_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    v_need integer;
    v_got integer;
BEGIN
    IF p_n < 1 OR p_n > 20 THEN
        PERFORM rl_fail('RL400', 'invalid', 'n must be between 1 and 20');
    END IF;
    RETURN QUERY
        SELECT false, a.id, a.comparison_id, a.display_order, a.leased_at, a.expires_at
        FROM annotate_assignment a
        WHERE a.project_id = p_project AND a.annotator_id = p_user AND a.status = 'active'
          AND a.expires_at > p_now
        ORDER BY a.leased_at, a.id
        LIMIT p_n;
    GET DIAGNOSTICS v_got = ROW_COUNT;
    v_need := p_n - v_got;
    FOR attempt IN 1..3 LOOP
        EXIT WHEN v_need <= 0 OR p_paused;
        RETURN QUERY
            WITH picked AS (
                SELECT c.id, c.priority FROM annotate_comparison c
                WHERE c.project_id = p_project AND c.status = 'open' AND c.slots_taken < c.overlap
                  AND NOT EXISTS (SELECT 1 FROM annotate_assignment x
                                  WHERE x.comparison_id = c.id AND x.annotator_id = p_user)
                ORDER BY c.priority DESC, c.id
                LIMIT v_need
                FOR UPDATE OF c SKIP LOCKED
            ), bumped AS (
                UPDATE annotate_comparison c SET slots_taken = c.slots_taken + 1
                WHERE c.id = ANY(ARRAY(SELECT picked.id FROM picked))
                RETURNING c.id, c.priority
            ), leased AS (
                INSERT INTO annotate_assignment
                    (project_id, comparison_id, annotator_id, status, display_order, leased_at, expires_at)
                SELECT p_project, b.id, p_user, 'active',
                    (SELECT jsonb_agg(cs.sample_id ORDER BY random()) FROM annotate_comparisonsample cs
                      WHERE cs.comparison_id = b.id),
                    p_now, p_now + make_interval(secs => p_lease_seconds)
                FROM bumped b
                ORDER BY b.priority DESC, b.id
                RETURNING annotate_assignment.id, annotate_assignment.comparison_id,
                    annotate_assignment.display_order, annotate_assignment.leased_at,
                    annotate_assignment.expires_at
            )
            SELECT true, l.id, l.comparison_id, l.display_order, l.leased_at, l.expires_at FROM leased l
            ORDER BY l.id;
        GET DIAGNOSTICS v_got = ROW_COUNT;
        v_need := v_need - v_got;
    END LOOP;
END $$;

-- What the labeling page needs to show leases: samples in displayed order, the prompt (a
-- comparison's samples share its prompt), the project's options. Leases in the order given.
-- PL/pgSQL rather than SQL for its plan cache: a SQL function's query is planned at every call.
CREATE OR REPLACE FUNCTION rl_payload(p_project bigint, p_leases bigint[]) RETURNS json
LANGUAGE plpgsql STABLE SET plan_cache_mode = force_generic_plan AS $$
BEGIN
    RETURN (SELECT json_build_object(
        'items', COALESCE((
            SELECT json_agg(json_build_object(
                'assignment', a.id,
                'comparison', a.comparison_id,
                'expires_at', a.expires_at,
                'prompt', (SELECT json_build_object('id', pr.id, 'text', pr.text)
                             FROM annotate_sample s0 JOIN annotate_prompt pr ON pr.id = s0.prompt_id
                            WHERE s0.id = (a.display_order->>0)::bigint),
                'samples', (SELECT json_agg(json_build_object(
                                'id', s.id,
                                'modality', s.modality,
                                'url', CASE WHEN s.modality <> 'text'
                                            THEN '/media/samples/' || s.id || '?v=' || left(s.content_hash, 12) END,
                                'text', CASE WHEN s.modality = 'text' THEN s.text END,
                                'mime_type', s.mime_type,
                                'width', s.width,
                                'height', s.height,
                                'duration', s.duration,
                                'fps', s.fps) ORDER BY o.pos)
                              FROM jsonb_array_elements_text(a.display_order) WITH ORDINALITY o(sid, pos)
                              JOIN annotate_sample s ON s.id = o.sid::bigint)
            ) ORDER BY l.pos)
            FROM unnest(p_leases) WITH ORDINALITY l(id, pos)
            JOIN annotate_assignment a ON a.id = l.id AND a.project_id = p_project), '[]'::json),
        'options', json_build_object('tie', p.allow_tie, 'both_bad', p.allow_both_bad),
        'aspects', p.aspects,
        'mode', p.mode)
    FROM annotate_project p WHERE p.id = p_project);
END $$;

-- `next`: lock, then the leases (held first, oldest first; then new ones).
CREATE OR REPLACE FUNCTION rl_next_leases(p_slug text, p_user integer, p_staff boolean,
    p_n integer, p_now timestamptz)
RETURNS TABLE (project_id bigint, fresh boolean, id bigint, comparison_id bigint,
               display_order jsonb, leased_at timestamptz, expires_at timestamptz)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    e record;
BEGIN
    SELECT * INTO e FROM rl_enter(p_slug, p_user, p_staff);
    RETURN QUERY
        SELECT e.project_id, l.fresh, l.id, l.comparison_id, l.display_order, l.leased_at, l.expires_at
        FROM rl_leases(e.project_id, p_user, p_n, p_now, e.lease_seconds, e.paused) WITH ORDINALITY l
        ORDER BY l.ordinality;
END $$;

-- `next` for the labeling page: the same leases as their payload.
CREATE OR REPLACE FUNCTION rl_next(p_slug text, p_user integer, p_staff boolean,
    p_n integer, p_now timestamptz) RETURNS json
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    e record;
    v_ids bigint[];
BEGIN
    SELECT * INTO e FROM rl_enter(p_slug, p_user, p_staff);
    v_ids := ARRAY(
        SELECT l.id FROM rl_leases(e.project_id, p_user, p_n, p_now, e.lease_seconds, e.paused)
               WITH ORDINALITY l ORDER BY l.ordinality);
    -- A separate statement: the payload must see the leases just inserted (a later snapshot).
    RETURN rl_payload(e.project_id, v_ids);
END $$;

-- One choice ('left', 'right', 'tie', 'both_bad') as shown, as a canonical outcome and winner.
CREATE OR REPLACE FUNCTION rl_map_choice(p_choice text, p_what text, p_canonical bigint[],
    p_shown bigint[], p_allow_tie boolean, p_allow_both_bad boolean,
    OUT outcome text, OUT winner bigint)
LANGUAGE plpgsql AS $$
BEGIN
    IF p_choice IS NULL OR p_choice NOT IN ('left', 'right', 'tie', 'both_bad') THEN
        PERFORM rl_fail('RL400', 'invalid', p_what || ' must be one of left, right, tie, both_bad');
    END IF;
    IF p_choice = 'tie' THEN
        IF NOT p_allow_tie THEN
            PERFORM rl_fail('RL400', 'option_disabled', 'this project does not allow ties');
        END IF;
        outcome := 'tie';
    ELSIF p_choice = 'both_bad' THEN
        IF NOT p_allow_both_bad THEN
            PERFORM rl_fail('RL400', 'option_disabled', 'this project does not allow ''both bad''');
        END IF;
        outcome := 'both_bad';
    ELSE
        winner := CASE WHEN p_choice = 'left' THEN p_shown[1] ELSE p_shown[2] END;
        outcome := CASE WHEN winner = p_canonical[1] THEN 'a' ELSE 'b' END;
    END IF;
END $$;

-- A judgment's sentence in a response.
CREATE OR REPLACE FUNCTION rl_judgment_json(p_id bigint) RETURNS json
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT json_build_object('id', j.id, 'comparison', j.comparison_id, 'outcome', j.outcome,
                                     'winner', j.winner_id, 'created_at', j.created_at)
            FROM annotate_judgment j WHERE j.id = p_id);
END $$;

-- Submit a judgment on a lease the caller holds; with p_next > 0 also lease their next ones
-- (one transaction, one round trip per label). A repeated idempotency key returns the first
-- judgment and writes nothing (created = false). Artifacts come shape-checked by the caller.
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
