"""Reports from logs written by others, with real logs written here: `model.fit` with Keras'
TensorBoard callback (with and without `hp.hparams`), `tf.summary.scalar` by hand, and
SummaryWriter-style `simple_value` records; factors from hparams, a --factors pattern,
a CSV or a TOML file; runs that cannot be placed are listed with their fix."""
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from report.cli import main
from report.factors import FactorsError, parse_factors, suggest, to_value
from report.load import LogsError, load_logs

PATTERN = "{initializer}_bs{batch_size}_{batch_norm}"
# run → (initializer word, batch norm, update_freq, hparams written into the run folder or None)
FIT_RUNS = {
    "xavier_bs64_bn": ("xavier", True, "batch", None),
    "xavier_bs64_nobn": ("xavier", False, "epoch", None),
    "he_bs64_bn": ("he", True, "epoch", {"initializer": "he_normal", "batch_size": 64, "batch_norm": True}),
    "he_bs64_nobn": ("he", False, "batch", {"init": "he", "bs": 64, "bn": "off", "dropout": 0.0}),
}


@pytest.fixture(scope="module")
def fit_logs(tmp_path_factory):
    """Four runs trained by plain model.fit with keras.callbacks.TensorBoard (write_graph on,
    the default); returns (log folder, run → Keras history, run → optimizer steps)."""
    import keras
    import tensorflow as tf
    from tensorboard.plugins.hparams import api as hp

    root = tmp_path_factory.mktemp("byo") / "fit"
    rng = np.random.default_rng(0)
    x = rng.normal(size=(320, 8)).astype("float32")
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype("int32")
    history, steps = {}, {}
    for run, (init, bn, update_freq, hparams) in FIT_RUNS.items():
        keras.utils.set_random_seed(1)
        layers = [keras.Input((8,)), keras.layers.Dense(16, kernel_initializer={"xavier": "glorot_normal",
                                                                                "he": "he_normal"}[init])]
        layers += [keras.layers.BatchNormalization()] if bn else []
        layers += [keras.layers.Activation("tanh"), keras.layers.Dense(2, activation="softmax")]
        model = keras.Sequential(layers)
        model.compile(keras.optimizers.Adam(0.05), "sparse_categorical_crossentropy", metrics=["accuracy"])
        h = model.fit(x[:256], y[:256], batch_size=64, epochs=2, validation_data=(x[256:], y[256:]), verbose=0,
                      callbacks=[keras.callbacks.TensorBoard(log_dir=str(root / run), update_freq=update_freq)])
        history[run], steps[run] = h.history, int(model.optimizer.iterations.numpy())
        if hparams:
            with tf.summary.create_file_writer(str(root / run)).as_default():
                hp.hparams(hparams)
    return root, history, steps


def test_keras_fit_runs_are_read_with_their_graph_skipped(fit_logs):
    root, history, steps = fit_logs
    logs = load_logs(root, factors=PATTERN)
    assert sorted(logs.runs["run"]) == sorted(FIT_RUNS)
    assert set(logs.runs["status"]) == {"complete"} and logs.unfinished == {}
    assert logs.template_hint == "lab" and logs.manifests == {run: {"steps": steps[run]} for run in FIT_RUNS}
    by = logs.runs.set_index("run")
    assert by.loc["he_bs64_nobn", "initializer"] == "he_normal" and not by.loc["he_bs64_nobn", "batch_norm"]
    assert by.loc["xavier_bs64_bn", "initializer"] == "glorot_normal" and by.loc["xavier_bs64_bn", "batch_norm"]
    assert set(by["batch_size"]) == {64} and set(by["epochs"]) == {2} and set(by["seed"]) == {0}
    assert by["steps"].to_dict() == steps  # from evaluation_*_vs_iterations, or the per-step loss
    s = logs.scalars
    for run, h in history.items():
        for split, prefix in (("train", ""), ("validation", "val_")):
            for tag, key in (("epoch_loss", "loss"), ("epoch_accuracy", "accuracy")):
                got = s[(s["run"] == run) & (s["split"] == split) & (s["tag"] == tag)].sort_values("step")
                assert got["step"].tolist() == [0, 1]
                np.testing.assert_allclose(got["value"], h[prefix + key], rtol=1e-6)
    per_step = s[(s["run"] == "xavier_bs64_bn") & (s["tag"] == "step_loss")]
    assert per_step["step"].tolist() == list(range(1, steps["xavier_bs64_bn"] + 1))  # batch_loss, update_freq=batch
    assert not ((s["run"] == "xavier_bs64_nobn") & (s["tag"] == "step_loss")).any()
    assert set(s["tag"]) == {"epoch_loss", "epoch_accuracy", "step_loss"}  # the model graph text is no scalar
    text = "\n".join(logs.problems)
    assert "4 run(s) written by others" in text and "taken as complete" in text
    assert "epoch_learning_rate (4 runs)" in text and "batch_accuracy (2 runs)" in text
    assert "hparam 'dropout'" not in text  # logged by one run only: it does not differ between runs


