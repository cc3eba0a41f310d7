"""Reading a text file the user named (a config, a trace, a program).

Python's own decoding errors name neither the file nor what it should have been,
and a NUL byte or a UTF-16 file decodes as "valid" junk further on. Here every
such file is checked once: a binary file, another encoding, a directory or an
unreadable path is a `ConfigError` of one line naming the file, the line and
byte offset where known, and what was expected.
"""

from __future__ import annotations

import codecs
from pathlib import Path

from vbatt.config.yamlsrc import ConfigError

__all__ = ["read_text_file", "text_problem"]

_BOMS = (  # the 32-bit marks first: UTF-32-LE begins with the UTF-16-LE mark
    (codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"),
)


def _line(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def text_problem(data: bytes, source: str, expected: str) -> str | None:
    """Why `data` is not UTF-8 text (one line, starting with `source`), or None when it is."""
    for bom, name in _BOMS:
        if data.startswith(bom):
            return f"{source}:1: the file is {name} text (byte order mark at byte 0); expected {expected}"
    nul = data.find(b"\0")
    if nul >= 0:
        return (f"{source}:{_line(data, nul)}: binary data (NUL byte at byte offset {nul}), not text; "
                f"expected {expected}")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return (f"{source}:{_line(data, exc.start)}: not UTF-8 (byte 0x{data[exc.start]:02X} at byte offset "
                f"{exc.start}: {exc.reason}); expected {expected}")
    return None


def read_text_file(path: str | Path, expected: str) -> str:
    """The text of `path`, decoded as UTF-8 (a leading UTF-8 byte order mark is dropped).

    `expected` completes "expected ...", e.g. "a UTF-8 text YAML file"."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except IsADirectoryError:
        raise ConfigError([f"{p}: is a directory; expected {expected}"]) from None
    except OSError as exc:
        raise ConfigError([f"{p}: cannot read: {exc.strerror or exc}; expected {expected}"]) from None
    problem = text_problem(data, str(p), expected)
    if problem:
        raise ConfigError([problem])
    return data.decode("utf-8-sig")
