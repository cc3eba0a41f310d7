"""The base of every config model: strict (unknown keys are errors), immutable once validated; and the
YAML type of a field of the field table (its bounds are the table's range, never restated here)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, create_model

from vbatt.kernel.fields import Field as TableField, Role, Scope, fields, node_field

__all__ = ["Strict", "TlsFiles", "NonNeg", "Priority", "NodeId", "NodeSettings", "field_type", "field_default", "field_keys"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsFiles(Strict):
    """Modbus/TCP Security: this side's certificate and key, and the CA that signs the peer's (PEM files)."""

    ca: str
    cert: str
    key: str


def _bound(x: float) -> float | int:
    # 1 rather than 1.0 in "less than or equal to 1": the messages read as the table is written
    return int(x) if float(x).is_integer() and abs(x) < 2**53 else x


def field_type(f: TableField) -> Any:
    """The YAML type of a field with a range: its dtype's kind, bounded by the table's range."""
    if f.lo is None or f.hi is None:
        raise ValueError(f"field {f.name} has no range")
    py = int if f.np_dtype.kind in "iu" else float
    extra = {} if py is int else {"allow_inf_nan": False}
    return Annotated[py, Field(ge=_bound(f.lo), le=_bound(f.hi), **extra)]


def field_default(f: TableField) -> float | int:
    return int(f.default) if f.np_dtype.kind in "iu" else float(f.default)


def field_keys(fs: tuple[TableField, ...]) -> dict[str, tuple[Any, Any]]:
    """`create_model` arguments: YAML key -> (type, default) for the configured fields of `fs`."""
    return {f.yaml: (field_type(f), field_default(f)) for f in fs if f.yaml is not None}


NonNeg = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Priority = field_type(node_field("priority"))
NodeId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]

# The operator settings every node entry takes, whatever its driver (configured node settings).
NodeSettings = create_model("NodeSettings", __base__=Strict,
                            **field_keys(fields(Scope.NODE, Role.SETTING, configured=True)))