def test_hparams_place_runs_and_runs_without_factors_are_listed_with_the_fix(fit_logs):
    root, _, _ = fit_logs
    logs = load_logs(root)
    assert sorted(logs.runs["run"]) == ["he_bs64_bn", "he_bs64_nobn"]
    for run in ("xavier_bs64_bn", "xavier_bs64_nobn"):
        (line,) = [p for p in logs.problems if p.startswith(run + ":")]
        assert "no hparams and no --factors" in line and "run excluded" in line
        assert f'give --factors "{PATTERN}" or a CSV run,initializer,batch_size,batch_norm' in line
    assert logs.template_hint == "lab"  # batch norm varies
    he = logs.runs.set_index("run")
    assert he.loc["he_bs64_nobn", "batch_size"] == 64 and he.loc["he_bs64_bn", "batch_norm"]
    assert "2 from hparams" in "\n".join(logs.problems)


def test_report_of_four_plain_callback_runs_holds_the_logged_final_values(fit_logs, tmp_path, capsys):
    root, history, _ = fit_logs
    out = tmp_path / "report"
    assert main(["--logdir", str(root), "--out", str(out), "--factors", PATTERN, "--format", "html"]) == 0
    html = (out / "report.html").read_text()
    assert "DRAFT" not in html and "Data problems" in html and "written by others" in html
    # what such logs do not record is said so, not left blank
    assert ("Library versions: not recorded.<" in html and "Hardware: not recorded. Log folder" in html
            and "Training engine: not recorded. Arithmetic precision: not recorded." in html)
    for init, pretty in (("xavier", "Xavier (Glorot) normal"), ("he", "He normal")):
        assert f"{pretty} weight initialization" in html  # the lab template: one section per initializer
        for metric, split, key in (("train_loss", "train", "loss"), ("val_loss", "validation", "val_loss")):
            (path,) = (out / "tables").glob(f"table*_{metric}_{'glorot_normal' if init == 'xavier' else 'he_normal'}"
                                            "_bs64.csv")
            df = pd.read_csv(path).set_index("setting")
            for bn, label in ((False, "Without batch norm"), (True, "With batch norm")):
                run = f"{init}_bs64_{'bn' if bn else 'nobn'}"
                assert df.loc[label, "mean"] == pytest.approx(history[run][key][-1], rel=1e-6)
                assert df.loc[label, "n"] == 1
                assert f"{history[run][key][-1]:.4f}" in html
    assert "report: " in capsys.readouterr().out


