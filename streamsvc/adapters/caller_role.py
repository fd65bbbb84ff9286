"""The caller role: what callers' statements run as, holding only the allow-list's privileges.

Every statement the flusher applies for a caller (structured, statement or legacy) runs in
``pg_temp.streamsvc_as_caller`` or, for a caller's statement once per operation,
``pg_temp.streamsvc_as_caller_each`` (sql/apply_rows.sql): SECURITY DEFINER functions each
flushing connection hands to this role. So PostgreSQL itself refuses what the allow-list
does not grant, whatever the SQL check let through: other tables and columns, other
sequences, the service's own functions (revoked from PUBLIC), superuser-only functions
such as ``pg_read_file``, and any change of ``role`` inside the function.

The role is a plain NOLOGIN role, a member of no role, and the service's login is a member
of it (to hand it the function). In the service's database it holds exactly:
- per allowed table: SELECT, INSERT, UPDATE, DELETE; for a ``table(col, ...)`` entry,
  SELECT, INSERT and UPDATE on those columns and DELETE on the table;
- USAGE on the sequences the defaults of those tables' columns call (``serial``);
- USAGE on those tables' schemas;
- TEMPORARY on the database, where PUBLIC lacks it (to own its function in a login's
  temporary schema);
and nothing else (tables, columns, sequences, schemas, functions and the database itself
are compared; its privileges in other databases are theirs). ``sync`` makes it so: it
creates the role when missing, makes the login a member, revokes what is no longer
allowed and grants what is, in one transaction. ``streamsvc migrate`` runs it, and so does
start-up when the privileges differ; a login that may not grant gets an error naming the
statements an administrator runs (``streamsvc caller-role --sql`` prints them).
"""

from __future__ import annotations

from typing import NamedTuple

import asyncpg

from streamsvc.allowlist import AllowList, quote_ident
from streamsvc.errors import NotMigratedError

DEFAULT = "streamsvc_caller"
_LOCK_KEY = 0x5354524E  # advisory lock serialising concurrent syncs in one database
_TEMP_SCHEMA = r"n.nspname !~ '^pg_(toast_)?temp_'"


class Privilege(NamedTuple):
    """One privilege of the role on one object, names quoted as GRANT takes them."""

    kind: str  # TABLE, SEQUENCE, SCHEMA, FUNCTION or DATABASE
    name: str
    privilege: str
    column: str | None = None

    def statement(self, verb: str, role: str) -> str:
        column = f" ({self.column})" if self.column else ""
        to = "TO" if verb == "GRANT" else "FROM"
        target = f"{self.kind} {self.name}"
        return f"{verb} {self.privilege}{column} ON {target} {to} {quote_ident(role)}"


_TABLES_SQL = """
SELECT c.oid, format('%I.%I', n.nspname, c.relname), t.cols IS NULL,
       array(SELECT quote_ident(a.attname) FROM pg_attribute a
             WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
               AND a.attname = ANY(string_to_array(t.cols, ','))),
       quote_ident(n.nspname)
FROM unnest($1::text[], $2::text[], $3::text[]) AS t(schema_name, table_name, cols)
JOIN pg_namespace n ON n.nspname = t.schema_name
JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = t.table_name
               AND c.relkind IN ('r', 'p')
"""

_DATABASE_SQL = """
SELECT quote_ident(current_database()),
       has_database_privilege('public', current_database(), 'TEMPORARY')
"""

# Sequences the columns' defaults call (nextval('...'::regclass) depends on the sequence).
_SEQUENCES_SQL = """
SELECT DISTINCT format('%I.%I', n.nspname, s.relname)
FROM pg_attrdef d
JOIN pg_depend dep ON dep.classid = 'pg_attrdef'::regclass AND dep.objid = d.oid
                  AND dep.refclassid = 'pg_class'::regclass
JOIN pg_class s ON s.oid = dep.refobjid AND s.relkind = 'S'
JOIN pg_namespace n ON n.oid = s.relnamespace
WHERE d.adrelid = ANY($1::oid[])
"""

