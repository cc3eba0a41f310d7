"""Configuration of simulated nodes: demand profiles and battery physics (the `sim` driver and the
simulated backend of `vbatt node`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import Field, create_model, field_validator, model_validator

from vbatt.config.base import NodeId, NonNeg, Strict, field_keys
from vbatt.kernel.fields import Scope, fields

__all__ = ["SimNodeConfig", "SimDriverConfig", "SineProfile", "StepProfile", "CsvProfile", "Profile", "SimPhysics", "Soc", "Temp", "ID_PATTERN"]


Soc = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
Temp = Annotated[float, Field(ge=-60, le=200, allow_inf_nan=False)]


# -- demand profiles (simulated nodes) -----------------------------------------
ID_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


class SineProfile(Strict):
    kind: Literal["sine"]
    amplitude_w: NonNeg
    period_s: Annotated[float, Field(gt=0)]
    noise_w: NonNeg = 0.0
    phase_s: float = 0.0


class StepProfile(Strict):
    kind: Literal["step"]
    at_s: NonNeg
    to_w: NonNeg


class CsvProfile(Strict):
    """A trace: one demand value (W) per line, `dt_s` apart, looped."""

    kind: Literal["csv"]
    path: str
    dt_s: Annotated[float, Field(gt=0)] = 1.0
    column: int = 0

    @field_validator("path")
    @classmethod
    def _exists(cls, v: str) -> str:
        try:
            ok = Path(v).is_file()
        except (OSError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"no such file: {v} (expected a CSV trace, one value per line)")
        return v

    @model_validator(mode="after")
    def _readable(self) -> "CsvProfile":
        from vbatt.drivers.sim.trace import read_trace  # a broken trace fails `vbatt check`, not the simulator later

        read_trace(self.path, self.column)
        return self


Profile = Annotated[Union[SineProfile, StepProfile, CsvProfile], Field(discriminator="kind")]


# -- nodes -----------------------------------------------------------------------
class SimPhysics(Strict):
    """Parameters of the simulated battery; the defaults make an ideal battery."""

    ocv_empty_v: Annotated[float, Field(gt=0)] = 48.0
    ocv_full_v: Annotated[float, Field(gt=0)] = 48.0
    resistance_ohm: NonNeg = 0.0
    charge_efficiency: Annotated[float, Field(gt=0, le=1)] = 1.0
    discharge_efficiency: Annotated[float, Field(gt=0, le=1)] = 1.0
    ambient_c: Temp = 25.0
    # thermal model on only when a thermal resistance is given
    thermal_resistance_k_per_w: Annotated[float, Field(gt=0)] | None = None
    thermal_capacity_j_per_k: Annotated[float, Field(gt=0)] = 20000.0

    @model_validator(mode="after")
    def _ocv(self) -> "SimPhysics":
        if self.ocv_full_v < self.ocv_empty_v:
            raise ValueError("ocv_full_v must be >= ocv_empty_v")
        return self


_SimValues = create_model("_SimValues", __base__=Strict, **field_keys(fields(Scope.NODE, configured=True)))


class SimNodeConfig(_SimValues):
    """One simulated node: its physics and initial state. The values (YAML keys, ranges, defaults)
    come from the field table."""

    id: NodeId
    driver: Literal["sim"] = "sim"
    demand_profile: Profile | None = None
    physics: SimPhysics = SimPhysics()


class SimDriverConfig(Strict):
    period_ms: Annotated[float, Field(gt=0)] = 10.0
    processes: Annotated[int, Field(ge=1, le=64)] = 1
