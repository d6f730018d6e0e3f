"""The experiment file as it ran: its TOML text with the command line's overrides
(--dataset, --epochs, --limit, --data) written in and marked, for experiment.json's
`source_text` (the report's "Code Used")."""
from __future__ import annotations

import json
import math
import os
import re
from typing import Any

import tomllib
from dataclasses import dataclass

OVERRIDES = {"dataset": ("data", "dataset"), "limit": ("data", "limit"), "path": ("data", "path"),
             "epochs": ("run", "epochs"), "gradient_noise": ("gradient_noise", "enabled")}
_FROM_CLI = "# from the command line"


def given_overrides(overrides: dict) -> dict[str, Any]:
    """The overrides that took effect, as `_Checker.experiment` applies them: a dataset or
    path only when non-empty (`or`), epochs and limit when not None; a path made absolute
    (it was read relative to the working folder, which nothing else records)."""
    out = {}
    for key in OVERRIDES:
        value = overrides.get(key)
        if value is None or (key in ("dataset", "path") and not value):
            continue
        out[key] = os.path.abspath(value) if key == "path" else value
    return out


def as_run_text(source: str, overrides: dict[str, Any]) -> str:
    """The experiment file's text with the command-line `overrides` (keys of OVERRIDES)
    written in, so it reads as the experiment ran; comments and order are kept.

    In the override's table, `key = value` becomes `key = <new>  # from the command line
    (the file says <value>)`; a key the table lacks is added below its header, and a
    missing table at the end. With "epochs", a [grid] epochs line is commented out (the
    override gives every run that value and drops the axis, so the run names stay as they
    ran). The result parses with tomllib and, loaded with no overrides, expands to the runs
    the overrides gave. Should the file be written in a way these line edits cannot
    express (dotted keys, inline tables), the text is rebuilt from the parsed file, its
    comments lost, under a note saying so.
    """
    overrides = {k: v for k, v in overrides.items() if k in OVERRIDES and v is not None}
    if not overrides:
        return source
    want = _overridden(tomllib.loads(source), overrides)
    try:
        text = _edit_lines(source, overrides)
        if tomllib.loads(text) == want:
            return text
    except (ValueError, tomllib.TOMLDecodeError):
        pass
    return (f"# The experiment file with the command-line options {', '.join(sorted(overrides))} applied,\n"
            "# rebuilt from its values: its comments and layout are not shown.\n" + _dump_toml(want))


def _overridden(doc: dict, overrides: dict) -> dict:
    """`doc` (parsed TOML) with the overrides applied as the loader applies them."""
    doc = {k: dict(v) if isinstance(v, dict) else v for k, v in doc.items()}
    for key, value in overrides.items():
        table, name = OVERRIDES[key]
        doc.setdefault(table, {})[name] = value
    if "epochs" in overrides and isinstance(doc.get("grid"), dict):
        doc["grid"].pop("epochs", None)
    return doc


