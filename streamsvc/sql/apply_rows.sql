-- Isolating the rows a multi-row statement refuses, inside PostgreSQL: one round trip
-- instead of one per probe. Not a migration: every connection of a flushing process
-- creates these in its own temporary schema (pg_temp), so the database keeps no object of
-- them. Every function here is revoked from PUBLIC as it is created: the caller role, under
-- which callers' statements run, can execute none of them (see streamsvc_as_caller).
--
-- `statement` takes its rows as $1, a JSON array in text (the flusher's json_to_recordset
-- statements). Every row the statement accepts is applied; each refused row is returned
-- with its 1-based position, SQLSTATE and message (DETAIL and HINT appended as the client
-- library shows them). Each probe is a subtransaction (a BEGIN ... EXCEPTION block), so the
-- caller's transaction keeps what succeeded. QUERY_CANCELED (statement_timeout) is not
-- caught, and LOCK_NOT_AVAILABLE (lock_timeout) is raised again: either ends the whole
-- call, since a wait for a lock is not the rows' fault and searching would wait again.
--
-- Finding the refused rows: an INSERT counts the rows it reaches in streamsvc_rows_reached
-- (a sequence, which a rolled-back subtransaction does not undo). When a probe stops at row
-- k before reaching the rest, row k was refused as it went in, and rows 1..k-1 went in
-- before it: they are applied again as one probe, and the rows after k as another, so a
-- refused row costs about two probes. When the count says nothing (no row reached: a
-- value did not convert; or no counter: UPDATE and DELETE), or the rows before k fail
-- after all (a check that runs at the end of the statement, such as a foreign key), the
-- probe is halved instead.
CREATE SEQUENCE pg_temp.streamsvc_rows_reached MINVALUE 0 CACHE 64;

