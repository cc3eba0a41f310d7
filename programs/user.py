"""User programs: a user's own njit functions, bound by their parameter names, from the YAML program list.

    programs:
      - forecast
      - protection
      - user:
          steps:
            - function: examples/user_program.py:keep_reserve_when_hot   # file.py:name or package.module:name
              params: {soc_floor: 0.3, hot_c: 35, cool_s: 60}            # numbers, bound by name (any order)
              memory: {cool_timer_s: f8}                                   # per-node arrays kept between cycles
              writes: [hi_w]                                               # the image fields it may change
      - health
      - allocation

Every parameter of the function is bound by its name, as for the built-in programs
(`vbatt.kernel.program`): a node field of the field table (`soc`, `hi_w`, ...: the whole per-node
array), `agg_<aggregate>` (a shape-(1,) array), a memory name, a `params` name, or a context value
(`dt_s`, `now_s`, `wall_s`, `cycle`, `period_s`: shape-(1,) arrays, read as `dt_s[0]`). Image fields
are read-only unless listed in `writes` (a store into one does not compile). The function must be
compiled with `numba.njit` (plain functions are compiled here with nogil and cache) and must not
allocate if it is to keep the cycle allocation-free. A relative file path is taken from the working
directory. Everything is checked at load time: an unknown or ambiguous name, a parameter the function
does not take, a function parameter nothing binds, a write to something that is not a field, a missing
file or function: each is a configuration error with its file:line.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Literal

import numpy as np
from numba import njit
from numba.core.registry import CPUDispatcher
from pydantic import BaseModel, ConfigDict, Field, model_validator

from vbatt.kernel.fields import AGGREGATES, NODE_FIELDS
from vbatt.kernel.program import BindError, Program, bind_kernel, kernel_names
from vbatt.kernel.seqblock import ArraySpec
from vbatt.config.textfile import text_problem

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
    params: dict[str, float] = {}
    memory: dict[str, Literal["f8", "i8", "u1", "u4"]] = {}
    writes: list[str] = []

    @model_validator(mode="after")
    def _check(self) -> "UserStep":
        fn = load_function(self.function)
        try:
            names = kernel_names(fn)
        except (TypeError, ValueError):
            raise ValueError(f"function {self.function!r}: its parameters cannot be read") from None
        taken = set(names)
        extra = [k for k in self.params if k not in taken]
        if extra:
            raise ValueError(f"params {extra} are not parameters of {self.function!r} "
                             f"(it takes: {', '.join(names)})")
        for w in self.writes:
            if w not in taken:
                raise ValueError(f"writes: {w!r} is not a parameter of {self.function!r} "
                                 f"(it takes: {', '.join(names)})")
        for k in self.memory:
            if k not in taken:
                raise ValueError(f"memory: {k!r} is not a parameter of {self.function!r} "
                                 f"(it takes: {', '.join(names)})")
        # The binding itself, against the field table (no image yet): unknown, ambiguous, bad writes.
        shape = SimpleNamespace(node={k: np.zeros(1) for k in _NODE}, agg={k: np.zeros(1) for k in _AGG})
        memory = {k: np.zeros(1) for k in self.memory}
        try:
            bind_kernel(fn, where=f"function {self.function!r}", img=shape, ctx=np.zeros(8), memory=memory,
                        params=dict(self.params), writes=tuple(self.writes))
        except BindError as exc:
            raise ValueError(str(exc)) from None
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

    def __init__(self, params, n_nodes: int):
        super().__init__(params, n_nodes)
        self.writes = tuple(dict.fromkeys(w for st in params.steps for w in st.writes))

    def bind(self, img, ctx):
        calls = []
        for k, step in enumerate(self.params.steps):
            fn = load_function(step.function)
            memory = {name: self.mem(img, f"{k}.{name}") for name in step.memory}
            args = bind_kernel(fn, where=f"user step {k} ({step.function})", img=img, ctx=ctx, memory=memory,
                               params=dict(step.params), writes=tuple(step.writes))
            calls.append((fn, args))
        if len(calls) == 1:
            fn, args = calls[0]
            return lambda: fn(*args)

        def step() -> None:
            for fn, args in calls:
                fn(*args)

        return step
