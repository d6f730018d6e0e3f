"""Experiment files: TOML in, a validated `Experiment` of frozen `RunSpec`s out.

The spec itself, which both stages share, is `contract.spec.RunSpec`; this module checks
what a user wrote and expands the grid.
"""
from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from contract.layout import TEMPLATES, TEXT_LIMITS, control_characters
from contract.spec import (ESTIMATORS, NOISE_FIELDS, PER_EXAMPLE, PROBE, RUN_FIELDS, NoiseSettings, RunSpec,
                           format_value)
from trainer.as_run import given_overrides

PROJECT_ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS_DIR = PROJECT_ROOT / "experiments"

ARCHITECTURES = ("mlp", "cnn", "linear")
ACTIVATIONS = ("relu", "tanh", "sigmoid", "elu", "selu", "gelu", "swish", "softplus", "linear")
OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop", "adagrad", "nadam")
LOSSES = ("sparse_categorical_crossentropy", "categorical_crossentropy")
DATASETS = ("mnist", "fashion_mnist")
# How runs train: "fused" packs runs that share their data order (trainer.packed), and what
# it cannot express (a CNN, one-hot labels) goes to "compiled", one run per program
# (trainer.compiled); "compiled" for every run; "keras" is one `model.fit` per run.
ENGINES = ("fused", "keras", "compiled")
PRECISIONS = ("float32", "bfloat16")  # bfloat16: mixed (float32 weights), compiled engine
FUSED_ARCHITECTURES = ("mlp", "linear")
FUSED_LOSSES = ("sparse_categorical_crossentropy",)
# Keras initializer names that take a seed; the documents' words map onto them.
INITIALIZERS = (
    "glorot_normal", "glorot_uniform", "he_normal", "he_uniform", "lecun_normal",
    "lecun_uniform", "random_normal", "random_uniform", "truncated_normal", "orthogonal",
)
INITIALIZER_ALIASES = {
    "xavier": "glorot_normal", "xavier_normal": "glorot_normal", "glorot": "glorot_normal",
    "xavier_uniform": "glorot_uniform", "uniform": "random_uniform", "normal": "random_normal",
    "he": "he_normal", "kaiming": "he_normal", "kaiming_normal": "he_normal",
    "kaiming_uniform": "he_uniform", "lecun": "lecun_normal",
}
# Above this many runs a grid needs `--confirm-large` (a typo like batch_size = [8, 16, ...]
# crossed with 20 seeds should not silently start a day of training).
MAX_RUNS_WITHOUT_CONFIRM = 500

# Short names for run directories; the full spec is in run.json and the hparams.
_NAME_KEYS = {
    "initializer": "init", "batch_size": "bs", "batch_norm": "bn", "learning_rate": "lr",
    "activation": "act", "architecture": "arch", "optimizer": "opt", "epochs": "ep",
}


class ExperimentError(Exception):
    """A user error in an experiment file or option; the message names the fix."""


