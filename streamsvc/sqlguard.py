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
  thread the caller is on. Right nesting (parentheses, sub-selects, NOT, CASE) is bounded
  by the parser itself ("nests too deeply"). The lexer takes time quadratic in the length
  of a run of operator characters (``+-+-...`` or ``/*/*...``: 0.5 s for 16 KiB), so a run
  longer than ``MAX_OPERATOR_RUN`` (128; PostgreSQL's operators are at most 63) is refused
  before lexing, even inside a literal, where a parameter can carry such text instead.
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
  ``current_user`` and the other session-information keywords. Unqualified names resolve
  in pg_catalog first as long as no other schema the service's role can create in shadows
  them; the database role setup keeps it so.
- Operators: unqualified or ``OPERATOR(pg_catalog.x)``; other schemas are refused.
- Types in casts and collations: unqualified, ``pg_catalog`` or ``public`` (where the
  target tables' own enum and domain types live); any other schema (pg_temp, ...) is
  refused, as are the ``reg*`` types, which look up catalog objects by name.

The analysis of a text is remembered: callers send the same statements over and over.
"""

from __future__ import annotations

import functools
import os
import re
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, NamedTuple

import pglast
from pglast import ast, enums
from pglast.parser import ParseError

from streamsvc.allowlist import AllowList, TableRef, quote_ident
from streamsvc.errors import InvalidOperation

Action = Literal["insert", "upsert", "update", "delete"]
Scope = frozenset[TableRef] | None  # the tables a caller may touch; None: every allowed one

MAX_SQL_BYTES = 16 * 1024
MAX_SQL_DEPTH = 1_000
MAX_OPERATOR_RUN = 128
_OPERATOR_RUN = re.compile(rf"[-+*/<>=~!@#%^&|`?]{{{MAX_OPERATOR_RUN + 1},}}")
PARSER_STACK_BYTES = 64 * 1024 * 1024

FUNCTIONS = frozenset(
    {
        # text
        *("lower", "upper", "initcap", "length", "char_length", "character_length"),
        *("octet_length", "btrim", "ltrim", "rtrim", "substr", "substring", "replace"),
        *("translate", "concat", "concat_ws", "left", "right", "position", "strpos"),
        *("split_part", "starts_with", "reverse", "md5", "regexp_replace", "overlay"),
        *("normalize", "like_escape", "similar_to_escape"),
        # numbers
        *("abs", "round", "floor", "ceil", "ceiling", "trunc", "mod", "div", "sign"),
        # time
        *("now", "clock_timestamp", "statement_timestamp", "transaction_timestamp"),
        *("date_trunc", "date_part", "extract", "date_bin", "age", "timezone", "overlaps"),
        *("make_interval", "make_date", "make_time", "make_timestamp", "make_timestamptz"),
        # formatting
        *("to_char", "to_number", "to_date", "to_timestamp"),
        # json
        *("to_json", "to_jsonb", "json_build_object", "json_build_array"),
        *("jsonb_build_object", "jsonb_build_array", "jsonb_set", "jsonb_insert"),
        *("jsonb_strip_nulls", "jsonb_typeof", "jsonb_array_length"),
        *("jsonb_extract_path", "jsonb_extract_path_text"),
        # arrays
        *("array_length", "cardinality", "array_append", "array_prepend", "array_cat"),
        *("array_remove", "array_position", "array_to_string", "string_to_array"),
        # identifiers
        "gen_random_uuid",
        # aggregates, for INSERT ... SELECT
        *("count", "sum", "min", "max", "avg", "bool_and", "bool_or"),
        *("string_agg", "array_agg", "jsonb_agg"),
    }
)
_TYPE_SCHEMAS = frozenset({"pg_catalog", "public"})
_OID_TYPES = frozenset(
    {
        *("regclass", "regcollation", "regconfig", "regdictionary", "regnamespace"),
        *("regoper", "regoperator", "regproc", "regprocedure", "regrole", "regtype"),
    }
)
_TIME_KEYWORDS = frozenset(
    getattr(enums.SQLValueFunctionOp, f"SVFOP_{name}")
    for name in (
        *("CURRENT_DATE", "CURRENT_TIME", "CURRENT_TIME_N", "CURRENT_TIMESTAMP"),
        *("CURRENT_TIMESTAMP_N", "LOCALTIME", "LOCALTIME_N", "LOCALTIMESTAMP"),
        "LOCALTIMESTAMP_N",
    )
)

_QUERIES = (ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt, ast.SelectStmt)
_MODIFYING = (ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt, ast.MergeStmt)
# Every node type a checked statement may contain; anything else is refused by name.
_NODES = frozenset(
    {
        *_QUERIES,
        *(ast.WithClause, ast.CommonTableExpr, ast.OnConflictClause, ast.InferClause),
        *(ast.IndexElem, ast.ResTarget, ast.MultiAssignRef, ast.RangeVar, ast.Alias),
        *(ast.RangeSubselect, ast.JoinExpr, ast.SortBy, ast.WindowDef, ast.GroupingSet),
        *(ast.ColumnRef, ast.A_Star, ast.ParamRef, ast.A_Const, ast.String, ast.Integer),
        *(ast.Float, ast.Boolean, ast.BitString, ast.A_Expr, ast.BoolExpr, ast.NullTest),
        *(ast.BooleanTest, ast.TypeCast, ast.TypeName, ast.CollateClause, ast.FuncCall),
        *(ast.NamedArgExpr, ast.SubLink, ast.CaseExpr, ast.CaseWhen, ast.CoalesceExpr),
        *(ast.MinMaxExpr, ast.SQLValueFunction, ast.A_ArrayExpr, ast.A_Indices),
        *(ast.A_Indirection, ast.RowExpr, ast.SetToDefault),
    }
)
_NODE_WORDS = {
    "RangeFunction": "functions in FROM",
    "RangeTableSample": "TABLESAMPLE",
    "RangeTableFunc": "XMLTABLE",
    "LockingClause": "FOR UPDATE/SHARE",
    "CurrentOfExpr": "WHERE CURRENT OF",
    "XmlExpr": "XML functions",
    "XmlSerialize": "XMLSERIALIZE",
    "MergeStmt": "MERGE",
}

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


def _refuse(reason: str) -> InvalidOperation:
    return InvalidOperation("sql", reason)


def _check_text(sql: str) -> None:
    if not sql.strip():
        raise _refuse("is empty")
    if "\x00" in sql:  # the parser would silently stop at it
        raise _refuse("must not contain NUL characters")
    size = len(sql) if len(sql) > MAX_SQL_BYTES else len(sql.encode())
    if size > MAX_SQL_BYTES:
        raise _refuse(f"is longer than {MAX_SQL_BYTES} bytes")
    if _OPERATOR_RUN.search(sql):
        raise _refuse(
            f"has more than {MAX_OPERATOR_RUN} operator characters (+-*/<>=~!@#%^&|`?) in a "
            "row; pass such text as a parameter"
        )


@functools.lru_cache(maxsize=4096)
def _analysed(
    sql: str, allowed: AllowList, scope: Scope
) -> tuple[TableRef, Action, frozenset[int]]:
    return _parser_thread().submit(_analyse, sql, allowed, scope).result()


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


def _analyse(sql: str, allowed: AllowList, scope: Scope) -> tuple[TableRef, Action, frozenset[int]]:
    stmt = _parse_one(sql)
    if not isinstance(stmt, (ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt)):
        raise _refuse(f"only INSERT, UPDATE or DELETE are allowed, got {_command(stmt)}")
    if stmt.returningClause is not None:
        raise _refuse("RETURNING is not allowed: the service discards what a statement returns")
    action: Action = (
        "upsert"
        if isinstance(stmt, ast.InsertStmt)
        and stmt.onConflictClause is not None
        and stmt.onConflictClause.action == enums.OnConflictAction.ONCONFLICT_UPDATE
        else _ACTIONS[type(stmt)]
    )
    assert stmt.relation is not None  # the grammar requires a target table
    walker = _Walker(allowed, scope)
    table = walker.table(stmt.relation)
    walker.walk(stmt)
    _check_written(stmt, table, allowed)
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
            raise _refuse("nests too deeply for the SQL parser") from exc
        raise _refuse(f"does not parse: {_parse_message(exc)}") from exc
    except RecursionError as exc:
        raise _refuse("nests too deeply for the SQL parser") from exc
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


class _Rel(NamedTuple):
    """A relation as one query level names it, and the columns it lets be read."""

    name: str  # its alias, or the table's own name
    columns: frozenset[str] | None  # None: every column (a CTE, sub-select or open table)


Level = tuple[_Rel, ...]


class _Ctx(NamedTuple):
    ctes: frozenset[str]  # CTE names visible here
    levels: tuple[Level, ...]  # the relations of this query level (last) and enclosing ones
    depth: int


class _Walker:
    """Walks a statement iteratively, resolving relations and columns level by level."""

    def __init__(self, allowed: AllowList, scope: Scope) -> None:
        self.allowed = allowed
        self.scope = scope
        self.placeholders: set[int] = set()

    def table(self, rel: ast.RangeVar) -> TableRef:
        """The allowed, in-scope table ``rel`` names."""
        shown = ".".join(quote_ident(p) for p in (rel.schemaname, rel.relname) if p is not None)
        if rel.catalogname is not None:
            raise _refuse(f"table {shown}: database-qualified names are not allowed")
        ref = TableRef(rel.schemaname or "public", rel.relname or "")
        if ref not in self.allowed.tables:
            if all(t.schema != ref.schema for t in self.allowed.tables):
                raise _refuse(f"schema {quote_ident(ref.schema)} is not allowed (table {shown})")
            raise _refuse(f"table {shown} is not allowed")
        if self.scope is not None and ref not in self.scope:
            raise _refuse(f"table {ref} is outside the caller's scope")
        return ref

    def walk(self, top: ast.Node) -> None:
        stack: list[tuple[object, _Ctx]] = [(top, _Ctx(frozenset(), (), 0))]
        while stack:
            value, ctx = stack.pop()
            if isinstance(value, tuple):
                stack.extend((item, ctx) for item in value)
                continue
            if not isinstance(value, ast.Node):
                continue
            if ctx.depth > MAX_SQL_DEPTH:
                raise _refuse(f"nests more than {MAX_SQL_DEPTH} levels deep")
            ctx = ctx._replace(depth=ctx.depth + 1)
            if type(value) not in _NODES:
                raise _refuse(f"{_node_words(value)} is not allowed")
            if isinstance(value, _QUERIES):
                if isinstance(value, _MODIFYING) and value is not top:
                    raise _refuse(
                        f"only the outer statement may modify data, got a {_command(value)} "
                        "inside it"
                    )
                stack.extend(self._query(value, ctx))
                continue
            self._check_node(value, ctx)
            stack.extend((getattr(value, attr), ctx) for attr in value)

    def _query(self, query: ast.Node, ctx: _Ctx) -> Iterator[tuple[object, _Ctx]]:
        """The children of a query with what each sees: its CTEs, then its own level."""
        with_clause = getattr(query, "withClause", None)
        if isinstance(with_clause, ast.WithClause):
            names = [str(cte.ctename) for cte in with_clause.ctes or ()]
            for i, cte in enumerate(with_clause.ctes or ()):
                # A plain WITH sees the CTEs before it; WITH RECURSIVE sees all of them.
                visible = names if with_clause.recursive else names[:i]
                yield cte, ctx._replace(ctes=ctx.ctes.union(visible))
            ctx = ctx._replace(ctes=ctx.ctes.union(names))
        inner = ctx._replace(levels=(*ctx.levels, self._level(query, ctx)))
        for attr in query:
            if attr in ("withClause", "relation"):
                continue  # the CTEs went above; the target was checked as a table
            child = getattr(query, attr)
            if isinstance(query, ast.SelectStmt) and attr == "sortClause":
                child = _sorted_by_inputs(query)
            # INSERT's rows cannot see the target; ON CONFLICT can.
            yield child, ctx if attr == "selectStmt" else inner

    def _level(self, query: ast.Node, ctx: _Ctx) -> Level:
        rels: list[_Rel] = []
        if isinstance(query, (ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt)):
            assert query.relation is not None
            target = self._from_item(query.relation, ctx, target=True)
            rels.append(target)
            if isinstance(query, ast.InsertStmt):
                rels.append(target._replace(name="excluded"))
        items = getattr(query, "fromClause", None) or getattr(query, "usingClause", None)
        stack = list(items or ())
        while stack:
            item = stack.pop()
            if isinstance(item, ast.JoinExpr):
                if item.isNatural:
                    raise _refuse("NATURAL joins are not allowed; name the join columns")
                stack += [item.larg, item.rarg]
                if item.alias is not None:
                    rels.append(_Rel(str(item.alias.aliasname), self._join_columns(item, ctx)))
                continue
            rels.append(self._from_item(item, ctx))
        return tuple(rels)

    def _from_item(self, item: object, ctx: _Ctx, target: bool = False) -> _Rel:
        if isinstance(item, ast.RangeSubselect):
            return _Rel(str(item.alias.aliasname) if item.alias is not None else "", None)
        if not isinstance(item, ast.RangeVar):
            raise _refuse(f"{_node_words(item)} is not allowed")
        alias = item.alias
        name = str(alias.aliasname) if alias is not None else str(item.relname)
        if not target and item.schemaname is None and item.relname in ctx.ctes:
            return _Rel(name, None)  # a name from the statement's own WITH, not a table
        columns = self.allowed.tables[self.table(item)]
        if columns is not None and alias is not None and alias.colnames:
            raise _refuse(f"column aliases on table {item.relname} are not allowed")
        return _Rel(name, columns)

    def _join_columns(self, join: ast.JoinExpr, ctx: _Ctx) -> frozenset[str] | None:
        """A join alias reads the columns of every table in it: those all of them allow."""
        restricted: list[frozenset[str]] = []
        stack: list[object] = [join.larg, join.rarg]
        while stack:
            item = stack.pop()
            if isinstance(item, ast.JoinExpr):
                stack += [item.larg, item.rarg]
            elif (columns := self._from_item(item, ctx).columns) is not None:
                restricted.append(columns)
        if not restricted:
            return None
        if join.alias is not None and join.alias.colnames:
            raise _refuse("column aliases on a join of a column-restricted table are not allowed")
        return frozenset.intersection(*restricted)

    def _check_node(self, node: ast.Node, ctx: _Ctx) -> None:
        if isinstance(node, ast.RangeVar):
            if not (node.schemaname is None and node.relname in ctx.ctes):
                self.table(node)
        elif isinstance(node, ast.ColumnRef):
            _check_column(_names(node.fields), ctx.levels)
        elif isinstance(node, ast.FuncCall):
            _check_function(node)
        elif isinstance(node, ast.A_Expr):
            _check_operator(node.name)
        elif isinstance(node, ast.SubLink):
            _check_operator(node.operName)
        elif isinstance(node, ast.SortBy):
            _check_operator(node.useOp)
        elif isinstance(node, ast.TypeName):
            _check_type(node.names, "type")
        elif isinstance(node, ast.CollateClause):
            _check_type(node.collname, "collation")
        elif isinstance(node, ast.SQLValueFunction):
            if node.op not in _TIME_KEYWORDS:
                raise _refuse("session information (current_user and the like) is not allowed")
        elif isinstance(node, ast.JoinExpr):
            for name in _names(node.usingClause):
                _check_column([name], ctx.levels)
        elif isinstance(node, ast.IndexElem) and node.name is not None:
            _check_column([node.name], ctx.levels)
        elif isinstance(node, ast.ParamRef) and node.number is not None:
            self.placeholders.add(node.number)


def _node_words(node: object) -> str:
    name = type(node).__name__
    return _NODE_WORDS.get(name) or ("SQL/JSON functions" if name.startswith("Json") else name)


def _sorted_by_inputs(select: ast.SelectStmt) -> tuple[ast.Node, ...]:
    """ORDER BY items, less the bare names of the SELECT's own output columns."""
    outputs = [[t.name] for t in select.targetList or () if t.name is not None]
    return tuple(
        item
        for item in select.sortClause or ()
        if not (isinstance(item.node, ast.ColumnRef) and _names(item.node.fields) in outputs)
    )


def _names(parts: Iterable[ast.Node] | None) -> list[str]:
    return [str(p.sval) if isinstance(p, ast.String) else "*" for p in parts or ()]


def _check_column(names: list[str], levels: tuple[Level, ...]) -> None:
    shown = ".".join(n if n == "*" else quote_ident(n) for n in names)
    visible = [rel for level in reversed(levels) for rel in level]  # innermost first
    if len(names) > 2:
        raise _refuse(f"column {shown}: write columns as name or alias.name")
    if names == ["*"]:
        closed = [rel.name for rel in (levels[-1] if levels else ()) if rel.columns is not None]
        if closed:
            raise _refuse(f"* would read every column of {closed[0]}; name the columns")
        return
    if len(names) == 1:
        column = names[0]
        restricted = [rel for rel in visible if rel.columns is not None]
        if any(rel.name == column for rel in restricted):
            raise _refuse(f"the whole row of {column} is not allowed; name the columns")
        for rel in restricted:
            if column not in (rel.columns or ()):
                raise _refuse(_not_allowed(shown, rel))
        return
    qualifier, column = names
    candidates = [rel for rel in visible if rel.name == qualifier]
    if not candidates:
        raise _refuse(f"column {shown}: no table or alias {quote_ident(qualifier)} in scope")
    for rel in candidates:
        if rel.columns is None:
            continue
        if column == "*":
            raise _refuse(f"{shown} would read every column of {qualifier}; name the columns")
        if column not in rel.columns:
            raise _refuse(_not_allowed(shown, rel))


def _not_allowed(shown: str, rel: _Rel) -> str:
    assert rel.columns is not None
    return f"column {shown} is not allowed on {rel.name}; allowed are {_listed(rel.columns)}"


def _check_function(call: ast.FuncCall) -> None:
    names = _names(call.funcname)
    schema, name = (names[0], names[-1]) if len(names) > 1 else (None, names[-1])
    shown = ".".join(names)
    if len(names) > 2 or schema not in (None, "pg_catalog"):
        raise _refuse(f"function {shown} is not allowed: only built-in functions may be called")
    if name not in FUNCTIONS:
        raise _refuse(f"function {shown} is not allowed")


def _check_operator(name: tuple[ast.Node, ...] | None) -> None:
    names = _names(name)
    if len(names) > 1 and names[:-1] != ["pg_catalog"]:
        raise _refuse(f"operator {'.'.join(names)} is not allowed: only built-in operators")


def _check_type(name: tuple[ast.Node, ...] | None, what: str) -> None:
    names = _names(name)
    shown = ".".join(names)
    if len(names) > 2 or (len(names) == 2 and names[0] not in _TYPE_SCHEMAS):
        raise _refuse(f"{what} {shown} is not allowed: use pg_catalog or public {what}s")
    if what == "type" and names and names[-1] in _OID_TYPES:
        raise _refuse(f"type {shown} is not allowed: it looks up catalog objects")


def _check_written(stmt: ast.Node, table: TableRef, allowed: AllowList) -> None:
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
