"""Dataset resolution: user file → Debian Fashion-MNIST → keras, with files the tests write."""
import numpy as np
import pytest

from tests.conftest import synthetic_arrays, write_idx
from trainer import data


@pytest.fixture
def arrays():
    return synthetic_arrays(n_train=100, n_test=40)


@pytest.fixture
def idx_dir(tmp_path, arrays):
    folder = tmp_path / "idx"
    folder.mkdir()
    for key, fname in data.IDX_FILES.items():
        write_idx(folder / fname, arrays[key])
    return folder


def test_npz_path_is_read_scaled_and_split(tmp_path, arrays):
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    ds = data.load("mnist", validation=0.1, path=str(path), allow_download=False)
    assert ds.source == str(path)
    assert len(ds.x_train) == 90 and len(ds.x_val) == 10
    # the last tenth, unshuffled, as keras' validation_split
    np.testing.assert_array_equal(ds.y_val, arrays["y_train"][-10:])
    assert ds.x_train.dtype == np.float32 and ds.x_train.max() == pytest.approx(250 / 255)


def test_idx_folder_is_read_exactly(idx_dir, arrays):
    ds = data.load("mnist", validation="test", path=str(idx_dir), allow_download=False)
    np.testing.assert_array_equal(ds.y_train, arrays["y_train"])
    np.testing.assert_array_equal((ds.x_val * 255).round().astype(np.uint8), arrays["x_test"])
    assert ds.validation == "test set"


def test_limit_caps_train_and_test(idx_dir):
    ds = data.load("mnist", validation="test", limit=30, path=str(idx_dir), allow_download=False)
    assert len(ds.x_train) == 30 and len(ds.x_val) == 30


def test_debian_folder_is_used_for_fashion_mnist(monkeypatch, idx_dir):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", idx_dir)
    ds = data.load("fashion_mnist", validation=0.5, allow_download=False)
    assert ds.source == str(idx_dir)


def test_mnist_goes_to_keras_loader(monkeypatch, idx_dir, arrays):
    # MNIST is never taken from the Fashion-MNIST folder; the keras path is used.
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", idx_dir)
    import keras

    calls = []

    def fake_load_data():
        calls.append(1)
        return (arrays["x_train"], arrays["y_train"]), (arrays["x_test"], arrays["y_test"])

    monkeypatch.setattr(keras.datasets.mnist, "load_data", fake_load_data)
    ds = data.load("mnist", validation="test")
    assert calls and ds.source.startswith("keras.datasets.mnist")


def test_a_prefetched_dataset_is_the_one_load_returns(idx_dir, arrays, monkeypatch):
    data.prefetch("mnist", validation="test", limit=30, path=str(idx_dir))
    ds = data.load("mnist", validation="test", limit=30, path=str(idx_dir), allow_download=False)
    assert len(ds.x_train) == 30 and not data._PREFETCHED  # taken, not read again
    np.testing.assert_array_equal(ds.y_train, arrays["y_train"][:30])
    # Only a download has MNIST here: the prefetch finds nothing, and load downloads as usual.
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", idx_dir)
    import keras

    monkeypatch.setattr(keras.datasets.mnist, "load_data", lambda: (
        (arrays["x_train"], arrays["y_train"]), (arrays["x_test"], arrays["y_test"])))
    data.prefetch("mnist", validation="test")
    assert data.load("mnist", validation="test").source.startswith("keras.datasets.mnist")
    data.prefetch("mnist", validation="test")
    with pytest.raises(data.DatasetUnavailable):
        data.load("mnist", validation="test", allow_download=False)


def test_nothing_found_names_three_ways(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "absent")

    def offline():
        raise Exception("URL fetch failure: no network")

    import keras

    monkeypatch.setattr(keras.datasets.fashion_mnist, "load_data", offline)
    with pytest.raises(data.DatasetUnavailable) as err:
        data.load("fashion_mnist", validation=0.1)
    message = str(err.value)
    assert "no network" in message
    assert "--data PATH" in message and "dataset-fashion-mnist" in message and "download" in message


def test_damaged_files_give_clear_errors(tmp_path, idx_dir):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x_train=np.zeros(3))
    with pytest.raises(data.DatasetUnavailable, match="missing arrays"):
        data.load("mnist", validation=0.1, path=str(bad))
    (idx_dir / data.IDX_FILES["y_test"]).unlink()
    with pytest.raises(data.DatasetUnavailable, match="missing IDX files"):
        data.load("mnist", validation=0.1, path=str(idx_dir))
    with pytest.raises(data.DatasetUnavailable, match="does not exist"):
        data.load("mnist", validation=0.1, path=str(tmp_path / "nope"))
