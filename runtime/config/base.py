"""The base of every config model: strict (unknown keys are errors), immutable once validated."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["Strict", "NonNeg", "Priority", "NodeId"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


NonNeg = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Priority = Annotated[int, Field(ge=0, le=1000)]
NodeId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
