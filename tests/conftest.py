import gzip
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MPLBACKEND", "Agg")


def synthetic_arrays(n_train=1200, n_test=300, seed=0):
    """28×28 uint8 images whose class is learnable: a bright 4×4 patch at a class-dependent spot."""
    rng = np.random.default_rng(seed)

    def make(n):
        y = rng.integers(0, 10, size=n).astype(np.uint8)
        x = rng.integers(0, 60, size=(n, 28, 28)).astype(np.uint8)
        for i, label in enumerate(y):
            r, c = divmod(int(label), 5)
            x[i, 4 + 10 * r: 8 + 10 * r, 2 + 5 * c: 6 + 5 * c] = 250
        return x, y

    (x_train, y_train), (x_test, y_test) = make(n_train), make(n_test)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="session")
def synthetic_npz(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "synthetic.npz"
    np.savez(path, **synthetic_arrays())
    return path


@pytest.fixture(scope="session")
def smoke(tmp_path_factory, synthetic_npz):
    """The real `smoke` preset trained once on the synthetic dataset: (exit code, log folder, experiment)."""
    from trainer.cli import main
    from trainer.spec import load_experiment

    logdir = tmp_path_factory.mktemp("logs")
    code = main(["--experiment", "smoke", "--data", str(synthetic_npz), "--logdir", str(logdir)])
    return code, logdir / "smoke", load_experiment("smoke")


@pytest.fixture(scope="session")
def fixture_logs(tmp_path_factory) -> Path:
    from tests.make_fixture_logs import write

    return write(tmp_path_factory.mktemp("fixture") / "fixture")
