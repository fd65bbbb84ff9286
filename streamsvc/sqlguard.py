"""Decide whether a caller's raw SQL may run: one INSERT, UPDATE or DELETE on allowed tables.

Callers may send their own SQL ("statement" operations with ``$n`` params, or "legacy" ones
without). The service runs it inside its own transactions with its own credentials, so the
SQL must not be able to escape that: no transaction control (a ``COMMIT`` would break the
exactly-once bookkeeping), no DDL, no reading or writing tables outside the allow-list, no
server-side file, lock, sleep or configuration functions, and no write hidden in a ``WITH``.

The check uses PostgreSQL's own parser (pglast) and walks the whole tree, so a table named in
a subquery, a CTE or an ``INSERT ... SELECT`` is seen the same way as the target. Every
refusal is an InvalidOperation on ``sql`` or ``params`` with a reason the caller can act on.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from typing import Any, Literal, NamedTuple

import pglast
from pglast import ast, enums
from pglast.parser import ParseError

from streamsvc.allowlist import AllowList, TableRef, quote_ident
from streamsvc.errors import InvalidOperation

Action = Literal["insert", "update", "delete"]

_ACTIONS: dict[type[ast.Node], Action] = {
    ast.InsertStmt: "insert",
    ast.UpdateStmt: "update",
    ast.DeleteStmt: "delete",
}
_MODIFYING = (ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt, ast.MergeStmt)

# Matched against the last part of the function name, lower-cased.
_DENIED_FUNCTIONS = frozenset(
    {
        "current_setting",
        "set_config",
        "pg_stat_file",
        "pg_notify",
        "pg_terminate_backend",
        "pg_cancel_backend",
        "pg_reload_conf",
        "pg_rotate_logfile",
        "pg_current_logfile",
        "pg_logdir_ls",
        "pg_promote",
        "pg_switch_wal",
        "pg_start_backup",
        "pg_stop_backup",
        "pg_logical_emit_message",
        "pg_drop_replication_slot",
        "pg_import_system_collations",
        "pg_log_backend_memory_contexts",
        "loread",
        "lowrite",
    }
)
_DENIED_PREFIXES = (
    "pg_read_",  # pg_read_file, pg_read_binary_file
    "pg_ls_",  # pg_ls_dir, pg_ls_logdir, pg_ls_waldir, ...
    "pg_file_",  # adminpack: pg_file_write, pg_file_rename, pg_file_unlink
    "lo_",  # large objects, including lo_import / lo_export (server-side files)
    "dblink",
    "pg_sleep",
    "pg_advisory",
    "pg_try_advisory",
    "pg_create_",  # restore points, replication slots
    "pg_replication_",
    "pg_backup_",
    "pg_stat_reset",
    "query_to_xml",  # these run or read arbitrary SQL / tables by name
    "table_to_xml",
    "cursor_to_xml",
    "schema_to_xml",
    "database_to_xml",
)

_TRANSACTION_COMMANDS = {
    enums.TransactionStmtKind.TRANS_STMT_BEGIN: "BEGIN",
    enums.TransactionStmtKind.TRANS_STMT_START: "START TRANSACTION",
    enums.TransactionStmtKind.TRANS_STMT_COMMIT: "COMMIT",
    enums.TransactionStmtKind.TRANS_STMT_ROLLBACK: "ROLLBACK",
    enums.TransactionStmtKind.TRANS_STMT_SAVEPOINT: "SAVEPOINT",
    enums.TransactionStmtKind.TRANS_STMT_RELEASE: "RELEASE SAVEPOINT",
    enums.TransactionStmtKind.TRANS_STMT_ROLLBACK_TO: "ROLLBACK TO SAVEPOINT",
    enums.TransactionStmtKind.TRANS_STMT_PREPARE: "PREPARE TRANSACTION",
    enums.TransactionStmtKind.TRANS_STMT_COMMIT_PREPARED: "COMMIT PREPARED",
    enums.TransactionStmtKind.TRANS_STMT_ROLLBACK_PREPARED: "ROLLBACK PREPARED",
}
# Node classes whose name does not spell their command; the rest are derived from the name.
_COMMANDS = {
    "CreateStmt": "CREATE TABLE",
    "IndexStmt": "CREATE INDEX",
    "ViewStmt": "CREATE VIEW",
    "RuleStmt": "CREATE RULE",
    "CreateSeqStmt": "CREATE SEQUENCE",
    "AlterSeqStmt": "ALTER SEQUENCE",
    "CreatedbStmt": "CREATE DATABASE",
    "DropdbStmt": "DROP DATABASE",
    "VariableSetStmt": "SET",
    "VariableShowStmt": "SHOW",
    "CheckPointStmt": "CHECKPOINT",
}
_MAX_PARSE_MESSAGE = 160


class CheckedStatement(NamedTuple):
    """What an accepted statement does: which table, how, and how many ``$n`` it takes."""

    table: TableRef
    action: Action
    param_count: int


def check_statement(sql: str, params: list[Any] | None, allowed: AllowList) -> CheckedStatement:
    """Accept sql only if it is exactly one INSERT, UPDATE or DELETE on an allowed table.

    Otherwise raise InvalidOperation(field, reason), the field being ``sql`` or ``params``.
    The analysis of a text is remembered: callers send the same statements over and over.
    """
    table, action, placeholders = _analyse(sql, allowed)
    return CheckedStatement(table, action, _check_params(placeholders, params))


@functools.lru_cache(maxsize=4096)
def _analyse(sql: str, allowed: AllowList) -> tuple[TableRef, Action, frozenset[int]]:
    stmt = _parse_one(sql)
    if not isinstance(stmt, (ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt)):
        raise _refuse(f"only INSERT, UPDATE or DELETE are allowed, got {_command(stmt)}")
    action = _ACTIONS[type(stmt)]
    assert stmt.relation is not None  # the grammar requires a target table
    table = _allowed_table(stmt.relation, allowed)
    placeholders = _check_tree(stmt, allowed)
    _check_columns(stmt, table, allowed)
    return table, action, frozenset(placeholders)


def _refuse(reason: str) -> InvalidOperation:
    return InvalidOperation("sql", reason)


def _parse_one(sql: str) -> ast.Node:
    if not sql.strip():
        raise _refuse("is empty")
    if "\x00" in sql:  # the parser would silently stop at it
        raise _refuse("must not contain NUL characters")
    try:
        raw = pglast.parse_sql(sql)
    except ParseError as exc:
        raise _refuse(f"does not parse: {_parse_message(exc)}") from exc
    statements = [r.stmt for r in raw if r.stmt is not None]
    if len(statements) != 1:
        raise _refuse(f"must be exactly one statement, got {len(statements)}")
    return statements[0]


def _parse_message(exc: ParseError) -> str:
    message = str(exc.args[0]) if exc.args else str(exc)
    if len(message) > _MAX_PARSE_MESSAGE:
        message = message[: _MAX_PARSE_MESSAGE - 3] + "..."
    location = exc.args[1] if len(exc.args) > 1 else None
    return f"{message} (at character {location + 1})" if isinstance(location, int) else message


def _command(stmt: ast.Node) -> str:
    """The SQL command a statement node stands for, e.g. ``CREATE TABLE`` or ``COMMIT``."""
    if isinstance(stmt, ast.TransactionStmt):
        return _TRANSACTION_COMMANDS[stmt.kind] if stmt.kind is not None else "a transaction"
    if isinstance(stmt, ast.SelectStmt):
        return "SELECT INTO" if stmt.intoClause is not None else "SELECT"
    if isinstance(stmt, ast.DropStmt) and stmt.removeType is not None:
        kind = stmt.removeType.name.removeprefix("OBJECT_").replace("_", " ")
        return "DROP " + kind.replace("MATVIEW", "MATERIALIZED VIEW")
    if isinstance(stmt, ast.GrantStmt):
        return "GRANT" if stmt.is_grant else "REVOKE"
    name = type(stmt).__name__
    if name in _COMMANDS:
        return _COMMANDS[name]
    words = re.findall(r"[A-Z][a-z]*", name.removesuffix("Stmt"))
    return " ".join(words).upper() or name


def _walk(top: ast.Node) -> Iterator[tuple[ast.Node, frozenset[str]]]:
    """Yield every node under ``top`` (itself included) with the CTE names visible at it.

    Iterative, so deeply nested expressions cannot exhaust Python's recursion limit.
    """
    stack: list[tuple[object, frozenset[str]]] = [(top, frozenset())]
    while stack:
        value, ctes = stack.pop()
        if isinstance(value, tuple):
            stack.extend((item, ctes) for item in value)
            continue
        if not isinstance(value, ast.Node):
            continue
        yield value, ctes
        with_clause = getattr(value, "withClause", None)
        if isinstance(with_clause, ast.WithClause):
            names = [cte.ctename for cte in with_clause.ctes or ()]
            for i, cte in enumerate(with_clause.ctes or ()):
                # A plain WITH sees the CTEs before it; WITH RECURSIVE sees all of them.
                visible = names if with_clause.recursive else names[:i]
                stack.append((cte, ctes.union(visible)))
            ctes = ctes.union(names)
        stack.extend((getattr(value, attr), ctes) for attr in value if attr != "withClause")


def _check_tree(top: ast.Node, allowed: AllowList) -> set[int]:
    """Check every table, nested write and function call; return the ``$n`` numbers used."""
    placeholders: set[int] = set()
    for node, ctes in _walk(top):
        if isinstance(node, _MODIFYING) and node is not top:
            raise _refuse(
                f"only the outer statement may modify data, got a {_command(node)} inside it"
            )
        if isinstance(node, ast.RangeVar):
            if node.schemaname is None and node.relname in ctes:
                continue  # a name from the statement's own WITH, not a table
            _allowed_table(node, allowed)
        elif isinstance(node, ast.FuncCall):
            _check_function(node)
        elif isinstance(node, ast.ParamRef) and node.number is not None:
            placeholders.add(node.number)
    return placeholders


def _allowed_table(rel: ast.RangeVar, allowed: AllowList) -> TableRef:
    # Built from the parsed parts, not via AllowList.resolve: a quoted name may contain a dot.
    shown = ".".join(quote_ident(p) for p in (rel.schemaname, rel.relname) if p is not None)
    if rel.catalogname is not None:
        raise _refuse(f"table {shown}: database-qualified names are not allowed")
    ref = TableRef(rel.schemaname or "public", rel.relname or "")
    if ref in allowed.tables:
        return ref
    if all(t.schema != ref.schema for t in allowed.tables):
        raise _refuse(f"schema {quote_ident(ref.schema)} is not allowed (table {shown})")
    raise _refuse(f"table {shown} is not allowed")


def _check_function(call: ast.FuncCall) -> None:
    name = str(call.funcname[-1].sval) if call.funcname else ""
    lowered = name.lower()
    if lowered in _DENIED_FUNCTIONS or lowered.startswith(_DENIED_PREFIXES):
        raise _refuse(f"function {name} is not allowed")


def _check_columns(stmt: ast.Node, table: TableRef, allowed: AllowList) -> None:
    """On a table with a column list, every column written must be on it."""
    columns = allowed.tables[table]
    if columns is None:
        return
    targets: list[ast.ResTarget] = []
    if isinstance(stmt, ast.InsertStmt):
        # No column list writes every column, unless it is INSERT ... DEFAULT VALUES.
        if stmt.cols is None and stmt.selectStmt is not None:
            raise _refuse(f"name the columns; table {table} allows only {_listed(columns)}")
        targets += stmt.cols or ()
        if stmt.onConflictClause is not None:
            targets += stmt.onConflictClause.targetList or ()
    elif isinstance(stmt, ast.UpdateStmt):
        targets += stmt.targetList or ()
    for target in targets:
        name = str(target.name)
        if not allowed.column_allowed(table, name):
            raise _refuse(
                f"column {quote_ident(name)} of table {table} is not allowed; "
                f"allowed are {_listed(columns)}"
            )


def _listed(columns: frozenset[str]) -> str:
    return ", ".join(sorted(columns))


def _check_params(placeholders: frozenset[int], params: list[Any] | None) -> int:
    """The highest ``$n``, once it matches the params given."""
    if 0 in placeholders:
        raise _refuse("placeholders start at $1, got $0")
    highest = max(placeholders, default=0)
    if params is None:
        if placeholders:
            raise _refuse(f"uses ${min(placeholders)} but no params were given")
        return 0
    given = _count(len(params), "param")
    if highest > len(params):
        raise InvalidOperation("params", f"the statement uses ${highest} but {given} given")
    if highest < len(params):
        uses = f"uses only up to ${highest}" if highest else "has no placeholders"
        raise InvalidOperation("params", f"{given} given but the statement {uses}")
    missing = sorted(set(range(1, highest + 1)) - placeholders)
    if missing:
        raise _refuse(f"placeholders must run from $1 to ${highest}; ${missing[0]} is not used")
    return highest


def _count(n: int, noun: str) -> str:
    return f"{n} {noun} was" if n == 1 else f"{n} {noun}s were"
