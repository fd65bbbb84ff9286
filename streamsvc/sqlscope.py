"""Resolve what a parsed statement names, and refuse what lies outside a caller's scope.

Pure: walks a pglast tree iteratively (deep expressions cannot exhaust Python's recursion),
query level by query level, resolving every relation, alias and column, and checking every
function, operator, type and node kind. sqlguard parses and decides the statement's shape;
its docstring states the rules enforced here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import NamedTuple

from pglast import ast, enums

from streamsvc.allowlist import AllowList, TableRef, quote_ident
from streamsvc.errors import InvalidOperation

Scope = frozenset[TableRef] | None  # the tables a caller may touch; None: every allowed one

MAX_SQL_DEPTH = 1_000

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
_MODIFYING = (ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt)
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
_NESTED = {ast.InsertStmt: "INSERT", ast.UpdateStmt: "UPDATE", ast.DeleteStmt: "DELETE"}


def refuse(reason: str) -> InvalidOperation:
    return InvalidOperation("sql", reason)


class _Rel(NamedTuple):
    """A relation as one query level names it, and the columns it lets be read."""

    name: str  # its alias, or the table's own name
    columns: frozenset[str] | None  # None: every column (a CTE, sub-select or open table)


Level = tuple[_Rel, ...]


class _Ctx(NamedTuple):
    ctes: frozenset[str]  # CTE names visible here
    levels: tuple[Level, ...]  # the relations of this query level (last) and enclosing ones
    depth: int


class Walker:
    """Walks a statement iteratively, resolving relations and columns level by level."""

    def __init__(self, allowed: AllowList, scope: Scope) -> None:
        self.allowed = allowed
        self.scope = scope
        self.placeholders: set[int] = set()

    def table(self, rel: ast.RangeVar) -> TableRef:
        """The allowed, in-scope table ``rel`` names."""
        shown = ".".join(quote_ident(p) for p in (rel.schemaname, rel.relname) if p is not None)
        if rel.catalogname is not None:
            raise refuse(f"table {shown}: database-qualified names are not allowed")
        ref = TableRef(rel.schemaname or "public", rel.relname or "")
        if ref not in self.allowed.tables:
            if all(t.schema != ref.schema for t in self.allowed.tables):
                raise refuse(f"schema {quote_ident(ref.schema)} is not allowed (table {shown})")
            raise refuse(f"table {shown} is not allowed")
        if self.scope is not None and ref not in self.scope:
            raise refuse(f"table {ref} is outside the caller's scope")
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
                raise refuse(f"nests more than {MAX_SQL_DEPTH} levels deep")
            ctx = ctx._replace(depth=ctx.depth + 1)
            if type(value) not in _NODES:
                raise refuse(f"{_node_words(value)} is not allowed")
            if isinstance(value, _QUERIES):
                if isinstance(value, _MODIFYING) and value is not top:
                    raise refuse(
                        f"only the outer statement may modify data, got a {_NESTED[type(value)]} "
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
                    raise refuse("NATURAL joins are not allowed; name the join columns")
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
            raise refuse(f"{_node_words(item)} is not allowed")
        alias = item.alias
        name = str(alias.aliasname) if alias is not None else str(item.relname)
        if not target and item.schemaname is None and item.relname in ctx.ctes:
            return _Rel(name, None)  # a name from the statement's own WITH, not a table
        columns = self.allowed.tables[self.table(item)]
        if columns is not None and alias is not None and alias.colnames:
            raise refuse(f"column aliases on table {item.relname} are not allowed")
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
            raise refuse("column aliases on a join of a column-restricted table are not allowed")
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
                raise refuse("session information (current_user and the like) is not allowed")
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
        raise refuse(f"column {shown}: write columns as name or alias.name")
    if names == ["*"]:
        closed = [rel.name for rel in (levels[-1] if levels else ()) if rel.columns is not None]
        if closed:
            raise refuse(f"* would read every column of {closed[0]}; name the columns")
        return
    if len(names) == 1:
        column = names[0]
        restricted = [rel for rel in visible if rel.columns is not None]
        if any(rel.name == column for rel in restricted):
            raise refuse(f"the whole row of {column} is not allowed; name the columns")
        for rel in restricted:
            if column not in (rel.columns or ()):
                raise refuse(_not_allowed(shown, rel))
        return
    qualifier, column = names
    candidates = [rel for rel in visible if rel.name == qualifier]
    if not candidates:
        raise refuse(f"column {shown}: no table or alias {quote_ident(qualifier)} in scope")
    for rel in candidates:
        if rel.columns is None:
            continue
        if column == "*":
            raise refuse(f"{shown} would read every column of {qualifier}; name the columns")
        if column not in rel.columns:
            raise refuse(_not_allowed(shown, rel))


def _not_allowed(shown: str, rel: _Rel) -> str:
    assert rel.columns is not None
    return f"column {shown} is not allowed on {rel.name}; allowed are {_listed(rel.columns)}"


def _check_function(call: ast.FuncCall) -> None:
    names = _names(call.funcname)
    schema, name = (names[0], names[-1]) if len(names) > 1 else (None, names[-1])
    shown = ".".join(names)
    if len(names) > 2 or schema not in (None, "pg_catalog"):
        raise refuse(f"function {shown} is not allowed: only built-in functions may be called")
    if name not in FUNCTIONS:
        raise refuse(f"function {shown} is not allowed")


def _check_operator(name: tuple[ast.Node, ...] | None) -> None:
    names = _names(name)
    if len(names) > 1 and names[:-1] != ["pg_catalog"]:
        raise refuse(f"operator {'.'.join(names)} is not allowed: only built-in operators")


def _check_type(name: tuple[ast.Node, ...] | None, what: str) -> None:
    names = _names(name)
    shown = ".".join(names)
    if len(names) > 2 or (len(names) == 2 and names[0] not in _TYPE_SCHEMAS):
        raise refuse(f"{what} {shown} is not allowed: use pg_catalog or public {what}s")
    if what == "type" and names and names[-1] in _OID_TYPES:
        raise refuse(f"type {shown} is not allowed: it looks up catalog objects")


def check_written(stmt: ast.Node, table: TableRef, allowed: AllowList) -> None:
    """On a table with a column list, every column written must be on it."""
    columns = allowed.tables[table]
    if columns is None:
        return
    targets: list[ast.ResTarget] = []
    if isinstance(stmt, ast.InsertStmt):
        # No column list writes every column, unless it is INSERT ... DEFAULT VALUES.
        if stmt.cols is None and stmt.selectStmt is not None:
            raise refuse(f"name the columns; table {table} allows only {_listed(columns)}")
        targets += stmt.cols or ()
        if stmt.onConflictClause is not None:
            targets += stmt.onConflictClause.targetList or ()
    elif isinstance(stmt, ast.UpdateStmt):
        targets += stmt.targetList or ()
    for target in targets:
        name = str(target.name)
        if not allowed.column_allowed(table, name):
            raise refuse(
                f"column {quote_ident(name)} of table {table} is not allowed; "
                f"allowed are {_listed(columns)}"
            )


def _listed(columns: frozenset[str]) -> str:
    return ", ".join(sorted(columns))