# What the role holds in this database, outside temporary schemas (where each flushing
# connection grants it its own function and row counter).
_HELD_SQL = f"""
SELECT CASE c.relkind WHEN 'S' THEN 'SEQUENCE' ELSE 'TABLE' END,
       format('%I.%I', n.nspname, c.relname), a.privilege_type, NULL
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace,
     aclexplode(c.relacl) AS a
WHERE a.grantee = $1::text::regrole AND {_TEMP_SCHEMA}
UNION ALL
SELECT 'TABLE', format('%I.%I', n.nspname, c.relname), a.privilege_type,
       quote_ident(att.attname)
FROM pg_attribute att JOIN pg_class c ON c.oid = att.attrelid
     JOIN pg_namespace n ON n.oid = c.relnamespace, aclexplode(att.attacl) AS a
WHERE a.grantee = $1::text::regrole AND {_TEMP_SCHEMA}
UNION ALL
SELECT 'SCHEMA', quote_ident(n.nspname), a.privilege_type, NULL
FROM pg_namespace n, aclexplode(n.nspacl) AS a
WHERE a.grantee = $1::text::regrole
UNION ALL
SELECT 'FUNCTION', p.oid::regprocedure::text, a.privilege_type, NULL
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace, aclexplode(p.proacl) AS a
WHERE a.grantee = $1::text::regrole AND {_TEMP_SCHEMA}
UNION ALL
SELECT 'DATABASE', quote_ident(d.datname), a.privilege_type, NULL
FROM pg_database d, aclexplode(d.datacl) AS a
WHERE d.datname = current_database() AND a.grantee = $1::text::regrole
"""

# NULL when the role does not exist; otherwise what would make it unfit.
_ROLE_SQL = f"""
SELECT array_remove(ARRAY[
         CASE WHEN r.rolcanlogin THEN 'LOGIN' END,
         CASE WHEN r.rolsuper THEN 'SUPERUSER' END,
         CASE WHEN r.rolcreaterole THEN 'CREATEROLE' END,
         CASE WHEN r.rolcreatedb THEN 'CREATEDB' END,
         CASE WHEN r.rolreplication THEN 'REPLICATION' END,
         CASE WHEN r.rolbypassrls THEN 'BYPASSRLS' END,
         CASE WHEN EXISTS (SELECT FROM pg_auth_members m WHERE m.member = r.oid)
              THEN 'a member of another role' END,
         CASE WHEN EXISTS (SELECT FROM pg_class c JOIN pg_namespace n
                                   ON n.oid = c.relnamespace
                           WHERE c.relowner = r.oid AND {_TEMP_SCHEMA})
                OR EXISTS (SELECT FROM pg_namespace n WHERE n.nspowner = r.oid)
              THEN 'the owner of tables or schemas' END], NULL),
       pg_has_role(current_user, r.oid, 'MEMBER')
FROM pg_roles r WHERE r.rolname = $1
"""


async def wanted(conn: asyncpg.Connection, allow: AllowList) -> set[Privilege]:
    """The privileges ``allow`` needs on the tables this database has."""
    refs = list(allow.tables.items())
    rows = await conn.fetch(
        _TABLES_SQL,
        [ref.schema for ref, _ in refs],
        [ref.name for ref, _ in refs],
        [",".join(sorted(cols)) if cols is not None else None for _, cols in refs],
    )
    found: set[Privilege] = set()
    for _, name, every_column, columns, schema in rows:
        found.add(Privilege("SCHEMA", schema, "USAGE"))
        found.add(Privilege("TABLE", name, "DELETE"))
        for privilege in ("SELECT", "INSERT", "UPDATE"):
            if every_column:
                found.add(Privilege("TABLE", name, privilege))
            else:
                found.update(Privilege("TABLE", name, privilege, c) for c in columns)
    for (sequence,) in await conn.fetch(_SEQUENCES_SQL, [r[0] for r in rows]):
        found.add(Privilege("SEQUENCE", sequence, "USAGE"))
    # To be handed a function in a login's temporary schema the role needs TEMPORARY on
    # the database: PUBLIC's by default, its own where the database revoked PUBLIC's.
    database, public_temp = await conn.fetchrow(_DATABASE_SQL)
    if not public_temp:
        found.add(Privilege("DATABASE", database, "TEMPORARY"))
    return found


async def held(conn: asyncpg.Connection, role: str) -> set[Privilege]:
    """The privileges ``role`` holds in this database (see the module docstring)."""
    return {Privilege(*row) for row in await conn.fetch(_HELD_SQL, quote_ident(role))}


