"""The output tables billrun writes, as data: read from `outputs.yaml` next to this module.

`output_tables()` is the whole catalog; `arrow_schema(table)` and `polars_schema(table)` give a
table's columns as the files hold them, for readers that want to create tables ahead of a close
(lakehouse tables, warehouse DDL) or check a file. Pure: reads only the packaged YAML file.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import polars as pl
import pyarrow as pa
import yaml

SCHEMA_FILE = Path(__file__).with_name("outputs.yaml")

# Arrow types the schema file may name, as pyarrow.parquet.read_schema reports them once
# large_string is written `string`. A new type in the file must be added here, or loading fails.
_ARROW_TYPES: dict[str, pa.DataType] = {
    "string": pa.string(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "bool": pa.bool_(),
    "date32[day]": pa.date32(),
    "timestamp[us, tz=UTC]": pa.timestamp("us", tz="UTC"),
}


@dataclass(frozen=True)
class ColumnSpec:
    name: str
    type: str
    nullable: bool
    description: str


@dataclass(frozen=True)
class TableSpec:
    """One output table: where it is written, by which runs, its grain, keys and columns."""
    name: str
    paths: tuple[str, ...]
    written_by: tuple[str, ...]
    grain: str
    keys: tuple[str, ...]
    columns: tuple[ColumnSpec, ...]

    def column(self, name: str) -> ColumnSpec:
        for col in self.columns:
            if col.name == name:
                return col
        raise KeyError(f"{self.name} has no column {name!r}")


def arrow_type(name: str) -> pa.DataType:
    """The Arrow type a schema file's `type:` names (decimals keep precision and scale)."""
    if name.startswith("decimal128(") and name.endswith(")"):
        precision, scale = (int(p) for p in name.removeprefix("decimal128(").removesuffix(")").split(","))
        return pa.decimal128(precision, scale)
    try:
        return _ARROW_TYPES[name]
    except KeyError:
        raise ValueError(f"{SCHEMA_FILE.name}: unknown column type {name!r}") from None


def type_name(arrow: pa.DataType) -> str:
    """How the schema file writes an Arrow type: large text as `string`, the rest as Arrow prints it."""
    if pa.types.is_large_string(arrow):
        return "string"
    if pa.types.is_large_binary(arrow):
        return "binary"
    return str(arrow)


def _table(name: str, raw: dict) -> TableSpec:
    columns = tuple(ColumnSpec(name=c["name"], type=c["type"], nullable=bool(c["nullable"]),
                               description=str(c["description"]).strip()) for c in raw["columns"])
    for col in columns:
        arrow_type(col.type)
    names = [c.name for c in columns]
    if len(set(names)) != len(names):
        raise ValueError(f"{SCHEMA_FILE.name}: table {name} names a column twice")
    missing = [k for k in raw["keys"] if k not in names]
    if missing:
        raise ValueError(f"{SCHEMA_FILE.name}: table {name} has keys that are not columns: {missing}")
    return TableSpec(name=name, paths=tuple(raw["paths"]), written_by=tuple(raw["written_by"]),
                     grain=str(raw["grain"]).strip(), keys=tuple(raw["keys"]), columns=columns)


@cache
def _document() -> dict:
    return yaml.safe_load(SCHEMA_FILE.read_text(encoding="utf-8"))


def schema_version() -> int:
    """The schema file's `version:` (docs/schema-policy.md says when it moves)."""
    return int(_document()["version"])


@cache
def output_tables() -> dict[str, TableSpec]:
    """Every output table by name, in the order the schema file lists them."""
    return {name: _table(name, raw) for name, raw in _document()["tables"].items()}


def table_spec(table: str) -> TableSpec:
    try:
        return output_tables()[table]
    except KeyError:
        raise KeyError(f"no output table {table!r} in {SCHEMA_FILE.name}") from None


def arrow_schema(table: str) -> pa.Schema:
    """The table's columns in file order, with the Arrow types the files hold; a column the
    schema file marks `nullable: false` is a non-nullable field."""
    return pa.schema([pa.field(c.name, arrow_type(c.type), nullable=c.nullable) for c in table_spec(table).columns])


def polars_schema(table: str) -> pl.Schema:
    """The table's columns in file order as Polars types (what `pl.read_parquet` gives)."""
    return pl.Schema({name: dtype for name, dtype in pl.from_arrow(arrow_schema(table).empty_table()).schema.items()})


def data_dictionary() -> str:
    """The tables as markdown, one section each (grain, keys, where, columns): the generated
    part of docs/outputs.md, so the page says what this file says."""
    parts = []
    for spec in output_tables().values():
        where = ", ".join(f"`{p}`" for p in spec.paths)
        parts.append(
            f"### {spec.name}\n\n"
            f"{spec.grain}\n\n"
            f"- written by: {', '.join(spec.written_by)}\n"
            f"- where: {where}\n"
            f"- keys: {', '.join(f'`{k}`' for k in spec.keys)}\n\n"
            "| column | type | empty? | meaning |\n|---|---|---|---|\n"
            + "".join(f"| `{c.name}` | `{c.type}` | {'may be empty' if c.nullable else 'never'} | "
                      f"{c.description.replace('|', '/')} |\n" for c in spec.columns))
    return "\n".join(parts)
