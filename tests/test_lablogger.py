"""tblab.LabLogger: a user's own `model.fit` logged in the trainer's layout, with real fits
on tiny synthetic data (520 examples of 784 features, 10 classes, Dense(16)): the logs hold
each step's exact loss, fit's epoch values, a run.json the report reads, and the right
status when a run diverges, fails or is interrupted."""
import ast
import json
import math
from pathlib import Path

import numpy as np
import pytest

from contract.layout import (COMPLETE, DIVERGED, EPOCH_ACCURACY, EPOCH_LOSS, EXPERIMENT_MANIFEST, FAILED,
                             INTERRUPTED, NOISE_G2, NOISE_ROUGHNESS, RUN_MANIFEST, RUNNING, STEP_LOSS, TRAIN,
                             VALIDATION, noise_tag)
from contract.noise import roughness
from contract.spec import NoiseSettings, RunSpec
from tests.conftest import synthetic_arrays

pytestmark = pytest.mark.slow

N, BS, EPOCHS = 520, 64, 2  # 8 full batches and one of 8 an epoch: the last step has another size
STEPS = EPOCHS * math.ceil(N / BS)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data():
    a = synthetic_arrays(n_train=N, n_test=128, seed=3)
    flat = [(a[k].reshape(len(a[k]), -1) / 255.0).astype("float32") for k in ("x_train", "x_test")]
    return flat[0], a["y_train"].astype("int32"), flat[1], a["y_test"].astype("int32")


def build(initializer="glorot_normal", batch_norm=True, seed=0, steps_per_execution=1, activation="relu",
          jit_compile="auto"):
    import keras

    keras.utils.set_random_seed(seed)
    layers = [keras.Input((784,)), keras.layers.Dense(16, activation=activation, kernel_initializer=initializer)]
    if batch_norm:
        layers.append(keras.layers.BatchNormalization())
    layers.append(keras.layers.Dense(10, activation="softmax", kernel_initializer=initializer))
    model = keras.Sequential(layers)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"], steps_per_execution=steps_per_execution, jit_compile=jit_compile)
    return model


def fit(model, data, logger, epochs=EPOCHS, callbacks=(), **kwargs):
    x, y, xv, yv = data
    return model.fit(kwargs.pop("x", x), y, validation_data=(xv, yv), epochs=epochs, batch_size=BS,
                     shuffle=False, verbose=0, callbacks=[logger, *callbacks], **kwargs)


def logger(exp_dir, **kwargs):
    from tblab import LabLogger

    return LabLogger(exp_dir, **{"initializer": "glorot_normal", "batch_size": BS, "batch_norm": True,
                                 "seed": 0, "verbose": 0, **kwargs})


