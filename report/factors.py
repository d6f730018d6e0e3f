"""A run's factors when nobody wrote a run.json: the `--factors` option and the value words.

`--factors` takes either a pattern matched against each run folder's name,
`"{initializer}_bs{batch_size}_{batch_norm}"` (fields are `RunSpec` fields or their
short names; `{_}` matches text that is not a factor), or a .csv / .toml file mapping
runs to factors:

    run,initializer,batch_size,batch_norm          # runs.csv
    xavier_bs64_bn,glorot_normal,64,on

    [runs.xavier_bs64_bn]                           # runs.toml ([runs] may be left out)
    initializer = "xavier"
    batch_size = 64

Values are parsed to the field's type (`to_value`): ints and floats as numbers, batch norm
from its usual words (bn/nobn, on/off, true/false, with/without, ...), initializers
through the documents' words (xavier → glorot_normal, he → he_normal, ...).
"""
from __future__ import annotations

import csv
import dataclasses
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contract.spec import RUN_FIELDS, RunSpec, SpecError, parse_hidden

# Other spellings of the RunSpec fields, as hparams, CSV columns and pattern fields.
FIELD_ALIASES = {
    "bs": "batch_size", "batch": "batch_size", "batchsize": "batch_size",
    "lr": "learning_rate", "learningrate": "learning_rate",
    "init": "initializer", "initialiser": "initializer", "initialization": "initializer",
    "kernel_initializer": "initializer", "weight_init": "initializer",
    "bn": "batch_norm", "batchnorm": "batch_norm", "use_bn": "batch_norm", "use_batch_norm": "batch_norm",
    "batch_normalization": "batch_norm",
    "act": "activation", "opt": "optimizer", "arch": "architecture", "model": "architecture",
    "units": "hidden", "hidden_units": "hidden",
    "ep": "epochs", "num_epochs": "epochs", "n_epochs": "epochs", "random_seed": "seed",
}
# The documents' words for Keras initializers (trainer/spec.py has the same table; the
# report imports no trainer module).
INITIALIZER_ALIASES = {
    "xavier": "glorot_normal", "xavier_normal": "glorot_normal", "glorot": "glorot_normal",
    "xavier_uniform": "glorot_uniform", "uniform": "random_uniform", "normal": "random_normal",
    "he": "he_normal", "kaiming": "he_normal", "kaiming_normal": "he_normal",
    "kaiming_uniform": "he_uniform", "lecun": "lecun_normal",
}
BN_ON = ("bn", "on", "true", "yes", "y", "1", "with", "withbn", "batchnorm", "bnon", "usebn", "bntrue")
BN_OFF = ("nobn", "off", "false", "no", "n", "0", "without", "withoutbn", "none", "plain", "nonorm",
          "bnoff", "bnfalse", "nobatchnorm")
BN_WORDS = "bn/nobn, on/off, true/false, yes/no, with/without, 1/0"
IGNORED = "_"
FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(RunSpec)}
# What a pattern field matches, by type: so "{initializer}_{batch_norm}" splits
# "glorot_normal_bn" after "normal" (the batch-norm field only matches its words).
_WORD_RE = "|".join(sorted({re.escape(w) for w in BN_ON + BN_OFF} | {"with_bn", "without_bn", "no_bn", "bn_on",
                                                                      "bn_off", "use_bn", "no_batchnorm"},
                           key=len, reverse=True))
TYPE_RE = {"int": r"\d+", "float": r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?", "bool": f"(?i:{_WORD_RE})",
           "hidden": r"\d+(?:x\d+)*|none", "str": r"[^/]+?"}
CSV_HINT = 'a CSV whose header is run,<field>,... (e.g. run,initializer,batch_size,batch_norm)'


class FactorsError(ValueError):
    """A `--factors` value that cannot be used; the message names the fix."""


def field_name(name: str) -> str | None:
    """The RunSpec field a name means (itself or an alias), or None."""
    key = str(name).strip().lower().replace("-", "_").replace(" ", "_")
    key = FIELD_ALIASES.get(key, key)
    return key if key in RUN_FIELDS else None


