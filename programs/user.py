"""User programs: a user's own njit functions over named image fields, from the YAML program list.

    programs:
      - forecast
      - protection
      - user:
          steps:
            - function: examples/user_program.py:keep_reserve   # file.py:name or package.module:name
              args: [soc, hi_w, mem.hold_s, ctx]                 # what the function receives, in order
              params: {soc_floor: 0.3, hold_s: 5.0}              # then these numbers, in this order
              memory: {hold_s: f8}                               # per-node arrays kept between cycles
      - allocation

`args` names: any node field (`fields.py`, e.g. `soc`, `hi_w`: the whole
per-node array), `agg.<name>` for an aggregate (a shape-(1,) array),
`mem.<name>` for the step's own memory, `ctx` for the cycle context
(`ctx[1]` = dt in s, see `program.Ctx`). The function must be compiled with
`numba.njit` (plain functions are compiled here with nogil and cache) and must
not allocate if it is to keep the cycle allocation-free. A relative file path
is taken from the working directory. Everything is checked at load time: an
unknown field, a missing file or function, or a wrong number of parameters is
a configuration error with its file:line.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Annotated, Literal

from numba import njit
from numba.core.registry import CPUDispatcher
from pydantic import BaseModel, ConfigDict, Field, model_validator

from vbatt.fields import AGGREGATES, NODE_FIELDS
from vbatt.program import Program
from vbatt.seqblock import ArraySpec
from vbatt.textfile import text_problem

__all__ = ["UserPrograms", "UserParams", "UserStep", "load_function"]

_NODE = {f.name for f in NODE_FIELDS}
_AGG = {f.name for f in AGGREGATES}


def load_function(ref: str):
    """'path/to/file.py:name' or 'package.module:name' -> the function (ValueError when not found)."""
    target, sep, name = ref.rpartition(":")
    if not sep or not target or not name:
        raise ValueError(f"function {ref!r}: expected 'file.py:name' or 'module:name'")
    if target.endswith(".py"):
        path = Path(target).resolve()
        if not path.is_file():
            raise ValueError(f"function {ref!r}: no such file {target} (relative paths start at {Path.cwd()})")
        try:
            problem = text_problem(path.read_bytes(), target, "a UTF-8 Python source file")
        except OSError as exc:
            problem = f"{target}: cannot read: {exc.strerror or exc}"
        if problem:  # Python's own SyntaxError for these names neither the file nor the cause
            raise ValueError(f"function {ref!r}: {problem}")
        # A stable name (numba's cache records the module by name, in every process)
        mod_name = f"vbatt_user_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"
        module = sys.modules.get(mod_name)
        if module is None:
            spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[mod_name] = module
            try:
                spec.loader.exec_module(module)
            except Exception as exc:
                del sys.modules[mod_name]
                raise ValueError(f"function {ref!r}: importing {target} failed: {exc!r}") from None
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise ValueError(f"function {ref!r}: cannot import {target}: {exc}") from None
    fn = getattr(module, name, None)
    if fn is None:
        raise ValueError(f"function {ref!r}: {target} has no {name!r}")
    if not isinstance(fn, CPUDispatcher):
        if not callable(fn):
            raise ValueError(f"function {ref!r}: {name!r} is not a function")
        fn = njit(nogil=True, cache=True)(fn)
    return fn


class UserStep(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    function: Annotated[str, Field(min_length=3)]
    args: list[str] = []
    params: dict[str, float] = {}
    memory: dict[str, Literal["f8", "i8", "u1", "u4"]] = {}

    @model_validator(mode="after")
    def _check(self) -> "UserStep":
        for a in self.args:
            kind, _, rest = a.partition(".")
            ok = (a in _NODE or a == "ctx" or (kind == "agg" and rest in _AGG)
                  or (kind == "mem" and rest in self.memory))
            if not ok:
                raise ValueError(f"args: unknown name {a!r} (expected a node field such as 'soc', "
                                 f"'agg.<aggregate>', 'mem.<one of {sorted(self.memory)}>' or 'ctx')")
        fn = load_function(self.function)
        py = getattr(fn, "py_func", fn)
        want = len(self.args) + len(self.params)
        try:
            sig = inspect.signature(py)
        except (TypeError, ValueError):
            return self
        if len(sig.parameters) != want:
            raise ValueError(f"function {self.function!r} takes {len(sig.parameters)} parameters "
                             f"({', '.join(sig.parameters)}) but args + params give {want}")
        return self


class UserParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    steps: Annotated[list[UserStep], Field(min_length=1)]


class UserPrograms(Program):
    """Runs the configured user steps in order, as one entry of the program list."""

    id = "user"
    Params = UserParams

    def memory(self) -> list[ArraySpec]:
        return [ArraySpec(f"{k}.{name}", dt, (self.n,))
                for k, step in enumerate(self.params.steps) for name, dt in step.memory.items()]

    def bind(self, img, ctx):
        calls = []
        for k, step in enumerate(self.params.steps):
            fn = load_function(step.function)
            args = []
            for a in step.args:
                kind, _, rest = a.partition(".")
                if a == "ctx":
                    args.append(ctx)
                elif kind == "agg" and rest in _AGG:
                    args.append(img.agg[rest])
                elif kind == "mem":
                    args.append(self.mem(img, f"{k}.{rest}"))
                else:
                    args.append(img.node[a])
            calls.append((fn, (*args, *step.params.values())))
        if len(calls) == 1:
            fn, args = calls[0]
            return lambda: fn(*args)

        def step() -> None:
            for fn, args in calls:
                fn(*args)

        return step
