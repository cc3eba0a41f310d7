"""What a control program is to the scan: a numba kernel bound once, by name, to image arrays.

The contract (IEC 61131-3 function blocks in spirit: inputs, outputs and memory are declared, and a
call binds them by name):

* A kernel's **parameter names** are its bindings. Each name is looked up once, at bind time, in
  the program's own bindings (`Program.bindings`: derived arrays, scratch), its **memory**
  (`Program.memory`), its **parameters** (the pydantic `Params` fields, bound by value), the **cycle
  context** (`now_s`, `dt_s`, `cycle`, `period_s`, `wall_s`: shape-(1,) views, read as `dt_s[0]`,
  because they change every cycle), the **node fields** of the field table (whole per-node arrays)
  and the **aggregates** (`agg_<name>`, shape-(1,) arrays). A name found in two places, or in none,
  is an error naming the program and the parameter.
* Image fields are passed **read-only** unless the program declares them in `writes`; a store into
  a read-only array does not compile (numba types it as a readonly array), so a program cannot
  change a field it did not declare. Its own memory is always writable.
* `lo_w`/`hi_w` start every cycle from the device limits (the scan sets them after the latch);
  programs only narrow them, and the allocation never allocates beyond the device limits whatever
  a program wrote. A program that writes them must run before the program that allocates
  (`allocates = True`); the plan refuses another order.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from vbatt.kernel.fields import AGGREGATES, NODE_FIELDS
from vbatt.kernel.seqblock import ArraySpec

if TYPE_CHECKING:
    from vbatt.kernel.image import ProcessImage

__all__ = ["Program", "NoParams", "Ctx", "CTX_SPEC", "CTX_NAMES", "BindError", "bind_kernel", "kernel_names",
           "readonly", "LIMIT_FIELDS"]

LIMIT_FIELDS = ("lo_w", "hi_w")


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Ctx:
    """Indices into the cycle context array (float64)."""

    NOW_S = 0  # CLOCK_MONOTONIC time of this cycle's release, s
    DT_S = 1  # time since the previous cycle, s (the period on the first)
    CYCLE = 2  # cycle number, from 1
    PERIOD_S = 3  # configured period, s
    WALL_S = 4  # wall-clock (Unix) time of this cycle's release, s: CLOCK_MONOTONIC + an offset taken at start
    N = 8


# The context by name, for kernels: `def k(dt_s, ...)` receives ctx[DT_S:DT_S+1].
CTX_NAMES: dict[str, int] = {"now_s": Ctx.NOW_S, "dt_s": Ctx.DT_S, "cycle": Ctx.CYCLE, "period_s": Ctx.PERIOD_S,
                             "wall_s": Ctx.WALL_S}
CTX_SPEC = ArraySpec("scan.ctx", "f8", (Ctx.N,))
_NODE = {f.name for f in NODE_FIELDS}
_AGG = {f.name for f in AGGREGATES}


class BindError(ValueError):
    """A kernel parameter that names nothing, or more than one thing, or a write that is not allowed."""


def readonly(a: np.ndarray) -> np.ndarray:
    v = a.view()
    v.flags.writeable = False
    return v


def kernel_names(fn) -> list[str]:
    """The parameter names of a kernel (numba dispatcher or plain function)."""
    py = getattr(fn, "py_func", fn)
    return list(inspect.signature(py).parameters)


def bind_kernel(fn, *, where: str, img: "ProcessImage | None", ctx: np.ndarray | None,
                own: dict[str, Any] | None = None, memory: dict[str, np.ndarray] | None = None,
                params: dict[str, Any] | None = None, writes: tuple[str, ...] = ()) -> tuple:
    """The arguments of `fn`, in its parameter order, each found by its name (see the module doc).

    `writes`: the image fields (node names, `agg_<name>`) the kernel may store into."""
    own, memory, params = own or {}, memory or {}, params or {}
    node = img.node if img is not None else {}
    agg = img.agg if img is not None else {}
    for w in writes:
        if not (w in _NODE or (w.startswith("agg_") and w[4:] in _AGG)):
            raise BindError(f"{where}: writes {w!r}, which is not a field (a node field of the field table "
                            f"or 'agg_<aggregate>')")
    args = []
    for name in kernel_names(fn):
        found = []
        if name in own:
            found.append(("binding", own[name]))
        if name in memory:
            found.append(("memory", memory[name]))
        if name in params:
            found.append(("parameter", params[name]))
        if name in CTX_NAMES and ctx is not None:
            k = CTX_NAMES[name]
            found.append(("context", readonly(ctx[k:k + 1])))
        if name in _NODE and name in node:
            found.append(("node field", node[name] if name in writes else readonly(node[name])))
        if name.startswith("agg_") and name[4:] in _AGG and name[4:] in agg:
            found.append(("aggregate", agg[name[4:]] if name in writes else readonly(agg[name[4:]])))
        if not found:
            raise BindError(f"{where}: parameter {name!r} names nothing (expected a node field such as 'soc', "
                            f"'agg_<aggregate>', a context value ({', '.join(CTX_NAMES)}), one of the "
                            f"parameters {sorted(params)} or memory {sorted(memory)})")
        if len(found) > 1:
            raise BindError(f"{where}: parameter {name!r} is ambiguous: it names a "
                            f"{' and a '.join(k for k, _ in found)}; rename one")
        args.append(found[0][1])
    return tuple(args)


class Program:
    """Base class. Subclasses set `id`, `Params`, `kernel` and `writes`, or override `bind()`.

    `kernel`: the numba function run every cycle, bound by `bind_kernel` (its parameter names are
    its bindings). `writes`: the image fields it may change (read-only otherwise). `allocates`: it
    decides the outputs from lo_w/hi_w (programs that narrow the limits must run before it).
    `bindings()`: extra per-program arrays or values (scratch, converted parameters) by name.
    """

    id: ClassVar[str]
    Params: ClassVar[type[BaseModel]] = NoParams
    kernel: ClassVar[Callable | None] = None
    writes: ClassVar[tuple[str, ...]] = ()
    allocates: ClassVar[bool] = False
    # memory names published with the image every cycle (SCADA reads them whole, like the fields)
    published: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params: BaseModel, n_nodes: int):
        self.params = params
        self.n = n_nodes

    @property
    def reads(self) -> tuple[str, ...]:
        """The image fields the kernel takes and does not write (from its parameter names)."""
        if self._kernel() is None:
            return ()
        names = kernel_names(self._kernel())
        return tuple(n for n in names if (n in _NODE or (n.startswith("agg_") and n[4:] in _AGG))
                     and n not in self.writes)

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

    def bindings(self, img: "ProcessImage") -> dict[str, Any]:
        """Extra named arguments of the kernel (scratch arrays, parameters converted for numba)."""
        return {}

    def kernel_params(self) -> dict[str, Any]:
        """The parameters by name, as the kernel receives them (numbers by value)."""
        return {k: v for k, v in self.params.model_dump().items() if isinstance(v, (int, float, bool))}

    def _kernel(self):
        # an instance may pick its kernel by its parameters; read past numba's descriptor either way
        return self.__dict__.get("kernel") or type(self).kernel

    def bound_args(self, img: "ProcessImage", ctx: np.ndarray) -> tuple:
        memory = {s.name: self.mem(img, s.name) for s in self.memory()}
        return bind_kernel(self._kernel(), where=f"program {self.id!r}", img=img, ctx=ctx,
                           own=self.bindings(img), memory=memory, params=self.kernel_params(),
                           writes=self.writes)

    def bind(self, img: "ProcessImage", ctx: np.ndarray) -> Callable[[], None]:
        if self._kernel() is None:
            raise NotImplementedError(f"program {self.id!r}: set `kernel` or override bind()")
        fn, args = self._kernel(), self.bound_args(img, ctx)
        return lambda: fn(*args)

    def set_memory(self, img: "ProcessImage", name: str, index: int, value: float) -> str | None:
        """`Op.SET_MEMORY` on the program's memory array `name`: None when applied, else why it was
        refused (nothing changed). A program accepts only the arrays that are its operator settings."""
        return f"{name} is not an operator setting of program {self.id!r}"

    def on_command(self, img: "ProcessImage", op: int, node: int, value: float, arg: int) -> None:
        """An operator command, applied between cycles after the scan's own handling
        (e.g. Op.RESET_TRIP has already cleared `trip[node]`; a program resets its memory)."""