def to_value(name: str, raw: Any) -> Any:
    """`raw` (text from a folder name or a CSV, or a TOML/hparams value) as the field's
    type; ValueError says what was expected."""
    kind = FIELD_TYPES[name]
    if name == "hidden":
        if isinstance(raw, (list, tuple)):
            return tuple(int(v) for v in raw)
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return (int(raw),)
        text = re.sub(r"[\s\[\]()]", "", str(raw)).replace(",", "x")
        try:
            return parse_hidden(text)
        except SpecError:
            raise ValueError(f"hidden {raw!r} is not layer widths like 128 or 128x64") from None
    if kind in ("bool", bool):
        if isinstance(raw, bool):
            return raw
        word = re.sub(r"[-_\s]", "", str(raw).strip().lower())
        if word in BN_ON:
            return True
        if word in BN_OFF:
            return False
        raise ValueError(f"{name} {raw!r} is not an on/off word ({BN_WORDS})")
    if kind in ("int", int):
        try:
            number = float(raw)
        except (TypeError, ValueError):
            number = float("nan")
        if isinstance(raw, bool) or not number.is_integer():
            raise ValueError(f"{name} {raw!r} is not a whole number")
        return int(number)
    if kind in ("float", float):
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise ValueError(f"{name} {raw!r} is not a number") from None
    text = str(raw).strip()
    if not text:
        raise ValueError(f"{name} is empty")
    if name == "initializer":
        key = text.lower().replace("-", "_").replace(" ", "_")
        return INITIALIZER_ALIASES.get(key, key)
    return text.lower() if name in ("activation", "optimizer", "architecture") else text


@dataclass
class FactorSource:
    """Where `--factors` takes factors from: a name pattern or a run → factors table."""
    text: str
    pattern: re.Pattern | None = None
    loose: re.Pattern | None = None                   # the pattern with every field as any text
    fields: tuple[str, ...] = ()
    table: dict[str, dict[str, Any]] | None = None   # run (as written in the file) → typed values
    used: set = dataclasses.field(default_factory=set)  # table keys that matched a run

    @property
    def kind(self) -> str:
        return "pattern" if self.pattern is not None else "file"

    def lookup(self, run: str) -> tuple[dict[str, Any] | None, str]:
        """(factors, "") for a run (its path under the log folder), or (None, why not)."""
        name = run.rsplit("/", 1)[-1]
        if self.pattern is not None:
            subject = run if "/" in self.text else name
            m = self.pattern.fullmatch(subject)
            if m is None:
                m = self.loose.fullmatch(subject) if self.loose is not None else None
                if m is None:
                    return None, f"its name does not match --factors {self.text!r}"
            out = {}
            for group, raw in m.groupdict().items():
                field = self.fields[int(group[1:])]
                try:
                    out[field] = to_value(field, raw)
                except ValueError as exc:
                    return None, f"--factors {self.text!r} reads {exc}"
            return out, ""
        assert self.table is not None
        for key in (run, name):
            if key in self.table:
                self.used.add(key)
                return dict(self.table[key]), ""
        return None, f"{Path(self.text).name} has no row for {run!r} (nor {name!r})"


def parse_factors(text: str) -> FactorSource:
    """The `--factors` value as a FactorSource; FactorsError names the fix."""
    if "{" in text or "}" in text:
        return _pattern(text)
    path = Path(text)
    if path.suffix.lower() not in (".csv", ".toml"):
        raise FactorsError(f"--factors {text!r} is neither a pattern with {{field}} names (e.g. "
                           f"\"{{initializer}}_bs{{batch_size}}_{{batch_norm}}\") nor a .csv or .toml file")
    if not path.is_file():
        raise FactorsError(f"--factors {text}: no such file; give {CSV_HINT}, or a pattern")
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise FactorsError(f"--factors {text}: cannot be read ({exc})") from None
    table = _csv(text, raw) if path.suffix.lower() == ".csv" else _toml(text, raw)
    return FactorSource(text=text, table=table)


def factors_error(text: str) -> str | None:
    """For the command line's checks: why `--factors` is unusable, or None."""
    try:
        parse_factors(text)
    except FactorsError as exc:
        return str(exc)
    return None


