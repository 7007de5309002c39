"""SQL constructs the data layer needs beyond SQLAlchemy's own."""

from typing import Any

from sqlalchemy import ColumnElement, any_, bindparam
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.visitors import InternalTraversal
from sqlalchemy.types import Boolean


class OneOf(ColumnElement[bool]):
    """SQL: `column` is one of the values of the list bound as `name`.

    PostgreSQL gets `column = ANY(:name)`, an array: one statement text whatever the list's
    length, which the server parses and plans once per connection. Elsewhere an expanding
    IN, rendered anew for each length.
    """

    inherit_cache = True
    type = Boolean()
    _traverse_internals = [  # noqa: RUF012  # SQLAlchemy's cache key: what makes two equal
        ("column", InternalTraversal.dp_clauseelement),
        ("name", InternalTraversal.dp_string),
    ]

    def __init__(self, column: ColumnElement[Any], name: str) -> None:
        self.column = column
        self.name = name


@compiles(OneOf)
def _in_list(element: OneOf, compiler: SQLCompiler, **kw: Any) -> str:
    return compiler.process(element.column.in_(bindparam(element.name, expanding=True)), **kw)


@compiles(OneOf, "postgresql")
def _any_of_array(element: OneOf, compiler: SQLCompiler, **kw: Any) -> str:
    array = bindparam(element.name, type_=ARRAY(element.column.type))
    return compiler.process(element.column == any_(array), **kw)
