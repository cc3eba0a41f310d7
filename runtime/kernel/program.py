"""What a control program is to the scan: a numba kernel bound once to image arrays.

A program declares the memory it keeps (per node or scalar arrays, placed in the
shared image so that it survives in one place and can be inspected), validates
its parameters with a pydantic model, and `bind()`s its kernel to the arrays
once. The scan then calls the bound step every cycle: no lookup, no allocation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from vbatt.kernel.seqblock import ArraySpec

if TYPE_CHECKING:
    from vbatt.kernel.image import ProcessImage

__all__ = ["Program", "NoParams", "Ctx", "CTX_SPEC"]


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Ctx:
    """Indices into the cycle context array (float64) every kernel may take."""

    NOW_S = 0  # CLOCK_MONOTONIC time of this cycle's release, s
    DT_S = 1  # time since the previous cycle, s (the period on the first)
    CYCLE = 2  # cycle number, from 1
    PERIOD_S = 3  # configured period, s
    WALL_S = 4  # wall-clock (Unix) time of this cycle's release, s: CLOCK_MONOTONIC + an offset taken at start
    N = 8


CTX_SPEC = ArraySpec("scan.ctx", "f8", (Ctx.N,))


class Program:
    """Base class. Subclasses set `id`, `Params`, and implement `bind()`.

    `reads`/`writes` name the image fields the kernel touches (documentation and
    the check that user programs only name fields that exist).
    """

    id: ClassVar[str]
    Params: ClassVar[type[BaseModel]] = NoParams
    reads: ClassVar[tuple[str, ...]] = ()
    writes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params: BaseModel, n_nodes: int):
        self.params = params
        self.n = n_nodes

    def memory(self) -> list[ArraySpec]:
        """Arrays this program keeps between cycles; names are local to the program."""
        return []

    def memory_specs(self) -> list[ArraySpec]:
        return [ArraySpec(f"{self.id}.{s.name}", s.dtype, s.shape) for s in self.memory()]

    def mem(self, img: "ProcessImage", name: str) -> np.ndarray:
        return img.mem[f"{self.id}.{name}"]

    def configure(self, cfg) -> None:
        """Take what the program needs from the rest of the configuration (called once, at build)."""

    def init(self, img: "ProcessImage") -> None:
        """Set initial memory (called once before the first cycle unless a warm restart restored it;
        memory starts zeroed)."""

    def bind(self, img: "ProcessImage", ctx: np.ndarray) -> Callable[[], None]:
        raise NotImplementedError

    def on_command(self, img: "ProcessImage", op: int, node: int, value: float, arg: int) -> None:
        """An operator command, applied between cycles after the scan's own handling
        (e.g. Op.RESET_TRIP has already cleared `trip[node]`; a program resets its memory)."""