def _pattern(text: str) -> FactorSource:
    parts, loose, fields, pos = [], [], [], 0
    for m in re.finditer(r"\{([^{}]*)\}", text):
        literal = text[pos:m.start()]
        if "{" in literal or "}" in literal:
            raise FactorsError(f"--factors {text!r} has an unmatched brace; write fields as {{name}}")
        parts.append(re.escape(literal))
        loose.append(re.escape(literal))
        name = m.group(1).strip()
        if name == IGNORED:
            parts.append(r"[^/]*?")
            loose.append(r"[^/]*?")
        else:
            field = field_name(name)
            if field is None:
                raise FactorsError(f"--factors {text!r}: {{{name}}} is no run field; valid fields: "
                                   f"{', '.join(RUN_FIELDS)} (or {{_}} for text that is no factor)")
            if field in fields:
                raise FactorsError(f"--factors {text!r} names {field} twice")
            kind = "hidden" if field == "hidden" else str(getattr(FIELD_TYPES[field], "__name__", FIELD_TYPES[field]))
            parts.append(f"(?P<f{len(fields)}>{TYPE_RE.get(kind, TYPE_RE['str'])})")
            loose.append(f"(?P<f{len(fields)}>[^/]+?)")
            fields.append(field)
        pos = m.end()
    rest = text[pos:]
    if "{" in rest or "}" in rest:
        raise FactorsError(f"--factors {text!r} has an unmatched brace; write fields as {{name}}")
    if not fields:
        raise FactorsError(f"--factors {text!r} names no field; e.g. \"{{initializer}}_bs{{batch_size}}\"")
    parts.append(re.escape(rest))
    loose.append(re.escape(rest))
    return FactorSource(text=text, pattern=re.compile("".join(parts)), loose=re.compile("".join(loose)),
                        fields=tuple(fields))


