"""Decide whether a caller's raw SQL may run: one INSERT, UPDATE or DELETE inside its scope.

Callers may send their own SQL ("statement" operations with ``$n`` params, or "legacy" ones
without). The service runs it inside its own transactions, so the SQL must not be able to
escape the caller's scope: a key holder is untrusted beyond it. Every refusal is an
InvalidOperation on ``sql`` or ``params`` with a reason the caller can act on.

What is accepted, decided here and kept deliberately narrow:

- Size first, before the parser runs: at most ``MAX_SQL_BYTES`` (16 KiB of UTF-8). The
  parser (libpg_query, through pglast) builds its tree recursively in C, so a long operator
  chain (``1+1+...``, 25,000 terms) overflowed the stack and killed the process. 16 KiB
  bounds that depth to about 8,200 levels, which needs about 3 MB of stack; parsing runs in
  one thread of the service's own with a ``PARSER_STACK_BYTES`` (64 MiB) stack, whatever
  thread the caller is on; right nesting deeper than the parser's own stack (about 10,000
  levels) is refused as "nests too deeply". The lexer takes time quadratic in the length
  of a run of operator characters (``+-+-...`` or ``/*/*...``: 0.5 s for 16 KiB), so a run
  longer than ``MAX_OPERATOR_RUN`` (128; PostgreSQL's operators are at most 63) is refused
  before lexing, even inside a literal, where a parameter can carry such text instead.
  Checking a statement at the length limit still costs up to about 0.3 s of CPU (pglast
  builds Python objects at some 20 µs a node); the verdict on a text, refusal or not, is
  remembered.
  After parsing, a tree deeper than ``MAX_SQL_DEPTH`` (1,000 levels) is refused: PostgreSQL
  would fail it anyway ("stack depth limit exceeded" at its default 2 MB).
- Exactly one INSERT, UPDATE or DELETE. ``ON CONFLICT ... DO UPDATE`` counts as the action
  ``upsert`` (the caller needs it); ``DO NOTHING`` stays ``insert``. RETURNING is refused:
  the service discards what a statement returns, so it could only serve as a read channel.
  Only the outer statement may modify data (no INSERT/UPDATE/DELETE/MERGE in a WITH).
- Relations: every relation named anywhere (target, FROM, USING, JOIN, sub-selects, CTE
  bodies, ON CONFLICT, ``TABLE x``) is a CTE of the statement or a table that is both in the
  allow-list and in the caller's scope. System catalogs and views are simply not allowed
  tables. Functions in FROM, TABLESAMPLE, XMLTABLE, FOR UPDATE/SHARE, WHERE CURRENT OF and
  NATURAL joins are refused; so is any node the check does not know (an allow-list of
  node types), e.g. the SQL/JSON and XML constructors.
- Columns: on a table with a column list, every column read or written anywhere must be on
  it. Aliases are resolved; an unqualified name must be allowed on every column-restricted
  table visible where it is used (this and enclosing query levels: conservative, it may
  refuse a statement PostgreSQL would resolve to another table). Columns are written as
  ``name`` or ``alias.name``; longer names are refused. Whole-row references (``t.*``,
  ``*``, a bare alias or table name used as a value, ``(t).col``) and column aliases
  (``FROM t AS x(a, b)``) are refused on column-restricted tables and allowed elsewhere,
  since they then expose only allowed columns. A column list on ``excluded`` follows the
  target's.
- Functions: only the names in ``FUNCTIONS``, unqualified or qualified with ``pg_catalog``:
  side-effect-free, not set-returning, none taking SQL text, touching files, settings,
  locks, sequences, other sessions or replication, none whose output size is an argument
  (repeat, lpad, rpad). Any other schema (pg_temp, public, ...) is refused, as are
  ``current_user`` and the other session-information keywords. An unqualified name
  resolves in pg_catalog unless a function of the same name with a closer signature exists
  in a schema on the search_path (public): callers' role must not be able to create one.
- Operators: unqualified or ``OPERATOR(pg_catalog.x)``; other schemas are refused.
- Types in casts and collations: unqualified, ``pg_catalog`` or ``public`` (where the
  target tables' own enum and domain types live); any other schema (pg_temp, ...) is
  refused, as are the ``reg*`` types, which look up catalog objects by name.

sqlscope walks the parsed tree and enforces the relation, column, function, operator and
type rules. The analysis of an accepted text is remembered: callers send the same
statements over and over.
"""