-- Every statement applied for callers runs here, as the caller role: a SECURITY DEFINER
-- function that the connection hands to that role once created (ALTER FUNCTION ... OWNER
-- TO, streamsvc.adapters.caller_role), so the statement has only the privileges the
-- allow-list grants it, and PostgreSQL refuses any change of `role` or
-- `session_authorization` inside it (SET ROLE is checked against the session's login,
-- which could otherwise switch back). Wrapped in a WITH and read as a cursor, the text
-- must be exactly one INSERT, UPDATE or DELETE (or a query): a second statement makes a
-- multi-query plan, which a cursor refuses, so no DDL (a temporary table shadowing the
-- service's own) can ride along. `rows` is the statement's $1 (NULL when it has none).
CREATE FUNCTION pg_temp.streamsvc_as_caller(statement text, rows text)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    done record;
BEGIN
    FOR done IN EXECUTE 'WITH streamsvc_statement AS (' || statement || E'\n) SELECT' USING rows
    LOOP
    END LOOP;
END
$$;

-- One probe: the statement over `rows`, in a subtransaction. On success every OUT is
-- NULL; on failure, the error and how many rows the statement reached.
CREATE FUNCTION pg_temp.streamsvc_try_rows(
    statement text, rows text,
    OUT error_state text, OUT error_message text, OUT reached bigint)
LANGUAGE plpgsql AS $$
DECLARE
    detail text;
    hint text;
BEGIN
    PERFORM setval('pg_temp.streamsvc_rows_reached', 0);
    PERFORM pg_temp.streamsvc_as_caller(statement, rows);
EXCEPTION WHEN OTHERS THEN
    IF SQLSTATE = '55P03' THEN  -- a lock wait ran out: the rows are not at fault
        RAISE;
    END IF;
    GET STACKED DIAGNOSTICS detail = PG_EXCEPTION_DETAIL, hint = PG_EXCEPTION_HINT;
    error_state := SQLSTATE;
    error_message := SQLERRM
        || coalesce(E'\nDETAIL:  ' || nullif(detail, ''), '')
        || coalesce(E'\nHINT:  ' || nullif(hint, ''), '');
    reached := currval('pg_temp.streamsvc_rows_reached');
END
$$;
REVOKE EXECUTE ON FUNCTION pg_temp.streamsvc_try_rows(text, text) FROM PUBLIC;

-- `rows` (positions `first`..) failed as one probe with this error, having reached row
-- `reached`: apply what can be applied, return the refused. `trust` is false once the
-- count has misled, and the rest is halved. Going on after a refused row is a loop, not a
-- call, so that a batch of nothing but refused rows does not nest one call per row.
CREATE FUNCTION pg_temp.streamsvc_isolate_rows(
    statement text, rows json[], first integer, trust boolean,
    state text, message text, reached bigint)
RETURNS TABLE (row_position integer, error_state text, error_message text)
LANGUAGE plpgsql AS $$
DECLARE
    n integer := cardinality(rows);
    lo integer := 1;  -- rows[lo:n] failed as one probe, with state, message and reached
    k integer;
    probe record;
BEGIN
    LOOP
        IF lo = n THEN
            RETURN QUERY SELECT first + lo - 1, state, message;
            RETURN;
        END IF;
        IF NOT trust OR reached NOT BETWEEN 1 AND n - lo + 1 OR state = '21000' THEN
            -- no count to go by (or a row met twice, which alone would pass): halve
            k := lo + (n - lo + 1) / 2;
            RETURN QUERY SELECT * FROM pg_temp.streamsvc_probe_rows(
                statement, rows[lo:k - 1], first + lo - 1, trust);
            RETURN QUERY SELECT * FROM pg_temp.streamsvc_probe_rows(
                statement, rows[k:n], first + k - 1, trust);
            RETURN;
        END IF;
        k := lo + reached::integer - 1;
        IF k > lo THEN  -- the rows before row k went in before it: they go in again
            RETURN QUERY SELECT * FROM pg_temp.streamsvc_probe_rows(
                statement, rows[lo:k - 1], first + lo - 1, false);
        END IF;
        IF k < n THEN
            -- rows after k were never reached: the statement stopped at row k, for row k
            RETURN QUERY SELECT first + k - 1, state, message;
        ELSE
            -- the last row, or a check at the end of the statement (a foreign key): ask
            -- the last row alone
            RETURN QUERY SELECT * FROM pg_temp.streamsvc_probe_rows(
                statement, rows[k:k], first + k - 1, true);
            RETURN;
        END IF;
        lo := k + 1;
        probe := pg_temp.streamsvc_try_rows(statement, array_to_json(rows[lo:n])::text);
        IF probe.error_state IS NULL THEN
            RETURN;
        END IF;
        state := probe.error_state;
        message := probe.error_message;
        reached := probe.reached;
    END LOOP;
END
$$;
REVOKE EXECUTE ON FUNCTION pg_temp.streamsvc_isolate_rows(
    text, json[], integer, boolean, text, text, bigint) FROM PUBLIC;

CREATE FUNCTION pg_temp.streamsvc_probe_rows(
    statement text, rows json[], first integer, trust boolean)
RETURNS TABLE (row_position integer, error_state text, error_message text)
LANGUAGE plpgsql AS $$
DECLARE
    probe record;
BEGIN
    probe := pg_temp.streamsvc_try_rows(statement, array_to_json(rows)::text);
    IF probe.error_state IS NOT NULL THEN
        RETURN QUERY SELECT * FROM pg_temp.streamsvc_isolate_rows(
            statement, rows, first, trust, probe.error_state, probe.error_message,
            probe.reached);
    END IF;
END
$$;
REVOKE EXECUTE ON FUNCTION pg_temp.streamsvc_probe_rows(text, json[], integer, boolean)
    FROM PUBLIC;

-- The entry point: the whole statement first; only when it fails, the rows one by one
-- as JSON values, to be probed in parts.
CREATE FUNCTION pg_temp.streamsvc_apply_rows(statement text, rows json)
RETURNS TABLE (row_position integer, error_state text, error_message text)
LANGUAGE plpgsql AS $$
DECLARE
    probe record;
BEGIN
    probe := pg_temp.streamsvc_try_rows(statement, rows::text);
    IF probe.error_state IS NOT NULL THEN
        RETURN QUERY SELECT * FROM pg_temp.streamsvc_isolate_rows(
            statement, ARRAY(SELECT json_array_elements(rows)), 1, true,
            probe.error_state, probe.error_message, probe.reached);
    END IF;
END
$$;
REVOKE EXECUTE ON FUNCTION pg_temp.streamsvc_apply_rows(text, json) FROM PUBLIC;

-- A caller's statements, one per operation (a statement group: the same text for every
-- member). `template` is the statement with each `$n` turned into format()'s `%n$L`
-- (streamsvc.sqlbuild.caller_template), `params` holds each operation's parameters as a
-- JSON array of texts and nulls; each statement runs as the caller role with its values
-- quoted as literals, which PostgreSQL types as it would the placeholders.
--
-- One probe: the statements at `lo`..`hi` in one subtransaction; on failure, the position
-- that failed with its error (the ones before it went back with it). The whole probe is a
-- SECURITY DEFINER function of the caller role, as streamsvc_as_caller is (the connection
-- hands it over with that one): one change of role per probe, not one per statement.
--
-- The first statement of the probe goes through streamsvc_as_caller's check: wrapped in a
-- WITH and read as a cursor, it must be one query, an INSERT, UPDATE or DELETE (or a
-- query). The others run as they are. They are the same template, and format()'s `%L`
-- gives one whole string literal (or NULL) wherever a placeholder stood, so their text
-- differs from the checked one only inside those literals: no `;` can appear or vanish
-- outside them, and each is one statement of the same kind.
--
-- When three or more are left, the template with its `$n` back (the same text again, with
-- a placeholder where each literal stood) is prepared once, as the role, under the name
-- streamsvc_caller_statement, and executed with each operation's literals, so PostgreSQL
-- plans it once rather than once per operation. A prepared statement is not undone by a
-- rollback: it is deallocated before the call returns, whether or not a statement failed
-- (and, should a timeout cut the call short, by streamsvc_forget_statement in the
-- connection's cleanup), so none is left for anything but this function to execute. A
-- template PostgreSQL cannot prepare alone (a parameter whose type the text does not
-- tell) runs as literals throughout.
CREATE FUNCTION pg_temp.streamsvc_as_caller_each(
    template text, params json[], lo integer, hi integer,
    OUT failed integer, OUT error_state text, OUT error_message text)
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    k integer := lo;
    done record;
    prepared boolean := false;
    arguments text[];  -- each operation's literals, as EXECUTE takes them: `('a', NULL)`
    before integer;  -- arguments[k - before] are statement k's
    detail text;
    hint text;
BEGIN
    FOR done IN EXECUTE 'WITH streamsvc_statement AS ('
        || format(template, VARIADIC ARRAY(SELECT json_array_elements_text(params[k])))
        || E'\n) SELECT'
    LOOP
    END LOOP;
    k := k + 1;
    IF k + 2 <= hi THEN
        IF EXISTS (SELECT FROM pg_prepared_statements
                   WHERE name = 'streamsvc_caller_statement') THEN
            EXECUTE 'DEALLOCATE streamsvc_caller_statement';
        END IF;
        BEGIN
            EXECUTE 'PREPARE streamsvc_caller_statement AS ' || array_to_string(ARRAY(
                SELECT regexp_replace(piece, '%(\d+)\$L', '$\1', 'g')
                FROM unnest(string_to_array(template, '%%')) WITH ORDINALITY AS t(piece, n)
                ORDER BY n), '%');
            arguments := ARRAY(
                SELECT coalesce('(' || (
                    SELECT string_agg(quote_nullable(v), ', ' ORDER BY n)
                    FROM json_array_elements_text(m.p) WITH ORDINALITY AS e(v, n)) || ')', '')
                FROM unnest(params[k:hi]) WITH ORDINALITY AS m(p, i)
                ORDER BY i);
            before := k - 1;
            prepared := true;
        EXCEPTION WHEN OTHERS THEN
            IF EXISTS (SELECT FROM pg_prepared_statements
                       WHERE name = 'streamsvc_caller_statement') THEN
                EXECUTE 'DEALLOCATE streamsvc_caller_statement';
            END IF;
        END;
    END IF;
    WHILE k <= hi LOOP
        IF prepared THEN
            EXECUTE 'EXECUTE streamsvc_caller_statement' || arguments[k - before];
        ELSE
            EXECUTE format(template, VARIADIC ARRAY(SELECT json_array_elements_text(params[k])));
        END IF;
        k := k + 1;
    END LOOP;
    IF prepared THEN
        EXECUTE 'DEALLOCATE streamsvc_caller_statement';
    END IF;
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS detail = PG_EXCEPTION_DETAIL, hint = PG_EXCEPTION_HINT;
    failed := k;
    error_state := SQLSTATE;
    error_message := SQLERRM
        || coalesce(E'\nDETAIL:  ' || nullif(detail, ''), '')
        || coalesce(E'\nHINT:  ' || nullif(hint, ''), '');
    IF EXISTS (SELECT FROM pg_prepared_statements WHERE name = 'streamsvc_caller_statement') THEN
        EXECUTE 'DEALLOCATE streamsvc_caller_statement';
    END IF;
    IF error_state = '55P03' THEN  -- a lock wait ran out: the statement is not at fault
        RAISE;
    END IF;
END
$$;

-- A statement streamsvc_as_caller_each prepared and could not deallocate (a timeout cut it
-- short): gone with the rest of what callers' statements leave on the session.
CREATE FUNCTION pg_temp.streamsvc_forget_statement()
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT FROM pg_prepared_statements WHERE name = 'streamsvc_caller_statement') THEN
        DEALLOCATE streamsvc_caller_statement;
    END IF;