def _typed_row(source: str, where: str, row: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for column, raw in row.items():
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            continue  # an empty cell: that field keeps its default
        field = field_name(column)
        try:
            out[field] = to_value(field, raw)
        except ValueError as exc:
            raise FactorsError(f"--factors {source}, {where}: {exc}") from None
    return out


def _check_columns(source: str, columns) -> None:
    unknown = [c for c in columns if field_name(c) is None]
    if unknown:
        raise FactorsError(f"--factors {source}: {', '.join(map(repr, unknown))} is no run field; valid fields: "
                           f"{', '.join(RUN_FIELDS)}")
    fields = [field_name(c) for c in columns]
    doubled = sorted({f for f in fields if fields.count(f) > 1})
    if doubled:
        raise FactorsError(f"--factors {source} gives {', '.join(doubled)} twice")


def _csv(source: str, raw: str) -> dict[str, dict[str, Any]]:
    rows = list(csv.reader(raw.splitlines()))
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if not rows:
        raise FactorsError(f"--factors {source} is empty; give {CSV_HINT}")
    header = [c.strip() for c in rows[0]]
    if not header or header[0].lower() not in ("run", "name", "folder"):
        raise FactorsError(f"--factors {source}: the first column must be `run` (the run folder's name); give "
                           f"{CSV_HINT}")
    _check_columns(source, header[1:])
    table: dict[str, dict[str, Any]] = {}
    for number, row in enumerate(rows[1:], start=2):
        if len(row) > len(header):
            raise FactorsError(f"--factors {source}, line {number}: {len(row)} cells, the header has {len(header)}")
        run = row[0].strip().strip("/")
        if not run:
            raise FactorsError(f"--factors {source}, line {number}: no run name")
        if run in table:
            raise FactorsError(f"--factors {source}, line {number}: run {run!r} is given twice")
        table[run] = _typed_row(source, f"line {number}", dict(zip(header[1:], row[1:])))
    return table


def _toml(source: str, raw: str) -> dict[str, dict[str, Any]]:
    try:
        doc = tomllib.loads(raw)
    except tomllib.TOMLDecodeError as exc:
        raise FactorsError(f"--factors {source} is not valid TOML ({exc})") from None
    runs = doc["runs"] if isinstance(doc.get("runs"), dict) and len(doc) == 1 else doc
    table = {}
    for run, row in runs.items():
        if not isinstance(row, dict):
            raise FactorsError(f"--factors {source}: {run!r} is not a table; write [runs.\"<run>\"] then "
                               "field = value lines")
        _check_columns(source, list(row))
        table[run.strip("/")] = _typed_row(source, f"[runs.{run!r}]", row)
    if not table:
        raise FactorsError(f"--factors {source} names no run; write [runs.\"<run>\"] tables")
    return table


# -- placing a run -----------------------------------------------------------------------------

def from_hparams(hparams: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(run fields, hparams that are no run field, why not) from logged hparams."""
    fields, other = {}, {}
    for name, raw in hparams.items():
        f = field_name(name)
        if f is None:
            other[name] = raw
            continue
        try:
            fields[f] = to_value(f, raw)
        except ValueError as exc:
            return {}, other, f"its hparams give {exc}"
    return fields, other, ""


def place(run: str, hparams: dict[str, Any] | None, source: FactorSource | None) -> tuple[dict | None, dict, str]:
    """(the run's fields, hparams that are no run field, "") or (None, {}, why not and the
    fix): hparams first, then --factors for the fields they lack; never a guess."""
    fields, other, why = from_hparams(hparams or {})
    if why:
        return None, {}, f"{why}, run excluded"
    given, reason = source.lookup(run) if source else ({}, "")
    if given is None and not fields:
        return None, {}, f"no hparams and {reason}; {fix(run)}, run excluded"
    for name, value in (given or {}).items():
        if name in fields and fields[name] != value:
            return None, {}, (f"its hparams say {name} {fields[name]!r}, --factors says {value!r}; correct one of "
                              "them, run excluded")
        fields[name] = value
    if not fields:
        if source is None:
            return None, {}, f"no hparams and no --factors; {fix(run)}, run excluded"
        return None, {}, f"no hparams and {reason or '--factors gives it no field'}; {fix(run)}, run excluded"
    return fields, other, ""


def fix(run: str) -> str:
    """'give --factors "{initializer}_bs{batch_size}" or a CSV run,initializer,batch_size'."""
    pattern = suggest(run.rsplit("/", 1)[-1])
    fields = [f for f in re.findall(r"\{(\w+)\}", pattern) if f != IGNORED]
    return f"give --factors \"{pattern}\" or a CSV run,{','.join(fields)} (--factors runs.csv)"


def suggest(name: str) -> str:
    """A pattern for a run name, from the words it uses ("xavier_bs64_bn" →
    "{initializer}_bs{batch_size}_{batch_norm}"); only ever shown, never applied."""
    known = set(INITIALIZER_ALIASES) | set(INITIALIZER_ALIASES.values())
    tokens = re.split(r"([_\-])", name)
    out, used, i = [], set(), 0
    while i < len(tokens):
        t = tokens[i].lower()
        if i + 2 < len(tokens) and f"{t}_{tokens[i + 2].lower()}" in known and "initializer" not in used:
            out.append("{initializer}"), used.add("initializer")
            i += 3
            continue
        m = re.fullmatch(r"(bs|batch|b)(\d+)|(lr)([\d.e-]+)|(s|seed)(\d+)|(ep|epochs?|e)(\d+)", t)
        if t in known and "initializer" not in used:
            out.append("{initializer}"), used.add("initializer")
        elif re.sub(r"[-_]", "", t) in BN_ON + BN_OFF and not t.isdigit() and "batch_norm" not in used:
            out.append("{batch_norm}"), used.add("batch_norm")
        elif m and m.group(1) and "batch_size" not in used:
            out.append(tokens[i][:len(m.group(1))] + "{batch_size}"), used.add("batch_size")
        elif m and m.group(3) and "learning_rate" not in used:
            out.append(tokens[i][:2] + "{learning_rate}"), used.add("learning_rate")
        elif m and m.group(5) and "seed" not in used:
            out.append(tokens[i][:len(m.group(5))] + "{seed}"), used.add("seed")
        elif m and m.group(7) and "epochs" not in used:
            out.append(tokens[i][:len(m.group(7))] + "{epochs}"), used.add("epochs")
        else:
            out.append(tokens[i])
        i += 1
    pattern = "".join(out)
    return pattern if used else "{initializer}_bs{batch_size}"