async def plan(conn: asyncpg.Connection, role: str, allow: AllowList) -> list[str]:
    """The statements that would set ``role`` up for ``allow``; none when it is right."""
    statements = _membership(role, await conn.fetchrow(_ROLE_SQL, role), await _login(conn))
    have = set() if statements and statements[0].startswith("CREATE") else await held(conn, role)
    want = await wanted(conn, allow)
    statements += [p.statement("REVOKE", role) for p in sorted(have - want, key=_order)]
    statements += [p.statement("GRANT", role) for p in sorted(want - have, key=_order)]
    return statements


def _membership(role: str, state: asyncpg.Record | None, login: str) -> list[str]:
    """Creating the role and making the login a member, as far as missing; refuses a role
    that could do more than it should."""
    if state is not None and state[0]:
        raise NotMigratedError(
            f"caller role {role!r} must be a plain NOLOGIN role, but it is "
            f"{', '.join(state[0])}; name another in STREAMSVC_CALLER_ROLE"
        )
    steps = [f"CREATE ROLE {quote_ident(role)} NOLOGIN"] if state is None else []
    if state is None or not state[1]:
        steps.append(f"GRANT {quote_ident(role)} TO {quote_ident(login)}")
    return steps


async def _login(conn: asyncpg.Connection) -> str:
    return str(await conn.fetchval("SELECT current_user"))


def _order(p: Privilege) -> tuple[str, str, str, str]:
    return p.kind, p.name, p.privilege, p.column or ""


async def sync(conn: asyncpg.Connection, role: str, allow: AllowList) -> list[str]:
    """Set ``role`` up for ``allow`` (see the module docstring); returns what it ran."""
    if not await plan(conn, role, allow):
        return []
    statements = await _create(conn, role)
    reason = "some privileges could not be changed"  # a GRANT without grant option warns
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
            for statement in await plan(conn, role, allow):
                statements.append(statement)
                await conn.execute(statement)
            # A table's REVOKE takes the same privilege on its columns with it.
            for statement in await plan(conn, role, allow):
                statements.append(statement)
                await conn.execute(statement)
    except asyncpg.InsufficientPrivilegeError as exc:
        reason = str(exc)
    left = await plan(conn, role, allow)
    if left:
        raise _cannot(role, left, reason)
    return statements


async def _create(conn: asyncpg.Connection, role: str) -> list[str]:
    """The role and the login's membership, which are the cluster's, not the database's:
    another database's service may be creating them at the same moment."""
    steps = _membership(role, await conn.fetchrow(_ROLE_SQL, role), await _login(conn))
    for step in steps:
        try:
            await conn.execute(step)
        except asyncpg.InsufficientPrivilegeError as exc:
            raise _cannot(role, steps, str(exc)) from exc
        except asyncpg.PostgresError:  # done meanwhile: fine if it is no longer needed
            state = await conn.fetchrow(_ROLE_SQL, role)
            if step in _membership(role, state, await _login(conn)):
                raise
    return steps


def _cannot(role: str, statements: list[str], reason: str) -> NotMigratedError:
    shown = "; ".join(statements[:5]) + ("; ..." if len(statements) > 5 else "")
    return NotMigratedError(
        f"caller role {role!r} is not set up for STREAMSVC_ALLOWED_TABLES ({reason}); "
        f"an owner of the allowed tables must run: {shown} "
        "(`streamsvc caller-role --sql` prints them all)"
    )


# The functions callers' statements run in (sql/apply_rows.sql).
CALLER_FUNCTIONS = (
    "pg_temp.streamsvc_as_caller(text, text)",
    "pg_temp.streamsvc_as_caller_each(text, json[], integer, integer)",
)


def hand_over_sql(role: str) -> str:
    """Run on each flushing connection once sql/apply_rows.sql is in: the functions callers'
    statements run in become the role's, executable by the login only, and the role may
    count the rows it reaches."""
    name = quote_ident(role)
    steps = [
        f"""ALTER FUNCTION {function} OWNER TO {name};
REVOKE ALL ON FUNCTION {function} FROM PUBLIC, {name};
GRANT EXECUTE ON FUNCTION {function} TO CURRENT_USER;
"""
        for function in CALLER_FUNCTIONS
    ]
    return "".join(steps) + f"GRANT USAGE ON SEQUENCE pg_temp.streamsvc_rows_reached TO {name};\n"
