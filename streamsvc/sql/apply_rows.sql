-- Isolating the rows a multi-row statement refuses, inside PostgreSQL: one round trip
-- instead of one per probe. Not a migration: every pool connection creates it in its own
-- temporary schema (pg_temp), so the database keeps no object of it.
--
-- `statement` takes its rows as $1, a JSON array in text (the flusher's json_to_recordset
-- statements). Every row the statement accepts is applied; each refused row is returned
-- with its 1-based position, SQLSTATE and message (DETAIL and HINT appended as the client
-- library shows them). Each probe is a subtransaction (a BEGIN ... EXCEPTION block), so the
-- caller's transaction keeps what succeeded. QUERY_CANCELED (statement_timeout) is not
-- caught: it ends the whole call.
CREATE FUNCTION pg_temp.streamsvc_apply_rows(statement text, rows json, first integer DEFAULT 1)
RETURNS TABLE (row_position integer, error_state text, error_message text)
LANGUAGE plpgsql AS $$
DECLARE
    n integer := json_array_length(rows);
    half integer := n / 2;
    detail text;
    hint text;
BEGIN
    BEGIN
        EXECUTE statement USING rows::text;
        RETURN;
    EXCEPTION WHEN OTHERS THEN
        IF n = 1 THEN
            GET STACKED DIAGNOSTICS detail = PG_EXCEPTION_DETAIL, hint = PG_EXCEPTION_HINT;
            row_position := first;
            error_state := SQLSTATE;
            error_message := SQLERRM
                || coalesce(E'\nDETAIL:  ' || nullif(detail, ''), '')
                || coalesce(E'\nHINT:  ' || nullif(hint, ''), '');
            RETURN NEXT;
            RETURN;
        END IF;
    END;
    RETURN QUERY SELECT * FROM pg_temp.streamsvc_apply_rows(
        statement,
        (SELECT json_agg(e ORDER BY i) FROM json_array_elements(rows) WITH ORDINALITY AS t(e, i)
         WHERE i <= half),
        first);
    RETURN QUERY SELECT * FROM pg_temp.streamsvc_apply_rows(
        statement,
        (SELECT json_agg(e ORDER BY i) FROM json_array_elements(rows) WITH ORDINALITY AS t(e, i)
         WHERE i > half),
        first + half);
END
$$;