END
$$;
REVOKE EXECUTE ON FUNCTION pg_temp.streamsvc_forget_statement() FROM PUBLIC;

-- All the statements in one probe; when statement k fails, it is refused, the ones before
-- it go in again together (they passed a moment ago; should they not now, each alone), and
-- the rest goes on from k + 1. A refused statement costs about two probes.
CREATE FUNCTION pg_temp.streamsvc_apply_each(template text, params json)
RETURNS TABLE (row_position integer, error_state text, error_message text)
LANGUAGE plpgsql AS $$
DECLARE
    each_params json[] := ARRAY(SELECT json_array_elements(params));
    n integer := cardinality(each_params);
    lo integer := 1;
    probe record;
    again record;
BEGIN
    WHILE lo <= n LOOP
        probe := pg_temp.streamsvc_as_caller_each(template, each_params, lo, n);
        IF probe.failed IS NULL THEN
            RETURN;
        END IF;
        IF probe.failed > lo THEN
            again := pg_temp.streamsvc_as_caller_each(
                template, each_params, lo, probe.failed - 1);
            IF again.failed IS NOT NULL THEN
                FOR k IN lo .. probe.failed - 1 LOOP
                    again := pg_temp.streamsvc_as_caller_each(template, each_params, k, k);
                    IF again.failed IS NOT NULL THEN
                        RETURN QUERY SELECT k, again.error_state, again.error_message;
                    END IF;
                END LOOP;
            END IF;
        END IF;
        RETURN QUERY SELECT probe.failed, probe.error_state, probe.error_message;
        lo := probe.failed + 1;
    END LOOP;