@dataclass(frozen=True)
class Experiment:
    name: str
    source: str
    title: str
    author: str = ""
    id: str = ""
    date: str = ""
    template: str = "lab"
    objective: str = ""
    dataset: str = "fashion_mnist"
    validation: float | str = 0.1
    limit: int | None = None
    data_path: str | None = None
    steps_per_execution: int = 1
    engine: str = "fused"
    precision: str = "float32"
    pack: int = 8           # the most runs the fused engine trains together
    gradient_noise: NoiseSettings = NoiseSettings()
    grid_axes: tuple[str, ...] = ()
    runs: tuple[RunSpec, ...] = field(default=(), repr=False)
    # The command-line options that changed the file's values, only those given: keys of
    # OVERRIDES ("dataset", "epochs", "limit", "path"; a relative path made absolute, as
    # the data was read from it). `as_run_text` writes them into the file's text.
    overrides: dict[str, Any] = field(default_factory=dict, compare=False)

    def run_name(self, spec: RunSpec) -> str:
        """A readable directory name from the grid axes (seed always last)."""
        axes = [a for a in self.grid_axes if a != "seed"] + ["seed"]
        parts = [f"{_NAME_KEYS.get(a, a)}={format_value(getattr(spec, a))}" for a in axes]
        return re.sub(r"[^A-Za-z0-9._=,+-]", "_", ",".join(parts))

    def engine_of(self, spec: RunSpec) -> str:
        """The engine that trains `spec`: "keras" if asked for; "fused" where it can (an MLP
        or linear model with integer labels, in float32); else "compiled"."""
        if self.engine == "keras":
            return "keras"
        if self.engine == "fused" and self.precision == "float32" and spec.architecture in FUSED_ARCHITECTURES \
                and spec.loss in FUSED_LOSSES:
            return "fused"
        return "compiled"

    def noise_estimator(self, spec: RunSpec) -> str:
        """How `spec`'s gradient noise is measured ([gradient_noise] estimator, "auto"
        resolved): per-example norms for a model without batch norm on the fused engine
        (a batch of one example gives no estimate), the probe for the others."""
        chosen = self.gradient_noise.estimator
        if chosen == "auto":
            fits = self.engine_of(spec) == "fused" and not spec.uses_batch_norm and spec.batch_size > 1
            return PER_EXAMPLE if fits else PROBE
        return chosen

    @property
    def uses_probe(self) -> bool:
        """Whether some run measures gradient noise with the probe (which needs its big
        batch of training examples)."""
        return self.gradient_noise.enabled and any(self.noise_estimator(r) == PROBE for r in self.runs)

    def packs(self, indices: list[int]) -> list[tuple[int, ...]]:
        """The grid positions `indices` grouped into packs of at most `pack` runs that train
        together, ordered by their first member; a run only Keras can train is alone."""
        groups: dict[tuple, list[int]] = {}
        packs = []
        for i in indices:
            spec = self.runs[i]
            if self.engine_of(spec) == "fused":
                groups.setdefault(spec.pack_key(), []).append(i)
            else:
                packs.append((i,))
        for members in groups.values():
            packs += [tuple(members[s:s + self.pack]) for s in range(0, len(members), self.pack)]
        return sorted(packs)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name not in ("runs", "overrides")}
        d["grid_axes"] = list(self.grid_axes)
        d["gradient_noise"] = self.gradient_noise.to_dict()
        return d


# --- loading -------------------------------------------------------------------------

_TABLE_KEYS = {
    "experiment": {"title", "author", "id", "date", "template", "objective"},
    "data": {"dataset", "validation", "limit", "path"},
    "run": set(RUN_FIELDS),
    "grid": set(RUN_FIELDS) | {"repeats"},
    "execution": {"steps_per_execution", "engine", "pack", "precision"},
    "gradient_noise": set(NOISE_FIELDS),
}
# [gradient_noise] every (steps) is gone: it gave a batch-1024 run 16× fewer measurements.
_EVERY_GONE = ("was replaced by every_examples, counted in training examples so that every batch size gets "
               "the same measurements per epoch: e.g. every_examples = 12800 (every 200 steps at batch 64)")