def _simple_value_run(folder: Path, records: list[tuple[str, int, float]]) -> None:
    """SummaryWriter-style records (PyTorch, TensorboardX): Summary.Value(simple_value=...)."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    folder.mkdir(parents=True, exist_ok=True)
    writer = EventFileWriter(str(folder))
    for tag, step, value in records:
        writer.add_event(Event(step=step, wall_time=1.0, summary=Summary(value=[Summary.Value(tag=tag,
                                                                                            simple_value=value)])))
    writer.close()


def _torch_style(folder: Path, offset: float = 0.0, steps_per_epoch: int = 10, epochs: int = 3) -> dict:
    """Loss/train per step, Loss/validation and Accuracy/val (in percent) once an epoch at the
    global step, Accuracy/train once an epoch at the epoch number; returns what was logged."""
    records, logged = [], {"step": [], "val_loss": [], "val_acc": [], "train_acc": []}
    for epoch in range(epochs):
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i + 1
            records.append(("Loss/train", step, 1.0 / step + offset))
            logged["step"].append(1.0 / step + offset)
        end = (epoch + 1) * steps_per_epoch
        logged["val_loss"].append(0.9 - 0.1 * epoch + offset)
        logged["val_acc"].append(0.5 + 0.1 * epoch)
        logged["train_acc"].append(0.55 + 0.1 * epoch)
        records += [("Loss/validation", end, logged["val_loss"][-1]), ("Accuracy/val", end, 100 * logged["val_acc"][-1]),
                    ("Accuracy/train", epoch, logged["train_acc"][-1])]
    _simple_value_run(folder, records)
    return logged


def test_simple_value_records_in_one_folder_are_split_and_timed_by_their_tags(tmp_path):
    root = tmp_path / "torch"
    logged = {run: _torch_style(root / run, offset=k / 10) for k, run in enumerate(["a", "b"])}
    (tmp_path / "runs.toml").write_text('[runs.a]\nbatch_size = 32\nlr = "1e-3"\n'
                                        '[runs.b]\nbatch_size = 128\nlearning_rate = 0.001\n')
    logs = load_logs(root, factors=str(tmp_path / "runs.toml"))
    s = logs.scalars
    for run, want in logged.items():
        mine = s[s["run"] == run]
        step = mine[mine["tag"] == "step_loss"].sort_values("step")
        assert step["step"].tolist() == list(range(1, 31)) and (step["split"] == "train").all()
        np.testing.assert_allclose(step["value"], want["step"], rtol=1e-6)  # more points than validation: per step
        for split, tag, key in (("validation", "epoch_loss", "val_loss"), ("validation", "epoch_accuracy", "val_acc"),
                                ("train", "epoch_accuracy", "train_acc")):
            got = mine[(mine["split"] == split) & (mine["tag"] == tag)].sort_values("step")
            assert got["step"].tolist() == [0, 1, 2], (split, tag)  # epochs numbered by order
            np.testing.assert_allclose(got["value"], want[key], rtol=1e-6)
    by = logs.runs.set_index("run")
    assert by.loc["a", "batch_size"] == 32 and by.loc["b", "batch_size"] == 128
    assert by.loc["a", "learning_rate"] == 0.001 and by.loc["a", "steps"] == 30 and by.loc["a", "epochs"] == 3
    text = "\n".join(logs.problems)
    assert "a: Accuracy/val is in percent (up to 70); divided by 100" in text
    assert "a: no per-epoch train loss in its logs" in text
    assert logs.template_hint == "task"  # neither batch norm nor the initializer varies


def test_tf_summary_by_hand_with_a_csv_and_split_folders_named_test(tmp_path):
    import tensorflow as tf

    root = tmp_path / "gradient_tape"
    values = {}
    for run, offset in (("20240101-120000", 0.0), ("20240101-130000", 0.2)):
        # The TensorFlow tutorial's layout: <run>/train and <run>/test, tags loss and accuracy at step=epoch.
        for split in ("train", "test"):
            with tf.summary.create_file_writer(str(root / run / split)).as_default():
                for epoch in range(3):
                    tf.summary.scalar("loss", 1.0 - 0.2 * epoch + offset, step=epoch)
                    tf.summary.scalar("accuracy", 0.6 + 0.1 * epoch, step=epoch)
                    tf.summary.text("note", "a text summary is skipped", step=epoch)
                    tf.summary.histogram("weights", np.arange(5.0), step=epoch)
        values[run] = 1.0 - 0.2 * 2 + offset
    (tmp_path / "runs.csv").write_text("run,initializer,batch_norm,seed\n20240101-120000,xavier,without,0\n"
                                       "20240101-130000,he_normal,with,0\nnot-a-run,he,on,1\n")
    logs = load_logs(root, factors=str(tmp_path / "runs.csv"))
    assert sorted(logs.runs["run"]) == sorted(values) and logs.template_hint == "lab"
    s = logs.scalars
    for run, final in values.items():
        for split in ("train", "validation"):
            got = s[(s["run"] == run) & (s["split"] == split) & (s["tag"] == "epoch_loss")].sort_values("step")
            assert got["value"].iloc[-1] == pytest.approx(final, rel=1e-6) and len(got) == 3
    by = logs.runs.set_index("run")
    assert by.loc["20240101-120000", "initializer"] == "glorot_normal" and not by.loc["20240101-120000", "batch_norm"]
    assert any("runs.csv: no run folder for not-a-run" in p for p in logs.problems)
    # Without --factors nothing is guessed from the folder names: each run is named with its fix.
    with pytest.raises(LogsError, match=r"20240101-120000: no hparams and no --factors; give --factors"):
        load_logs(root)


def test_a_hand_written_run_at_its_root_with_tag_splits_and_the_logdir_being_one_run(tmp_path):
    import tensorflow as tf

    run = tmp_path / "xavier_bs32_on"
    with tf.summary.create_file_writer(str(run)).as_default():
        for epoch in range(2):
            tf.summary.scalar("train_loss", 0.5 - 0.1 * epoch, step=epoch)
            tf.summary.scalar("val_loss", 0.6 - 0.1 * epoch, step=epoch)
            tf.summary.scalar("val_acc", 0.7, step=epoch)
            tf.summary.scalar("learning_rate", 0.01, step=epoch)
    _simple_value_run(run / "train", [("epoch_accuracy", 0, 0.6), ("epoch_accuracy", 1, 0.65)])
    logs = load_logs(run, factors=PATTERN)  # --logdir names the run itself
    (row,) = logs.runs.to_dict("records")
    assert row["run"] == "xavier_bs32_on" and row["batch_size"] == 32 and row["batch_norm"]
    got = logs.scalars.groupby(["split", "tag"], observed=True)["value"].last().to_dict()
    assert got == pytest.approx({("train", "epoch_loss"): 0.4, ("validation", "epoch_loss"): 0.5,
                                 ("validation", "epoch_accuracy"): 0.7, ("train", "epoch_accuracy"): 0.65})
    assert any("learning_rate (1 run)" in p for p in logs.problems)


def test_runs_with_the_same_factors_are_numbered_as_seeds_and_a_damaged_file_is_named(tmp_path):
    root = tmp_path / "runs"
    for run in ("he_bs64_bn_try1", "he_bs64_bn_try2", "he_bs64_nobn_try1"):
        _torch_style(root / run, epochs=2)
    broken = root / "he_bs64_nobn_try2"
    _torch_style(broken, epochs=2)
    (path,) = broken.glob("events.out.tfevents.*")
    path.write_bytes(path.read_bytes()[:-5])
    logs = load_logs(root, factors="{initializer}_bs{batch_size}_{batch_norm}_{_}")
    by = logs.runs.set_index("run")
    assert by["seed"].to_dict() == {"he_bs64_bn_try1": 0, "he_bs64_bn_try2": 1, "he_bs64_nobn_try1": 0}
    text = "\n".join(logs.problems)
    assert "numbered as seeds in name order: he_bs64_bn_try2 (seed 1)" in text
    assert "he_bs64_nobn_try2: root event file" in text and "is damaged" in text and "run excluded" in text


def test_parse_cache_serves_foreign_files_and_our_logs_are_untouched(fit_logs, fixture_logs, tmp_path):
    root, _, _ = fit_logs
    logs = tmp_path / "fit"
    shutil.copytree(root, logs)
    cache = tmp_path / "cache"
    cold = load_logs(logs, cache_dir=cache, factors=PATTERN)
    warm = load_logs(logs, cache_dir=cache, factors=PATTERN)
    n = len(list(logs.rglob("events.out.tfevents.*")))
    assert (cold.cache_misses, warm.cache_hits, warm.cache_misses) == (n, n, 0)
    pd.testing.assert_frame_equal(cold.scalars, warm.scalars)
    assert cold.problems == warm.problems and cold.runs.equals(warm.runs)
    nested = load_logs(tmp_path, factors=PATTERN)  # runs found below the log folder, named by their path
    assert sorted(nested.runs["run"]) == sorted(f"fit/{run}" for run in FIT_RUNS)
    ours = load_logs(fixture_logs)
    assert ours.template_hint is None and not any("written by others" in p for p in ours.problems)


def test_planned_runs_of_our_grid_still_make_a_draft_and_foreign_runs_do_not(fit_logs, tmp_path):
    root, _, _ = fit_logs
    logs = tmp_path / "fit"
    shutil.copytree(root, logs)
    assert load_logs(logs, factors=PATTERN).unfinished == {}
    (logs / "experiment.json").write_text(json.dumps({"runs": ["glorot_bs64_planned"]}))
    loaded = load_logs(logs, factors=PATTERN)
    assert loaded.unfinished == {"glorot_bs64_planned": "missing"} and len(loaded.runs) == 4
    # A run the grid names is read as our trainer's, and Keras' model-config text does not break that reader.
    (logs / "experiment.json").write_text(json.dumps({"runs": ["he_bs64_bn", "glorot_bs64_planned"]}))
    loaded = load_logs(logs, factors=PATTERN)
    assert "he_bs64_bn" not in set(loaded.runs["run"]) and len(loaded.runs) == 3
    assert any(p.startswith("he_bs64_bn: status 'unknown'") for p in loaded.problems)


@pytest.mark.parametrize("raw, field, value", [
    ("bn", "batch_norm", True), ("NoBN", "batch_norm", False), ("with", "batch_norm", True),
    ("off", "batch_norm", False), ("64", "batch_size", 64), ("64.0", "batch_size", 64),
    ("xavier", "initializer", "glorot_normal"), ("He", "initializer", "he_normal"),
    ("1e-3", "learning_rate", 0.001), ("128x64", "hidden", (128, 64)), ("128,64", "hidden", (128, 64)),
])
def test_values_are_parsed_to_the_run_field_types(raw, field, value):
    assert to_value(field, raw) == value


def test_bad_factors_are_refused_before_anything_is_read(tmp_path, capsys):
    with pytest.raises(ValueError, match="not an on/off word"):
        to_value("batch_norm", "maybe")
    assert parse_factors(PATTERN).lookup("he_bs64_maybe")[1].endswith(
        "reads batch_norm 'maybe' is not an on/off word (bn/nobn, on/off, true/false, yes/no, with/without, 1/0)")
    (tmp_path / "bad.csv").write_text("run,colour\nx,red\n")
    for bad, words in (("{colour}_bs{batch_size}", "{colour} is no run field"), ("runs.txt", "neither a pattern"),
                       (str(tmp_path / "bad.csv"), "'colour' is no run field"),
                       (str(tmp_path / "none.csv"), "no such file")):
        assert main(["--logdir", str(tmp_path), "--factors", bad, "--out", str(tmp_path / "out")]) == 2
        assert words in capsys.readouterr().err
        with pytest.raises(FactorsError):
            parse_factors(bad)
    assert suggest("glorot_normal_bs128_nobn_s2") == "{initializer}_bs{batch_size}_{batch_norm}_s{seed}"
    assert not (tmp_path / "out").exists()


def test_lab_report_of_per_epoch_only_runs_over_two_batch_sizes(tmp_path):
    import tensorflow as tf

    root = tmp_path / "epochs_only"
    for run in ("he_bs32_bn", "he_bs32_nobn", "he_bs64_bn", "he_bs64_nobn"):
        for split in ("train", "validation"):
            with tf.summary.create_file_writer(str(root / run / split)).as_default():
                for epoch in range(2):
                    tf.summary.scalar("epoch_loss", 1.0 - 0.1 * epoch, step=epoch)
    assert main(["--logdir", str(root), "--out", str(tmp_path / "out"), "--factors", PATTERN,
                 "--format", "html"]) == 0


def test_our_comparison_copies_are_not_listed_as_unused_tags():
    """Our layout read as written by others (run.json lost): the compare/ copies of the
    epoch metrics are TensorBoard's, neither used nor reported as unused."""
    from report.foreign import to_our_tags

    frame = pd.DataFrame({"step": [0, 1, 0, 1], "tag": ["epoch_loss"] * 2 + ["compare/batch_size_64/epoch_loss"] * 2,
                          "value": [0.5, 0.4, 0.5, 0.4]})
    read = to_our_tags([("validation", frame)])
    assert read.unused == [] and set(read.scalars["tag"]) == {"epoch_loss"}