from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, NamedTuple, TypeVar

import pglast
from pglast import ast, enums
from pglast.parser import ParseError

from streamsvc.allowlist import AllowList, TableRef
from streamsvc.errors import InvalidOperation
from streamsvc.sqlscope import Scope, Walker, check_written, refuse

Action = Literal["insert", "upsert", "update", "delete"]

MAX_SQL_BYTES = 16 * 1024
MAX_OPERATOR_RUN = 128
_OPERATOR_RUN = re.compile(rf"[-+*/<>=~!@#%^&|`?]{{{MAX_OPERATOR_RUN + 1},}}")
PARSER_STACK_BYTES = 64 * 1024 * 1024

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


def check_statement(
    sql: str, params: list[Any] | None, allowed: AllowList, scope: Scope = None
) -> CheckedStatement:
    """Accept sql only if it is one INSERT, UPDATE or DELETE within ``allowed`` and ``scope``.

    Otherwise raise InvalidOperation(field, reason), the field being ``sql`` or ``params``.
    """
    _check_text(sql)
    table, action, placeholders = _analysed(sql, allowed, scope)
    return CheckedStatement(table, action, _check_params(placeholders, params))


def _check_text(sql: str) -> None:
    if not sql.strip():
        raise refuse("is empty")
    if "\x00" in sql:  # the parser would silently stop at it
        raise refuse("must not contain NUL characters")
    try:
        size = len(sql) if len(sql) > MAX_SQL_BYTES else len(sql.encode())
    except UnicodeEncodeError as exc:  # a lone surrogate: no UTF-8 for the parser
        raise refuse("must be valid Unicode") from exc
    if size > MAX_SQL_BYTES:
        raise refuse(f"is longer than {MAX_SQL_BYTES} bytes")
    if _OPERATOR_RUN.search(sql):
        raise refuse(
            f"has more than {MAX_OPERATOR_RUN} operator characters (+-*/<>=~!@#%^&|`?) in a "
            "row; pass such text as a parameter"
        )


Analysis = tuple[TableRef, Action, frozenset[int]]


class _Refused(NamedTuple):
    """A remembered refusal: the field and reason of its InvalidOperation."""

    field: str
    reason: str


REMEMBERED = 4096  # accepted texts whose verdict is kept, the least recently used dropped
REMEMBERED_REFUSALS = 1024  # refused ones, kept apart: refusals never push accepted ones out
_Key = tuple[str, AllowList, Scope]
V = TypeVar("V")
_accepted: OrderedDict[_Key, Analysis] = OrderedDict()
_refused: OrderedDict[_Key, _Refused] = OrderedDict()
_verdicts_lock = threading.Lock()


def remembered(sql: str, allowed: AllowList, scope: Scope = None) -> bool:
    """Whether ``sql`` was checked before, so that checking it again costs microseconds;
    an unseen text may take up to about 0.3 s of CPU (see the module docstring), which
    an event loop should not wait for on its own thread. Refusals are remembered too (in
    a cache of their own, so that a caller sending many bad texts cannot make the
    accepted ones be checked again): the same expensive text again costs nothing more."""
    key = (sql, allowed, scope)
    return key in _accepted or key in _refused


def _analysed(sql: str, allowed: AllowList, scope: Scope) -> Analysis:
    key = (sql, allowed, scope)
    with _verdicts_lock:
        verdict: Analysis | _Refused | None = _recalled(_accepted, key) or _recalled(_refused, key)
    if verdict is None:
        try:
            verdict = _parser_thread().submit(_analyse, sql, allowed, scope).result()
        except InvalidOperation as exc:
            verdict = _Refused(exc.field, exc.reason)
        with _verdicts_lock:
            if isinstance(verdict, _Refused):
                _keep(_refused, key, verdict, REMEMBERED_REFUSALS)
            else:
                _keep(_accepted, key, verdict, REMEMBERED)
    if isinstance(verdict, _Refused):
        raise InvalidOperation(verdict.field, verdict.reason)
    return verdict


