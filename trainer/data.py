"""Datasets: find MNIST or Fashion-MNIST on disk (or through keras), scale, split.

Resolution order: a user-given path (keras `.npz` or a folder of the four IDX `.gz`
files) → Fashion-MNIST from the Debian package `dataset-fashion-mnist` → keras'
own cache/download.
"""
from __future__ import annotations

import gzip
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEBIAN_FASHION_MNIST = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the n training rows in epoch `epoch` of a run with this seed: a
    permutation from (seed, epoch) alone, the same in every engine (the fused and compiled
    engines batch it; the Keras engine feeds it to `fit`)."""
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int32)


class DatasetUnavailable(Exception):
    """No copy of the dataset could be found; the message names the three ways to get one."""


@dataclass(frozen=True)
class Dataset:
    name: str
    source: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    validation: str  # "split 0.1 of train" or "test set"

    def describe(self) -> dict:
        return {
            "name": self.name, "source": self.source, "validation": self.validation,
            "train_examples": int(len(self.x_train)), "validation_examples": int(len(self.x_val)),
            "image_shape": list(self.x_train.shape[1:]), "classes": int(self.y_train.max()) + 1,
        }


_PREFETCHED: dict[tuple, Future] = {}


def prefetch(name: str, *, validation: float | str, limit: int | None = None, path: str | None = None) -> None:
    """Start reading the dataset from local files in a thread: gzip and numpy release the
    GIL, so the trainer reads it while it imports TensorFlow. `load` with the same
    arguments takes the result (or, if only a download has the data, loads as usual)."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
    _PREFETCHED[(name, validation, limit, path)] = pool.submit(
        _load, name, validation=validation, limit=limit, path=path, allow_download=False)
    pool.shutdown(wait=False)


def load(name: str, *, validation: float | str, limit: int | None = None,
         path: str | None = None, allow_download: bool = True) -> Dataset:
    """Find the raw arrays, scale pixels to [0, 1] (/255 as in the documents) and split."""
    future = _PREFETCHED.pop((name, validation, limit, path), None)
    if future is not None:
        try:
            return future.result()
        except DatasetUnavailable:
            if not allow_download:
                raise
    return _load(name, validation=validation, limit=limit, path=path, allow_download=allow_download)


def _load(name: str, *, validation: float | str, limit: int | None, path: str | None,
          allow_download: bool) -> Dataset:
    arrays, source = find_arrays(name, path=path, allow_download=allow_download)
    x_train, y_train, x_test, y_test = (arrays[k] for k in NPZ_KEYS)
    if limit is not None:
        x_train, y_train = x_train[:limit], y_train[:limit]
        x_test, y_test = x_test[:limit], y_test[:limit]
    x_train = x_train.astype("float32") / 255.0
    x_test = x_test.astype("float32") / 255.0
    y_train, y_test = y_train.astype("int32"), y_test.astype("int32")
    if validation == "test":
        return Dataset(name, source, x_train, y_train, x_test, y_test, "test set")
    # Keras' validation_split takes the last fraction, unshuffled; the documents use it.
    n_val = max(1, int(round(len(x_train) * float(validation))))
    return Dataset(name, source, x_train[:-n_val], y_train[:-n_val], x_train[-n_val:],
                   y_train[-n_val:], f"last {validation:g} of the training set")


def find_arrays(name: str, *, path: str | None, allow_download: bool) -> tuple[dict, str]:
    if path:
        p = Path(path)
        if not p.exists():
            raise DatasetUnavailable(f"dataset path {p} does not exist")
        return (read_npz(p) if p.is_file() else read_idx_dir(p)), str(p)
    if name == "fashion_mnist" and all((DEBIAN_FASHION_MNIST / f).is_file() for f in IDX_FILES.values()):
        return read_idx_dir(DEBIAN_FASHION_MNIST), str(DEBIAN_FASHION_MNIST)
    if allow_download:
        try:
            return _keras_load(name), f"keras.datasets.{name} (cache: ~/.keras/datasets)"
        except Exception as exc:  # keras raises bare Exception on failed downloads
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    else:
        reason = "downloads disabled"
    raise DatasetUnavailable(
        f"no copy of {name} found ({reason}). Three ways to get one:\n"
        f"  1. give a file: --data PATH (make DATA=PATH), a keras .npz with {', '.join(NPZ_KEYS)} "
        f"or a folder holding {', '.join(IDX_FILES.values())}\n"
        f"  2. for fashion_mnist: apt-get install dataset-fashion-mnist "
        f"(files in {DEBIAN_FASHION_MNIST})\n"
        f"  3. let keras download it once into ~/.keras/datasets (needs internet)"
        + ("\n  or train on Fashion-MNIST instead, which installs offline: --dataset fashion_mnist "
           "(make DATASET=fashion_mnist)" if name != "fashion_mnist" else "")
    )


def _keras_load(name: str) -> dict:
    import keras

    loader = {"mnist": keras.datasets.mnist, "fashion_mnist": keras.datasets.fashion_mnist}[name]
    (x_train, y_train), (x_test, y_test) = loader.load_data()
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def read_npz(path: Path) -> dict:
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in NPZ_KEYS if k not in f.files]
            if missing:
                raise DatasetUnavailable(f"{path}: missing arrays {', '.join(missing)} "
                                         f"(a keras-style .npz holds {', '.join(NPZ_KEYS)})")
            return {k: f[k] for k in NPZ_KEYS}
    except (OSError, ValueError) as exc:
        raise DatasetUnavailable(f"{path}: not a readable .npz file ({exc})") from None


def read_idx_dir(folder: Path) -> dict:
    missing = [f for f in IDX_FILES.values() if not (folder / f).is_file()]
    if missing:
        raise DatasetUnavailable(f"{folder}: missing IDX files {', '.join(missing)}")
    return {key: read_idx(folder / fname) for key, fname in IDX_FILES.items()}


def read_idx(path: Path) -> np.ndarray:
    """Parse one gzipped IDX file (the MNIST format) of unsigned bytes.

    Written here because the format is 20 lines and the packages that read it add
    nothing but a dependency.
    """
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DatasetUnavailable(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=header)
    if data.size != int(np.prod(dims)):
        raise DatasetUnavailable(f"{path}: truncated IDX file ({data.size} of {int(np.prod(dims))} values)")
    return data.reshape(dims)
