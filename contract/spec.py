"""The frozen run spec and the gradient-noise settings, as both stages read and write them.

One `RunSpec` travels end to end: the trainer names the run directory from it, logs it
as the TensorBoard hparams and stores it in `run.json`; the report reads it back with
`RunSpec.from_dict` (or `from_hparams` for logs without a run.json) and keys its rows by it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


class SpecError(ValueError):
    """A stored spec that is not a `RunSpec`; the message says which field."""


@dataclass(frozen=True)
class RunSpec:
    """Everything that decides one training run's numbers."""

    architecture: str = "mlp"
    hidden: tuple[int, ...] = (128,)
    activation: str = "relu"
    initializer: str = "glorot_uniform"
    batch_norm: bool = False
    optimizer: str = "adam"
    learning_rate: float = 0.001
    loss: str = "sparse_categorical_crossentropy"
    batch_size: int = 32
    epochs: int = 10
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunSpec":
        """The spec stored in run.json (`to_dict`); SpecError names an unknown field."""
        unknown = sorted(set(d) - set(RUN_FIELDS))
        if unknown:
            raise SpecError(f"unknown spec field(s) {', '.join(unknown)}; valid fields: {', '.join(RUN_FIELDS)}")
        d = dict(d)
        if "hidden" in d:
            hidden = d["hidden"]
            d["hidden"] = parse_hidden(hidden) if isinstance(hidden, str) else tuple(hidden)
        return cls(**d)

    @classmethod
    def from_hparams(cls, hparams: dict[str, Any]) -> "RunSpec":
        """The spec logged as TensorBoard hparams (`hparams`): flat values, numbers as
        floats, `hidden` as text ("128x64"); fields not logged keep their defaults."""
        d: dict[str, Any] = {}
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        for name, value in hparams.items():
            if name not in types:
                continue
            if name == "hidden":
                d[name] = parse_hidden(str(value))
            elif types[name] in ("int", int):
                d[name] = int(value)
            elif types[name] in ("float", float):
                d[name] = float(value)
            elif types[name] in ("bool", bool):
                d[name] = value if isinstance(value, bool) else str(value).lower() in ("true", "1", "on")
            else:
                d[name] = str(value)
        return cls.from_dict(d)

    def row(self) -> dict[str, Any]:
        """The spec as a table row: every value hashable (hidden as a tuple)."""
        return dataclasses.asdict(self) | {"hidden": self.hidden}

    @property
    def uses_batch_norm(self) -> bool:
        return self.batch_norm and self.architecture != "linear"  # the linear model has none

    def pack_key(self) -> tuple:
        """Runs with equal keys see the same batches in the same order, so the fused
        engine can train them together (trainer.packed)."""
        d = self.to_dict()
        del d["initializer"], d["batch_norm"]
        return tuple(sorted((k, repr(v)) for k, v in d.items()))

    def hparams(self) -> dict[str, bool | int | float | str]:
        """Flat values TensorBoard's HParams plugin accepts."""
        d = dataclasses.asdict(self)
        d["hidden"] = format_value(self.hidden)
        return d


RUN_FIELDS = tuple(f.name for f in dataclasses.fields(RunSpec))


PER_EXAMPLE, PROBE = "per_example", "probe"
ESTIMATORS = ("auto", PER_EXAMPLE, PROBE)  # [gradient_noise] estimator


@dataclass(frozen=True)
class NoiseSettings:
    """How the gradient noise scale is measured ([gradient_noise] in the experiment file);
    when and how: `contract.noise`."""
    enabled: bool = True
    every_examples: int = 7_500   # measure each time an epoch has seen another N examples, and at its end
    # How (contract.noise): "per_example" from exact per-example gradient norms in the
    # training steps (the fused engine, models without batch norm); "probe" from extra
    # small batches at fixed weights (every engine); "auto": per_example where it can.
    estimator: str = "auto"
    small_batch: int = 128        # the probe's B_small
    batches: int = 4              # the probe's k disjoint small batches; B_big = k·B_small
    beta: float = 0.95            # EMA weight over measurements
    # The probe's rows' random stream (with the run's seed): another value draws other
    # rows over the same training, to see how much B_simple depends on them
    # (`python -m bench.noise_cv --against`).
    probe_seed: int = 0

    def __post_init__(self):
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"[gradient_noise] estimator {self.estimator!r} is not valid; valid values: "
                             f"{', '.join(ESTIMATORS)}")

    @property
    def big_batch(self) -> int:
        return self.batches * self.small_batch

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "big_batch": self.big_batch}


NOISE_FIELDS = tuple(f.name for f in dataclasses.fields(NoiseSettings))


def format_value(value: Any) -> str:
    """A spec value as run names and hparams show it: on/off, 128x64, 0.001."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return "x".join(str(v) for v in value) or "none"
    if isinstance(value, float):
        return format(value, "g")
    return str(value)


def parse_hidden(text: str) -> tuple[int, ...]:
    """`format_value`'s text of the hidden widths back to a tuple: "128x64" → (128, 64)."""
    if text in ("", "none"):
        return ()
    try:
        return tuple(int(part) for part in text.split("x"))
    except ValueError:
        raise SpecError(f"hidden {text!r} is not a list of layer widths like 128x64") from None