def series(exp_dir: Path, run: str, split: str, tag: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one tag, read as the report reads event files."""
    from report.load import read_event_files

    problems = []
    df, damaged = read_event_files(exp_dir, problems)
    assert not damaged and not problems
    df = df[(df["run"] == run) & (df["split"] == split) & (df["tag"] == tag)].sort_values("step")
    return df["step"].to_numpy(), df["value"].to_numpy()


def manifest(exp_dir: Path, run: str) -> dict:
    return json.loads((exp_dir / run / RUN_MANIFEST).read_text())


@pytest.fixture(scope="module")
def reference(data):
    """Each step's loss computed without the callback: train_on_batch on fit's batches
    (shuffle=False: in order), from the same initial weights."""
    x, y, _, _ = data
    model = build()
    losses = []
    for _ in range(EPOCHS):
        for start in range(0, N, BS):
            model.reset_metrics()  # its logs are then this batch's loss alone
            losses.append(model.train_on_batch(x[start:start + BS], y[start:start + BS], return_dict=True)["loss"])
    return np.array(losses, dtype=np.float32)


RUN = "init=glorot_normal,bs=64,bn=on,seed=0"


def test_step_losses_are_each_steps_exact_loss_and_epoch_scalars_are_fits_history(tmp_path, data, reference):
    exp = tmp_path / "myexp"
    model = build()
    lab = logger(exp)
    history = fit(model, data, lab).history
    assert lab.run == RUN and lab.status == COMPLETE

    steps, losses = series(exp, RUN, TRAIN, STEP_LOSS)
    assert steps.tolist() == list(range(1, STEPS + 1))
    np.testing.assert_allclose(losses, reference, rtol=1e-6, atol=0)
    # Keras' own epoch loss is the batch-size-weighted mean of exactly these step losses.
    sizes = np.array([min(BS, N - s) for s in range(0, N, BS)] * EPOCHS, dtype=float)
    for e in range(EPOCHS):
        part = slice(e * len(sizes) // EPOCHS, (e + 1) * len(sizes) // EPOCHS)
        assert np.average(losses[part], weights=sizes[part]) == pytest.approx(history["loss"][e], rel=1e-5)
    for split, prefix in ((TRAIN, ""), (VALIDATION, "val_")):
        for tag, key in ((EPOCH_LOSS, "loss"), (EPOCH_ACCURACY, "accuracy")):
            steps, values = series(exp, RUN, split, tag)
            assert steps.tolist() == list(range(EPOCHS))
            np.testing.assert_array_equal(values, np.float32(history[prefix + key]))

    m = manifest(exp, RUN)
    assert m["status"] == COMPLETE and m["steps"] == STEPS and m["epochs_completed"] == EPOCHS
    assert RunSpec.from_dict(m["spec"]) == RunSpec(
        architecture="mlp", hidden=(16,), activation="relu", initializer="glorot_normal", batch_norm=True,
        optimizer="adam", learning_rate=0.001, loss="sparse_categorical_crossentropy", batch_size=BS,
        epochs=EPOCHS, seed=0)
    assert m["spec_source"]["optimizer"] == "read" and m["spec_source"]["initializer"] == "given"
    assert m["dataset"]["train_examples"] == N and m["dataset"]["validation_examples"] == 128
    assert m["examples_seen"] == EPOCHS * N and m["wall_seconds"] > 0
    assert m["final"]["loss"] == pytest.approx(history["loss"][-1]) and "gradient_noise" not in m
    assert m["precision"] == "float32" and m["comparison_tags"] is True
    assert {"keras", "tensorflow", "python"} <= set(m["versions"]) and m["hardware"]["cpu_count"]
    assert [layer["type"] for layer in m["model"]["layers"]] == ["Dense", "BatchNormalization", "Dense"]

    from report.load import read_hparams

    assert RunSpec.from_hparams(read_hparams(exp)[RUN]) == RunSpec.from_dict(m["spec"])
    e = json.loads((exp / EXPERIMENT_MANIFEST).read_text())
    assert e["runs"] == [RUN] and e["specs"] == [m["spec"]] and e["experiment"]["template"] == "lab"
    assert e["dataset"]["train_examples"] == N

    # The model is the user's own again: a fit without the callback logs nothing more.
    assert "compute_loss" not in vars(model)
    model.fit(data[0], data[1], epochs=1, batch_size=BS, verbose=0)
    assert series(exp, RUN, TRAIN, STEP_LOSS)[0].tolist() == list(range(1, STEPS + 1))


def test_several_steps_per_execution_lose_no_step(tmp_path, data, reference):
    exp = tmp_path / "spe"
    fit(build(steps_per_execution=4), data, logger(exp))  # 9 steps an epoch: executions of 4, 4, 1
    steps, losses = series(exp, RUN, TRAIN, STEP_LOSS)
    assert steps.tolist() == list(range(1, STEPS + 1))
    np.testing.assert_allclose(losses, reference, rtol=1e-6, atol=0)
    assert manifest(exp, RUN)["steps_per_execution"] == 4


def test_the_capture_compiles_under_xla(tmp_path, data, reference):
    """XLA is Keras' default on a GPU ("auto"); here it is asked for on the CPU."""
    exp = tmp_path / "xla"
    model = build(jit_compile=True)
    fit(model, data, logger(exp))
    assert model.jit_compile
    steps, losses = series(exp, RUN, TRAIN, STEP_LOSS)
    assert steps.tolist() == list(range(1, STEPS + 1))
    np.testing.assert_allclose(losses, reference, rtol=1e-5, atol=0)  # XLA fuses (and rounds) differently


def test_gradient_noise_with_probe_data(tmp_path, data, reference):
    exp = tmp_path / "noise"
    x, y, _, _ = data
    fit(build(), data, logger(exp, gradient_noise=NoiseSettings(small_batch=32, batches=4), probe_data=(x, y)))
    _, losses = series(exp, RUN, TRAIN, STEP_LOSS)
    np.testing.assert_allclose(losses, reference, rtol=1e-6, atol=0)  # the probe changes nothing
    m = manifest(exp, RUN)
    assert m["gradient_noise"]["measurements"] >= EPOCHS and m["gradient_noise"]["big_batch"] == 128
    g2_steps, g2 = series(exp, RUN, TRAIN, noise_tag(NOISE_G2))
    assert {STEPS // 2, STEPS} <= set(g2_steps.tolist()) and np.isfinite(g2).all()  # at each epoch end
    _, rough = series(exp, RUN, TRAIN, noise_tag(NOISE_ROUGHNESS))
    per_epoch = np.split(losses, EPOCHS)
    np.testing.assert_allclose(rough, [roughness(p) for p in per_epoch], rtol=1e-5)


def test_four_runs_make_the_report_with_fits_final_values(tmp_path, data):
    import pandas as pd

    from report.cli import main

    exp = tmp_path / "myexp"
    finals = {}
    for init in ("glorot_normal", "he_normal"):
        for bn in (False, True):
            lab = logger(exp, initializer=init, batch_norm=bn, title="My experiment", author="Ana Lima")
            finals[(init, bn)] = fit(build(init, bn), data, lab).history
    e = json.loads((exp / EXPERIMENT_MANIFEST).read_text())
    assert e["runs"] == [f"init={i},bs=64,bn={b},seed=0" for i in ("glorot_normal", "he_normal")
                         for b in ("off", "on")]
    assert e["experiment"]["author"] == "Ana Lima"
    # TensorBoard's Custom Scalars tab: each run wrote its charts; merged, BN on and off of
    # batch 64 are one chart, and the copies under its tag hold fit's epoch losses.
    from tensorboard.backend.event_processing import plugin_event_multiplexer
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata
    from tensorboard.util import tensor_util

    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(exp))
    mux.Reload()
    titles = set()
    for run in mux.Runs():
        if metadata.CONFIG_SUMMARY_TAG in mux.GetAccumulator(run).Tags()["tensors"]:
            (event,) = mux.Tensors(run, metadata.CONFIG_SUMMARY_TAG)
            layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
            titles |= {c.title for cat in layout.category for c in cat.chart}
    assert {"batch 64: loss, BN on and off", "BN on: loss, batch sizes side by side",
            "BN off: loss, batch sizes side by side"} <= titles
    for init, bn in finals:
        run = f"init={init},bs=64,bn={'on' if bn else 'off'},seed=0/validation"
        values = [float(tensor_util.make_ndarray(e.tensor_proto))
                  for e in mux.Tensors(run, "compare/batch_size_64/epoch_loss")]
        np.testing.assert_allclose(values, finals[(init, bn)]["val_loss"], rtol=1e-6)
    out = tmp_path / "report"
    assert main(["--logdir", str(exp), "--out", str(out), "--format", "html"]) == 0
    html = (out / "report.html").read_text()
    assert "My experiment" in html and "DRAFT" not in html
    for init in ("glorot_normal", "he_normal"):
        for split, key in (("train", "loss"), ("val", "val_loss")):
            [path] = (out / "tables").glob(f"*{split}_loss_*{init}*bs64*.csv")
            table = pd.read_csv(path)
            for bn, setting in ((False, "Without batch norm"), (True, "With batch norm")):
                [mean] = table.loc[table["setting"] == setting, "mean"]
                assert mean == pytest.approx(finals[(init, bn)][key][-1], rel=1e-6)


def test_a_run_whose_loss_becomes_nan_is_marked_diverged(tmp_path, data):
    exp = tmp_path / "nan"
    x = data[0].copy()
    x[3 * BS] = np.nan  # the first example of step 4 (tanh keeps a NaN that relu would zero)
    lab = logger(exp)
    history = fit(build(activation="tanh"), data, lab, x=x).history
    m = manifest(exp, RUN)
    assert lab.status == m["status"] == DIVERGED and m["diverged_at_step"] == 4
    assert len(history["loss"]) == 1  # stopped in the first epoch
    steps, losses = series(exp, RUN, TRAIN, STEP_LOSS)
    assert steps.tolist() == [1, 2, 3] and np.isfinite(losses).all()  # non-finite values are not logged


def test_an_exception_inside_fit_marks_the_run_failed(tmp_path, data):
    import keras

    class Flaky(keras.utils.PyDataset):
        """fit's batches in order; the sixth cannot be read."""

        def __len__(self):
            return math.ceil(N / BS)

        def __getitem__(self, i):
            if i == 5:
                raise RuntimeError("the data's disk went away")
            return data[0][i * BS:(i + 1) * BS], data[1][i * BS:(i + 1) * BS]

    exp = tmp_path / "failed"
    lab = logger(exp)
    with pytest.raises(Exception, match="disk went away"):
        build().fit(Flaky(), epochs=EPOCHS, verbose=0, callbacks=[lab])
    m = manifest(exp, RUN)
    assert lab.status == m["status"] == FAILED and "disk went away" in m["error"] and m["traceback"]
    steps, _ = series(exp, RUN, TRAIN, STEP_LOSS)
    assert 1 <= m["steps"] <= 5 and steps.tolist() == list(range(1, m["steps"] + 1))


def stop_at(step: int):
    """A callback that raises KeyboardInterrupt (a Ctrl-C) at the end of step `step`."""
    import keras

    class Stop(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if int(self.model.optimizer.iterations.numpy()) == step:
                raise KeyboardInterrupt

    return Stop()


def test_an_interrupt_marks_the_run_interrupted_and_a_rerun_takes_it_over(tmp_path, data):
    exp = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):  # raised outside the callback: the with block sees it
        with logger(exp) as lab:
            fit(build(), data, lab, callbacks=[stop_at(5)])
    m = manifest(exp, RUN)
    assert lab.status == m["status"] == INTERRUPTED and m["steps"] == 5

    # Without the with block nothing sees the interrupt; the same run started again takes over.
    abandoned = logger(exp)
    with pytest.raises(KeyboardInterrupt):
        fit(build(), data, abandoned, callbacks=[stop_at(3)])
    assert abandoned.status == RUNNING
    rerun = logger(exp)
    fit(build(), data, rerun)
    assert abandoned.status == INTERRUPTED and rerun.status == manifest(exp, RUN)["status"] == COMPLETE
    assert series(exp, RUN, TRAIN, STEP_LOSS)[0].tolist() == list(range(1, STEPS + 1))


def test_a_logger_given_nothing_reads_the_model_fit_and_the_seed(tmp_path, data):
    import keras

    from tblab import LabLogger

    keras.utils.set_random_seed(7)
    model = keras.Sequential([keras.Input((784,)), keras.layers.Dense(12, activation="tanh"),
                              keras.layers.Dense(10, activation="softmax")])
    model.compile(optimizer=keras.optimizers.SGD(0.05), metrics=["sparse_categorical_accuracy"],
                  loss=keras.losses.SparseCategoricalCrossentropy())
    lab = LabLogger(tmp_path / "plain", verbose=0)
    model.fit(data[0], data[1], epochs=1, batch_size=100, verbose=0, callbacks=[lab])
    assert lab.run == "init=glorot_uniform,bs=100,bn=off,seed=7"  # the lab grid's axes, as read
    m = manifest(tmp_path / "plain", lab.run)
    assert m["spec"] == RunSpec(architecture="mlp", hidden=(12,), activation="tanh", initializer="glorot_uniform",
                                batch_norm=False, optimizer="sgd", learning_rate=0.05, batch_size=100, epochs=1,
                                seed=7).to_dict()
    assert set(m["spec_source"].values()) == {"read"} and m["steps"] == 6 and m["dataset"]["train_examples"] == N
    _, accuracy = series(tmp_path / "plain", lab.run, TRAIN, EPOCH_ACCURACY)  # from sparse_categorical_accuracy
    assert accuracy.tolist() == [pytest.approx(m["final"]["sparse_categorical_accuracy"])]


def test_run_names_and_refused_settings():
    from tblab import LabLogger
    from tblab.infer import name_axes, normalize, run_name

    spec = RunSpec(initializer="glorot_normal", batch_size=64, batch_norm=True, seed=0, learning_rate=0.01)
    assert run_name(spec, name_axes({"batch_norm": True, "initializer": "x", "batch_size": 64})) == RUN
    assert run_name(spec, name_axes({})) == RUN  # nothing given: the lab grid's axes
    assert run_name(spec, name_axes({"learning_rate": 0.01})) == "lr=0.01,seed=0"
    assert normalize("initializer", "Xavier") == "glorot_normal" and normalize("hidden", 128) == (128,)
    with pytest.raises(ValueError, match="probe_data"):
        LabLogger("logs/x", gradient_noise=True)
    with pytest.raises(ValueError, match="512"):
        LabLogger("logs/x", gradient_noise=True, probe_data=(np.zeros((100, 4)), np.zeros(100)))
    with pytest.raises(ValueError, match="template"):
        LabLogger("logs/x", template="poster")
    with pytest.raises(ValueError, match="batch_size"):
        LabLogger("logs/x", batch_size=0)


def _string_constants(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every string literal that is not a docstring (as tests/test_contract.py)."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_tblab_keeps_the_contracts_rules():
    """tests/test_contract.py's rules for the stages, for tblab/: no layout name spelled
    outside contract/, no module over 450 lines."""
    from contract import layout

    spelled_once = {*layout.SCALAR_TAGS, *layout.NOISE_STEP_TAGS, *layout.NOISE_EPOCH_TAGS, layout.NOISE_PREFIX,
                    layout.RUN_STATUS_TAG, layout.EXPERIMENT_MANIFEST, layout.RUN_MANIFEST, layout.LOCK_DIR,
                    layout.EVENT_FILE_GLOB, *layout.STATUSES}
    modules = sorted((ROOT / "tblab").glob("*.py"))
    assert modules
    assert [f"{p.name}:{line}" for p in modules for line, text in _string_constants(p) if text in spelled_once] == []
    assert {p.name: n for p in modules if (n := len(p.read_text().splitlines())) > 450} == {}


def test_cpu_name_says_which_host_and_its_bfloat16_units():
    from trainer.manifest import cpu_name

    intel = ("processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 143\n"
             "model name\t: Intel(R) Xeon(R) Platinum 8480C\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile\n"
             "\nprocessor\t: 1\nmodel name\t: another\n")
    assert cpu_name(intel) == "Intel(R) Xeon(R) Platinum 8480C (family 6 model 143; bfloat16: amx_bf16, avx512_bf16)"
    amd = "processor\t: 0\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx512f avx512_bf16\n"
    assert cpu_name(amd) == "AMD EPYC (family 26 model 2; bfloat16: avx512_bf16)"
    assert cpu_name("model name\t: Some CPU\nflags\t\t: fpu sse2\n") == "Some CPU (bfloat16: none)"
