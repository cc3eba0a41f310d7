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
        if isinstance(part, str) and not (part.isprintable() and part.strip() == part and part):
            out += f"[{part!r}]"  # a key with a newline must not split the one-line error
        else:
            out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


# Limits that turn hostile or broken documents into errors instead of a crash or a hang:
# PyYAML composes and this module builds recursively, and aliases can expand a small
# text exponentially ("billion laughs") or into a cycle.
MAX_DEPTH = 64
MAX_VALUES = 2_000_000
_PLAIN_TAGS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq")


def _check_depth(text: str, source: str) -> None:
    """Nesting depth from the event stream (the parser itself does not recurse)."""
    depth = 0
    for ev in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(ev, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise ConfigError([f"{source}:{ev.start_mark.line + 1}: nested more than {MAX_DEPTH} levels deep"])
        elif isinstance(ev, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for kv in node.value for n in kv]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def _check_graph(root: yaml.Node, source: str) -> None:
    """Expanded size and depth, with aliases followed, by one iterative walk of the node graph."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, post = stack.pop()
        k = id(node)
        where = f"{source}:{node.start_mark.line + 1}"
        if post:
            kids = _children(node)
            size[k] = 1 + sum(size[id(c)] for c in kids)
            depth[k] = 1 + max((depth[id(c)] for c in kids), default=0)
            if depth[k] > MAX_DEPTH:
                raise ConfigError([f"{where}: aliases nest the document more than {MAX_DEPTH} levels deep"])
            if size[k] > MAX_VALUES:
                raise ConfigError([f"{where}: aliases expand the document to more than {MAX_VALUES} values"])
            continue
        if k in size:
            continue
        if k in depth:  # entered, not finished: an alias to one of its own ancestors
            raise ConfigError([f"{where}: recursive alias (a value that contains itself)"])
        depth[k] = 0
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node))


def _build(node: yaml.Node, path: Path_, lines: dict, problems: list[str], source: str) -> Any:
    lines.setdefault(path, node.start_mark.line + 1)
    if not isinstance(node, yaml.ScalarNode) and node.tag not in _PLAIN_TAGS:
        # `!!set {a, b}`, `!!omap [...]`, `!foo {}` would otherwise be silently read as plain data
        problems.append(f"{source}:{node.start_mark.line + 1}: {format_path(path)}: tag {node.tag} "
                        f"is not supported (expected a plain mapping or list)")
        return None
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
    try:
        return _LOADER.construct_object(node, deep=True)
    # SafeConstructor lets through whatever int()/float()/date() raise on bad text
    # (`!!int abc`: ValueError, `!!int ''`: IndexError); any of them is this value's error.
    except Exception as exc:  # noqa: BLE001
        problems.append(f"{source}:{node.start_mark.line + 1}: {format_path(path)}: cannot read value "
                        f"{node.value!r} tagged {node.tag}: {_one_line(getattr(exc, 'problem', None) or exc)}")
        return None


_LOADER = yaml.SafeLoader("")


def _one_line(msg: object) -> str:
    return " ".join(str(msg).split())


def load_yaml(text: str, source: str = "<string>") -> Located:
    try:
        _check_depth(text, source)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow; it has a position, not a mark
        line = text.count("\n", 0, exc.position) + 1 if isinstance(text, str) else 1
        ch = ord(exc.character) if isinstance(exc.character, str) else exc.character
        raise ConfigError([f"{source}:{line}: not valid YAML: character U+{ch:04X} is not allowed ({exc.reason})"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        what = getattr(exc, "problem", None) or getattr(exc, "context", None) or exc
        raise ConfigError([f"{source}:{mark.line + 1 if mark else 1}: not valid YAML: {_one_line(what)}"]) from None
    if root is None:
        raise ConfigError([f"{source}:1: the file is empty (expected a mapping with a 'nodes' list)"])
    _check_graph(root, source)
    lines: dict[Path_, int] = {}
    problems: list[str] = []
    data = _build(root, (), lines, problems, source)
    if problems:
        raise ConfigError(problems)
    return Located(data, lines, source)


def load_yaml_file(path: str | Path) -> Located:
    from vbatt.config.textfile import read_text_file  # it raises this module's ConfigError

    return load_yaml(read_text_file(path, "a UTF-8 text YAML file"), str(Path(path)))