def resolve_experiment_path(name_or_path: str) -> Path:
    """A path to a TOML file, or the name of a preset in experiments/."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ExperimentError(f"{path}: no such experiment file")
        return path
    preset = EXPERIMENTS_DIR / f"{name_or_path}.toml"
    if preset.is_file():
        return preset
    raise ExperimentError(
        f"unknown experiment {name_or_path!r}; presets: {', '.join(list_presets())} "
        "(or give a path to a .toml file)"
    )


def list_presets() -> list[str]:
    return sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.toml"))


def load_experiment(
    name_or_path: str,
    *,
    dataset: str | None = None,
    epochs: int | None = None,
    limit: int | None = None,
    data_path: str | None = None,
    confirm_large: bool = False,
    gradient_noise: bool | None = None,
) -> Experiment:
    """Read, validate and expand an experiment file; overrides come from the command line
    (`gradient_noise=False`: --no-gradient-noise, the probe off whatever the file says)."""
    path = resolve_experiment_path(name_or_path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ExperimentError(f"{path}: invalid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ExperimentError(f"{path}: not a UTF-8 text file") from None
    checker = _Checker(path)
    exp = checker.experiment(doc, path.stem, overrides={
        "dataset": dataset, "epochs": epochs, "limit": limit, "path": data_path,
        "gradient_noise": gradient_noise,
    }, confirm_large=confirm_large)
    checker.raise_if_any()
    assert exp is not None
    return exp


# --- the file as it ran ----------------------------------------------------------------

# A command-line override → the (table, key) of the file it replaces. --epochs also turns
# off a [grid] epochs axis (every run gets the one value; see _Checker.experiment).
class _Checker:
    """Collects every problem in a file so the user fixes them in one pass."""

    def __init__(self, path: Path):
        self.path = path
        self.problems: list[str] = []

    def fail(self, key: str, msg: str) -> None:
        self.problems.append(f"{key}: {msg}")

    def raise_if_any(self) -> None:
        if self.problems:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            raise ExperimentError(f"{self.path}: {len(self.problems)} problem(s)\n{lines}")

    def experiment(self, doc: dict, name: str, *, overrides: dict, confirm_large: bool):
        for table in doc:
            if table not in _TABLE_KEYS:
                self.fail(f"[{table}]", f"unknown table; valid tables: {', '.join(_TABLE_KEYS)}")
            elif not isinstance(doc[table], dict):
                self.fail(table, f"must be a table ([{table}]), got {type(doc[table]).__name__}")
        tables = {t: doc.get(t, {}) if isinstance(doc.get(t, {}), dict) else {} for t in _TABLE_KEYS}
        for table, keys in _TABLE_KEYS.items():
            gone = {"every"} if table == "gradient_noise" else set()
            for key in tables[table]:
                if key in gone:
                    self.fail(f"[{table}] {key}", _EVERY_GONE)
                elif key not in keys:  # a typo of "every" is pointed to its replacement
                    close = _suggest(key, keys | gone).replace("'every'", "'every_examples'")
                    self.fail(f"[{table}] {key}", f"unknown key{close}; valid keys: {', '.join(sorted(keys))}")

        if not _NAME_RE.fullmatch(name):
            self.fail("file name", f"{name!r} names the log folder, so it must be 1–100 letters, digits, "
                      "'.', '_', '+' or '-' and start with a letter or digit; rename the file")
        meta = tables["experiment"]
        strings = {k: self.string(f"[experiment] {k}", meta.get(k, ""), allow_empty=True,
                                  max_length=limit) for k, limit in TEXT_LIMITS.items()}
        date = meta.get("date", "")
        if not isinstance(date, str):  # TOML dates arrive as datetime.date
            date = date.isoformat() if hasattr(date, "isoformat") else self.string("[experiment] date", date)
        template = self.choice("[experiment] template", meta.get("template", "lab"), TEMPLATES)

        data = tables["data"]
        dataset = self.choice("[data] dataset", overrides["dataset"] or data.get("dataset", "fashion_mnist"), DATASETS)
        validation = self.validation(data.get("validation", 0.1))
        limit = overrides["limit"] if overrides["limit"] is not None else data.get("limit")
        if limit is not None:
            limit = self.positive_int("[data] limit" if overrides["limit"] is None else "--limit", limit)
        data_path = overrides["path"] or data.get("path")
        if data_path is not None:
            data_path = self.string("[data] path", data_path)
            if data_path and not Path(data_path).is_absolute():
                data_path = str((self.path.parent / data_path).resolve()) if overrides["path"] is None else data_path
        spe = self.positive_int("[execution] steps_per_execution",
                                tables["execution"].get("steps_per_execution", 1))
        engine = self.choice("[execution] engine", tables["execution"].get("engine", "fused"), ENGINES)
        pack = self.positive_int("[execution] pack", tables["execution"].get("pack", 8))
        precision = self.choice("[execution] precision", tables["execution"].get("precision", "float32"), PRECISIONS)
        if engine == "keras" and precision not in ("float32", _BAD):
            self.fail("[execution] precision", f'{precision!r} needs engine "fused" or "compiled" (keras: float32)')

        noise = self.noise_settings(tables["gradient_noise"])
        if overrides.get("gradient_noise") is False:  # --no-gradient-noise
            noise = dataclasses.replace(noise, enabled=False)

        base = self.run_fields("[run]", tables["run"], single=True)
        grid_doc = dict(tables["grid"])
        repeats = grid_doc.pop("repeats", None)
        axes = {k: self.run_fields("[grid]", {k: v}, single=False).get(k) for k, v in grid_doc.items()
                if k in RUN_FIELDS}
        axes = {k: v for k, v in axes.items() if v is not None}
        if repeats is not None:
            repeats = self.positive_int("[grid] repeats", repeats)
            if "seed" in axes:
                self.fail("[grid] repeats", "give either repeats or a seed list, not both")
            elif repeats:
                axes["seed"] = [base.get("seed", 0) + i for i in range(repeats)]
        if overrides["epochs"] is not None:
            base["epochs"] = self.positive_int("--epochs", overrides["epochs"])
            axes.pop("epochs", None)
        if self.problems:
            return None

        runs = []
        names = list(axes)
        for combo in itertools.product(*(axes[n] for n in names)):
            runs.append(RunSpec(**{**base, **dict(zip(names, combo))}))
        if not runs:
            self.fail("[grid]", "the grid is empty: every [grid] key needs at least one value")
            return None
        if len(runs) > MAX_RUNS_WITHOUT_CONFIRM and not confirm_large:
            self.fail("[grid]", f"{len(runs)} runs is over the limit of {MAX_RUNS_WITHOUT_CONFIRM}; "
                      "shrink the grid or pass --confirm-large (CONFIRM=1 with make)")
            return None
        exp = Experiment(
            name=name, source=str(self.path), title=strings["title"] or name, author=strings["author"],
            id=strings["id"], date=date, template=template, objective=strings["objective"],
            dataset=dataset, validation=validation, limit=limit, data_path=data_path or None,
            steps_per_execution=spe, engine=engine, pack=pack, precision=precision, gradient_noise=noise,
            grid_axes=tuple(names), runs=tuple(dict.fromkeys(runs)), overrides=given_overrides(overrides),
        )
        from trainer.noise_checks import estimator_problem  # it imports this module
        problem = estimator_problem(exp)
        if problem:
            self.fail("[gradient_noise] estimator", problem)
            return None
        return exp

    def noise_settings(self, table: dict) -> NoiseSettings:
        default = NoiseSettings()
        enabled = table.get("enabled", default.enabled)
        if not isinstance(enabled, bool):
            self.fail("[gradient_noise] enabled", f"must be true or false, got {enabled!r}")
        ints = {k: self.positive_int(f"[gradient_noise] {k}", table.get(k, getattr(default, k)))
                for k in ("every_examples", "small_batch", "batches")}
        if ints["batches"] is not _BAD and ints["batches"] < 2:
            self.fail("[gradient_noise] batches", "needs at least 2 small batches to compare two batch sizes")
        beta = table.get("beta", default.beta)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < 1:
            self.fail("[gradient_noise] beta", f"must be a number in [0, 1), e.g. 0.9; got {beta!r}")
        estimator = self.choice("[gradient_noise] estimator", table.get("estimator", default.estimator), ESTIMATORS)
        probe_seed = table.get("probe_seed", default.probe_seed)
        if isinstance(probe_seed, bool) or not isinstance(probe_seed, int) or probe_seed < 0:
            self.fail("[gradient_noise] probe_seed", f"must be an integer ≥ 0, e.g. 1; got {probe_seed!r}")
        if self.problems:
            return default
        return NoiseSettings(enabled=enabled, beta=float(beta), estimator=estimator, probe_seed=probe_seed, **ints)

    # -- field checks ----------------------------------------------------------------

    def run_fields(self, where: str, table: dict, *, single: bool) -> dict:
        out: dict[str, Any] = {}
        for key, raw in table.items():
            if key not in RUN_FIELDS:
                continue
            label = f"{where} {key}"
            if single:
                values = [raw]
            else:
                if not isinstance(raw, list):
                    self.fail(label, f"a [grid] entry must be a list, e.g. {key} = [{_example(key)}]")
                    continue
                if not raw:
                    self.fail(label, "empty list: the grid would have no runs; give at least one value")
                    continue
                values = raw
            checked = [self.run_value(label, key, v) for v in values]
            if any(c is _BAD for c in checked):
                continue
            out[key] = checked[0] if single else list(dict.fromkeys(checked))
        return out

    def run_value(self, label: str, key: str, value: Any) -> Any:
        if key in ("batch_size", "epochs"):
            return self.positive_int(label, value)
        if key == "seed":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                self.fail(label, f"must be a non-negative integer, got {value!r}")
                return _BAD
            return value
        if key == "learning_rate":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                self.fail(label, f"must be a positive number, got {value!r}")
                return _BAD
            return float(value)
        if key == "batch_norm":
            if not isinstance(value, bool):
                self.fail(label, f"must be true or false, got {value!r}")
                return _BAD
            return value
        if key == "hidden":
            if not isinstance(value, list) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value
            ):
                self.fail(label, f"must be a list of positive layer widths, e.g. [128, 64], got {value!r}")
                return _BAD
            return tuple(value)
        if key == "initializer":
            if isinstance(value, str):
                value = INITIALIZER_ALIASES.get(value.lower(), value.lower())
            valid = INITIALIZERS + tuple(INITIALIZER_ALIASES)
            return self.choice(label, value, INITIALIZERS, shown=valid)
        choices = {"architecture": ARCHITECTURES, "activation": ACTIVATIONS,
                   "optimizer": OPTIMIZERS, "loss": LOSSES}[key]
        return self.choice(label, value, choices)

    def choice(self, label: str, value: Any, valid: tuple[str, ...], shown: tuple[str, ...] | None = None):
        if isinstance(value, str) and value in valid:
            return value
        self.fail(label, f"{value!r} is not valid{_suggest(str(value), shown or valid)}; "
                  f"valid values: {', '.join(shown or valid)}")
        return _BAD

    def positive_int(self, label: str, value: Any):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            self.fail(label, f"must be a positive integer, got {value!r}")
            return _BAD
        return value

    def string(self, label: str, value: Any, *, allow_empty: bool = False, max_length: int = 4096):
        if not isinstance(value, str) or (not allow_empty and not value):
            self.fail(label, f"must be a string, got {value!r}")
            return ""
        bad = control_characters(value)
        if bad:
            self.fail(label, f"contains control character(s) {', '.join(bad)}; remove them")
            return ""
        if len(value) > max_length:
            self.fail(label, f"is {len(value)} characters long; the limit is {max_length}")
            return ""
        return value

    def validation(self, value: Any):
        if value == "test":
            return "test"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            self.fail("[data] validation", f"must be a fraction in (0, 1) of the training set or \"test\", got {value!r}")
            return 0.1
        return float(value)


_BAD = object()


_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")


def _example(key: str) -> str:
    return {"batch_size": "64, 128", "batch_norm": "false, true", "seed": "0, 1, 2",
            "initializer": '"glorot_normal", "he_normal"', "hidden": "[128], [128, 64]",
            "learning_rate": "0.001, 0.01"}.get(key, "...")


def _suggest(word: str, valid) -> str:
    import difflib

    close = difflib.get_close_matches(word, list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
