"""YAML loading that remembers where every key came from.

PyYAML keeps the last of two equal keys silently; here that is an error, and
every value's line is recorded by its key path so that validation errors can
point at the file and line the user has to change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

__all__ = ["ConfigError", "Located", "load_yaml"]

Path_ = tuple[Any, ...]


class ConfigError(ValueError):
    """A configuration is not valid. Each problem names file, line, key path and what is expected."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class Located:
    """Parsed YAML data plus the line (1-based) of each key path."""

    def __init__(self, data: Any, lines: dict[Path_, int], source: str):
        self.data = data
        self.lines = lines
        self.source = source

    def line_of(self, path: Path_) -> int | None:
        """Line of the deepest prefix of `path` that the document has."""
        for n in range(len(path), -1, -1):
            line = self.lines.get(tuple(path[:n]))
            if line is not None:
                return line
        return None

    def where(self, path: Path_) -> str:
        line = self.line_of(path)
        return f"{self.source}:{line}" if line else self.source


def format_path(path: Path_) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _build(node: yaml.Node, path: Path_, lines: dict, problems: list[str], source: str) -> Any:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict = {}
        for knode, vnode in node.value:
            key = yaml.SafeLoader.construct_scalar(_LOADER, knode) if isinstance(knode, yaml.ScalarNode) else None
            if not isinstance(key, str):
                problems.append(f"{source}:{knode.start_mark.line + 1}: {format_path(path)}: "
                                f"keys must be plain strings")
                continue
            if key in out:
                problems.append(f"{source}:{knode.start_mark.line + 1}: {format_path(path + (key,))}: "
                                f"duplicate key (first given on line {lines[path + (key,)]})")
                continue
            lines[path + (key,)] = knode.start_mark.line + 1
            out[key] = _build(vnode, path + (key,), lines, problems, source)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_build(item, path + (i,), lines, problems, source) for i, item in enumerate(node.value)]
    return _LOADER.construct_object(node, deep=True)


_LOADER = yaml.SafeLoader("")


def load_yaml(text: str, source: str = "<string>") -> Located:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise ConfigError([f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}"]) from None
    if root is None:
        raise ConfigError([f"{source}: the file is empty (expected a mapping with a 'nodes' list)"])
    lines: dict[Path_, int] = {}
    problems: list[str] = []
    data = _build(root, (), lines, problems, source)
    if problems:
        raise ConfigError(problems)
    return Located(data, lines, source)


def load_yaml_file(path: str | Path) -> Located:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{p}: cannot read: {exc.strerror}"]) from None
    return load_yaml(text, str(p))