END
$$;
REVOKE EXECUTE ON FUNCTION pg_temp.streamsvc_apply_each(text, json) FROM PUBLIC;

-- Batches writing the same table apply one after the other: each takes a transaction-level
-- advisory lock per table, all in one sorted order (`tables` comes sorted), so concurrent
-- flushers never deadlock on hot target rows (a deadlock costs PostgreSQL's
-- deadlock_timeout, 1 s by default).
--
-- Waiting here is never the batch's fault: each wait is bounded by lock_timeout (55P03,
-- lock_not_available), and should the statement timeout (or a cancel) end the call while
-- it only waits here, that too comes out as 55P03, so the flusher retries the batch as a
-- lock wait and never cuts it (streamsvc.policy). The block costs a subtransaction only
-- when there are locks to take.
CREATE FUNCTION pg_temp.streamsvc_lock_tables(tables text[])
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    name text;
BEGIN
    IF cardinality(tables) = 0 THEN
        RETURN;
    END IF;
    BEGIN
        FOREACH name IN ARRAY tables LOOP
            PERFORM pg_advisory_xact_lock(hashtextextended('streamsvc:' || name, 0));
        END LOOP;
    EXCEPTION WHEN query_canceled THEN
        RAISE EXCEPTION 'waiting for the table lock of %: %', name, SQLERRM
            USING ERRCODE = 'lock_not_available';
    END;
END
$$;
REVOKE EXECUTE ON FUNCTION pg_temp.streamsvc_lock_tables(text[]) FROM PUBLIC;

-- Several statements of a batch in one round trip: first the table locks `tables` (none
-- when the batch holds them already), then each statement over its rows, in order, as
-- streamsvc_apply_rows does it (or, when `each` says so, a caller's statement once per
-- operation, as streamsvc_apply_each does it); each refused row comes back with its
-- statement's 1-based index.
CREATE FUNCTION pg_temp.streamsvc_apply_groups(
    tables text[], statements text[], rows text[], each boolean[])
RETURNS TABLE (group_index integer, row_position integer, error_state text, error_message text)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_temp.streamsvc_lock_tables(tables);
    FOR i IN 1 .. cardinality(statements) LOOP
        IF each[i] THEN
            RETURN QUERY SELECT i, r.row_position, r.error_state, r.error_message
                FROM pg_temp.streamsvc_apply_each(statements[i], rows[i]::json) AS r;
        ELSE
            RETURN QUERY SELECT i, r.row_position, r.error_state, r.error_message
                FROM pg_temp.streamsvc_apply_rows(statements[i], rows[i]::json) AS r;
        END IF;
    END LOOP;
END
$$;
REVOKE EXECUTE ON FUNCTION pg_temp.streamsvc_apply_groups(text[], text[], text[], boolean[])
    FROM PUBLIC;
