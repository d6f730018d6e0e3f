"""A `RunSpec` for a user's own Keras model: the fields given to `LabLogger`, the rest read
from the model, its compile settings and fit's parameters; and the run's folder name,
made as the trainer makes it (`trainer.spec.Experiment.run_name`)."""
from __future__ import annotations

import re
from typing import Any

import numpy as np

from contract.spec import RUN_FIELDS, RunSpec
from trainer.spec import INITIALIZER_ALIASES, Experiment

# The order of a run name's parts: the `lab` grid's axes first (its runs are named
# init=…,bs=…,bn=…,seed=…), then the other fields, the seed always last.
NAME_ORDER = ("initializer", "batch_size", "batch_norm", "architecture", "hidden", "activation",
              "optimizer", "learning_rate", "loss", "epochs")
# A run given none of these is named by the lab grid's axes (values read from the model).
DEFAULT_AXES = ("initializer", "batch_size", "batch_norm")
assert set(NAME_ORDER) | {"seed"} == set(RUN_FIELDS)


def _snake(name: str) -> str:
    """Keras class names to the names the trainer uses: GlorotNormal → glorot_normal."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def normalize(field: str, value: Any) -> Any:
    """A given value in the spec's type (the documents' initializer words mapped as the
    experiment files map them: xavier → glorot_normal)."""
    if value is None:
        return None
    if field == "initializer":
        value = str(value).lower()
        return INITIALIZER_ALIASES.get(value, value)
    if field == "hidden":
        return (int(value),) if isinstance(value, (int, np.integer)) else tuple(int(v) for v in value)
    if field == "batch_norm":
        return bool(value)
    if field in ("batch_size", "epochs", "seed"):
        least = 0 if field == "seed" else 1
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise ValueError(f"LabLogger({field}={value!r}): must be an integer ≥ {least}")
        return int(value)
    if field == "learning_rate":
        return float(value)
    return str(value)


def _layers(model) -> list:
    """Every layer of `model`, nested models' layers in place of the model."""
    out = []
    for layer in getattr(model, "layers", []):
        out += _layers(layer) if getattr(layer, "layers", None) else [layer]
    return out


def _activation(fn) -> str | None:
    name = getattr(fn, "__name__", None) or getattr(fn, "name", None)
    return str(name) if name else None


def _float(value) -> float:
    """A float32 value as its shortest decimal (0.001, not 0.0010000000474974513)."""
    return float(str(np.float32(float(value))))


def _loss_name(loss) -> str | None:
    if loss is None:
        return None
    if isinstance(loss, str):
        return loss
    return getattr(loss, "name", None) or getattr(loss, "__name__", None) or type(loss).__name__


def from_model(model, params: dict) -> dict[str, Any]:
    """The spec fields that can be read from a compiled model and fit's `params`."""
    layers = _layers(model)
    kinds = [type(layer).__name__ for layer in layers]
    dense = [layer for layer in layers if type(layer).__name__ == "Dense"]
    convs = [layer for layer in layers if "Conv" in type(layer).__name__]
    out: dict[str, Any] = {"batch_norm": any("BatchNormalization" in k for k in kinds)}
    hidden = tuple(int(layer.units) for layer in dense[:-1])
    if convs:
        out["architecture"] = "cnn"
    elif hidden == (1,) and _activation(dense[0].activation) == "linear":
        out["architecture"], hidden = "linear", ()  # document 002's one-unit bottleneck, as the trainer builds it
    else:
        out["architecture"] = "mlp"
    out["hidden"] = hidden
    first = (convs or dense[:-1] or dense or [None])[0]
    if first is not None:
        act = _activation(getattr(first, "activation", None))
        if act == "linear":  # Dense(…) followed by an Activation layer
            act = next((_activation(getattr(l, "activation", None)) for l in layers
                        if type(l).__name__ == "Activation"), act)
        if act and (hidden or convs):
            out["activation"] = act
        init = getattr(first, "kernel_initializer", None)
        if init is not None:
            out["initializer"] = _snake(type(init).__name__)
    optimizer = getattr(model, "optimizer", None)
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)  # a LossScaleOptimizer's own
    if optimizer is not None:
        out["optimizer"] = type(optimizer).__name__.lower()
        try:
            out["learning_rate"] = _float(optimizer.learning_rate)
        except (TypeError, ValueError):
            pass
    loss = _loss_name(getattr(model, "loss", None))
    if loss:
        out["loss"] = loss
    if isinstance((params or {}).get("epochs"), int):
        out["epochs"] = params["epochs"]
    return out


def keras_seed() -> int | None:
    """The seed given to `keras.utils.set_random_seed`, if any."""
    try:
        from keras.src.utils.rng_utils import get_random_seed
    except ImportError:
        return None
    seed = get_random_seed()
    return seed if isinstance(seed, int) and seed >= 0 else None


def build_spec(given: dict[str, Any], read: dict[str, Any]) -> tuple[RunSpec, dict[str, str], list[str]]:
    """The run's spec: given fields over those read (from the model, fit or the Keras
    seed) over RunSpec's defaults; with where each field came from ("given", "read",
    "default") and a warning for each given value the model contradicts."""
    values, source, warnings = {}, {}, []
    for field in RUN_FIELDS:
        if given.get(field) is not None:
            values[field], source[field] = given[field], "given"
            seen = read.get(field)
            if seen is not None and seen != given[field] and field in ("batch_norm", "batch_size", "epochs",
                                                                       "optimizer", "learning_rate"):
                warnings.append(f"LabLogger: {field}={given[field]!r} was given, but the model and fit say "
                                f"{seen!r}; the run is logged with {given[field]!r}")
        elif read.get(field) is not None:
            values[field], source[field] = read[field], "read"
        else:
            source[field] = "default"
    return RunSpec(**values), source, warnings


def name_axes(given: dict[str, Any]) -> tuple[str, ...]:
    """The fields a run is named by: those given (the seed aside), else the lab grid's."""
    axes = tuple(f for f in NAME_ORDER if given.get(f) is not None)
    return axes or DEFAULT_AXES


def run_name(spec: RunSpec, axes: tuple[str, ...]) -> str:
    """The trainer's name for `spec` in a grid over `axes`: init=glorot_normal,bs=64,bn=on,seed=0."""
    return Experiment(name="", source="", title="", grid_axes=tuple(axes)).run_name(spec)