def _recalled(cache: OrderedDict[_Key, V], key: _Key) -> V | None:
    found = cache.get(key)
    if found is not None:
        cache.move_to_end(key)
    return found


def _keep(cache: OrderedDict[_Key, V], key: _Key, verdict: V, bound: int) -> None:
    cache[key] = verdict
    while len(cache) > bound:
        cache.popitem(last=False)


_parser_lock = threading.Lock()
_parser: tuple[int, ThreadPoolExecutor] | None = None


def _parser_thread() -> ThreadPoolExecutor:
    """One thread with a stack deep enough for whatever MAX_SQL_BYTES lets through."""
    global _parser
    with _parser_lock:
        if _parser is None or _parser[0] != os.getpid():  # a forked child needs its own
            previous = threading.stack_size(PARSER_STACK_BYTES)
            try:
                executor = ThreadPoolExecutor(1, thread_name_prefix="sqlguard-parser")
                executor.submit(int).result()  # starts its thread now, with that stack
            finally:
                threading.stack_size(previous)
            _parser = (os.getpid(), executor)
        return _parser[1]


def _analyse(sql: str, allowed: AllowList, scope: Scope) -> Analysis:
    stmt = _parse_one(sql)
    if not isinstance(stmt, (ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt)):
        raise refuse(f"only INSERT, UPDATE or DELETE are allowed, got {_command(stmt)}")
    if stmt.returningClause is not None:
        raise refuse("RETURNING is not allowed: the service discards what a statement returns")
    action: Action = (
        "upsert"
        if isinstance(stmt, ast.InsertStmt)
        and stmt.onConflictClause is not None
        and stmt.onConflictClause.action == enums.OnConflictAction.ONCONFLICT_UPDATE
        else _ACTIONS[type(stmt)]
    )
    assert stmt.relation is not None  # the grammar requires a target table
    walker = Walker(allowed, scope)
    table = walker.table(stmt.relation)
    walker.walk(stmt)
    check_written(stmt, table, allowed)
    return table, action, frozenset(walker.placeholders)


_ACTIONS: dict[type[ast.Node], Action] = {
    ast.InsertStmt: "insert",
    ast.UpdateStmt: "update",
    ast.DeleteStmt: "delete",
}


def _parse_one(sql: str) -> ast.Node:
    try:
        raw = pglast.parse_sql(sql)
    except ParseError as exc:
        if "memory exhausted" in str(exc):
            raise refuse("nests too deeply for the SQL parser") from exc
        raise refuse(f"does not parse: {_parse_message(exc)}") from exc
    except RecursionError as exc:
        raise refuse("nests too deeply for the SQL parser") from exc
    statements = [r.stmt for r in raw if r.stmt is not None]
    if len(statements) != 1:
        raise refuse(f"must be exactly one statement, got {len(statements)}")
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


def _check_params(placeholders: frozenset[int], params: list[Any] | None) -> int:
    """The highest ``$n``, once it matches the params given."""
    if 0 in placeholders:
        raise refuse("placeholders start at $1, got $0")
    highest = max(placeholders, default=0)
    if params is None:
        if placeholders:
            raise refuse(f"uses ${min(placeholders)} but no params were given")
        return 0
    given = _count(len(params), "param")
    if highest > len(params):
        raise InvalidOperation("params", f"the statement uses ${highest} but {given} given")
    if highest < len(params):
        uses = f"uses only up to ${highest}" if highest else "has no placeholders"
        raise InvalidOperation("params", f"{given} given but the statement {uses}")
    missing = sorted(set(range(1, highest + 1)) - placeholders)
    if missing:
        raise refuse(f"placeholders must run from $1 to ${highest}; ${missing[0]} is not used")
    return highest


def _count(n: int, noun: str) -> str:
    return f"{n} {noun} was" if n == 1 else f"{n} {noun}s were"