def toml_value(value: Any) -> str:
    """A TOML literal for a str, bool, int, float, date, list or dict (an inline table).
    Strings as json.dumps writes them, which TOML's basic strings read back the same
    (DEL, which TOML wants escaped, as \\u007f)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    if hasattr(value, "isoformat"):  # tomllib's dates, times and date-times
        return value.isoformat()
    raise ValueError(f"no TOML literal for {type(value).__name__}")


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else toml_value(key)


def _dump_toml(doc: dict) -> str:
    lines = [f"{_toml_key(k)} = {toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for name, table in doc.items():
        if isinstance(table, dict):
            lines += ["", f"[{_toml_key(name)}]"] + [f"{_toml_key(k)} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines).lstrip("\n") + "\n"


def _edit_lines(source: str, overrides: dict) -> str:
    nl = "\r\n" if "\r\n" in source else "\n"
    statements = _statements(source)
    keys = {s.path: s for s in statements if s.kind == "key"}
    headers = {s.path: s for s in statements if s.kind == "table"}
    edits: list[tuple[int, int, str]] = []  # (start, end, replacement): offsets into source
    appended: dict[str, list[str]] = {}
    for key in (k for k in OVERRIDES if k in overrides):
        value = overrides[key]
        table, name = OVERRIDES[key]
        line = f"{name} = {toml_value(value)}  {_FROM_CLI}"
        found = keys.get((table, name))
        if found is not None:
            old = " ".join(source[found.value_start:found.value_end].split())
            old = old if len(old) <= 80 else old[:79] + "…"
            edits.append((found.start, found.end, f"{found.indent}{found.key_text} = {toml_value(value)}  "
                          f"{_FROM_CLI} (the file says {old}){found.newline or nl}"))
        elif (table,) in headers:
            header = headers[(table,)]
            before = "" if header.newline else nl  # the header ends a file that has no last newline
            edits.append((header.end, header.end, before + header.indent + line + nl))
        else:
            appended.setdefault(table, []).append(line)
    axis = keys.get(("grid", "epochs"))
    if "epochs" in overrides and axis is not None:
        body = source[axis.start:axis.end].splitlines()
        note = (f"{axis.indent}{_FROM_CLI}: epochs = {toml_value(overrides['epochs'])} for every run, "
                "so this grid axis is off:")
        edits.append((axis.start, axis.end, nl.join([note] + [f"{axis.indent}# {b.removeprefix(axis.indent)}" for b in body]) + nl))
    text = source
    # From the end back, so earlier offsets stay valid; where a header's next line is replaced,
    # that first, then the lines added below the header, last first, so they keep their order.
    for _, (start, end, replacement) in sorted(enumerate(edits), key=lambda e: (*e[1][:2], e[0]), reverse=True):
        text = text[:start] + replacement + text[end:]
    if appended:
        if text and not text.endswith("\n"):
            text += nl
        for table, lines in appended.items():
            text += (nl if text.strip() else "") + f"[{table}]{nl}" + nl.join(lines) + nl
    return text


@dataclass
class _Statement:
    kind: str            # "table" ([name]), "array" ([[name]]) or "key" (key = value)
    path: tuple          # the table's name, or the key's full name (its table's first)
    start: int           # offset of the statement's first line
    end: int             # offset after its last line and that line's newline
    newline: str = ""    # that newline ("" at the end of a file without one)
    indent: str = ""
    key_text: str = ""   # the key as written
    value_start: int = 0
    value_end: int = 0   # the value's text ends here, before any trailing comment


def _statements(text: str) -> list[_Statement]:
    """The top-level statements of a TOML text, in order (ValueError if it cannot tell)."""
    out, pos, table = [], 0, ()
    while pos < len(text):
        eol = text.find("\n", pos)
        eol = len(text) if eol < 0 else eol + 1
        line = text[pos:eol]
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            pos = eol
            continue
        indent = line[:len(line) - len(line.lstrip())]
        if stripped.startswith("["):
            parsed = tomllib.loads(line)
            path = _only_path(parsed)
            kind = "table" if isinstance(_walk(parsed, path), dict) else "array"
            table = path if kind == "table" else (None,)
            out.append(_Statement(kind, path, pos, eol, _newline(line), indent))
            pos = eol
            continue
        equals = _find_equals(text, pos, eol)
        key_text = text[pos:equals].strip()
        value_end, end = _value_end(text, equals + 1)
        key = _only_path(tomllib.loads(f"{key_text} = 0"))
        out.append(_Statement("key", table + key, pos, end, _newline(text[pos:end]), indent,
                              key_text, equals + 1, value_end))
        pos = end
    return out


def _newline(line: str) -> str:
    return "\r\n" if line.endswith("\r\n") else "\n" if line.endswith("\n") else ""


def _only_path(doc: Any) -> tuple:
    """The dotted name of the one key or table a one-statement document defines."""
    path = []
    while isinstance(doc, dict) and len(doc) == 1:
        (key, doc), = doc.items()
        path.append(key)
    return tuple(path)


def _walk(doc: Any, path: tuple) -> Any:
    for key in path:
        doc = doc[key]
    return doc


def _skip_string(text: str, i: int) -> int:
    """The offset just after the TOML string that starts at text[i]."""
    for quote in ('"""', "'''"):
        if text.startswith(quote, i):
            j = i + 3
            while j < len(text):
                if quote == '"""' and text[j] == "\\":
                    j += 2
                elif text.startswith(quote, j):
                    end = j + 3
                    while end < len(text) and text[end] == quote[0] and end - j < 5:
                        end += 1  # up to two quotes just before the closing three belong to the string
                    return end
                else:
                    j += 1
            raise ValueError("unterminated string")
    quote, j = text[i], i + 1
    while j < len(text) and text[j] not in (quote, "\n"):
        j += 2 if quote == '"' and text[j] == "\\" else 1
    if j >= len(text) or text[j] != quote:
        raise ValueError("unterminated string")
    return j + 1


def _find_equals(text: str, i: int, eol: int) -> int:
    while i < eol:
        if text[i] in "\"'":
            i = _skip_string(text, i)
        elif text[i] == "=":
            return i
        else:
            i += 1
    raise ValueError("no '=' in a key line")


def _value_end(text: str, i: int) -> tuple[int, int]:
    """(where the value's text ends, the offset after the statement's last newline) for a
    value starting at text[i]; arrays and multi-line strings may span lines."""
    depth = 0
    while i < len(text):
        c = text[i]
        if c in "\"'":
            i = _skip_string(text, i)
        elif c == "#":
            eol = text.find("\n", i)
            eol = len(text) if eol < 0 else eol
            if depth == 0:
                return i, min(eol + 1, len(text))
            i = eol
        elif c == "\n":
            if depth == 0:
                return i, i + 1
            i += 1
        else:
            depth += (c in "[{") - (c in "]}")
            i += 1
    return len(text), len(text)


