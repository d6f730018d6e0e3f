"""A real `smoke` grid on a synthetic dataset, read back with tbparse and TensorBoard itself."""
import json
import math
import textwrap
from pathlib import Path

import numpy as np
import pytest

from contract.layout import NOISE_EPOCH_TAGS as EPOCH_TAGS
from contract.layout import NOISE_PREFIX as PREFIX
from contract.layout import NOISE_STEP_TAGS as STEP_TAGS
from contract.spec import RunSpec
from trainer.cli import main

pytestmark = pytest.mark.slow
N_TRAIN = 1200  # conftest.synthetic_arrays; smoke validates on the test set


def snapshot(folder: Path) -> dict:
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()}


def test_grid_completes_with_one_folder_per_run(smoke):
    code, exp_dir, exp = smoke
    assert code == 0
    names = {exp.run_name(s) for s in exp.runs}
    assert {p.name for p in exp_dir.iterdir() if p.is_dir() and p.name != ".locks"} == names
    for name in names:
        manifest = json.loads((exp_dir / name / "run.json").read_text())
        assert manifest["status"] == "complete"
        spec = RunSpec.from_dict(manifest["spec"])
        assert exp.run_name(spec) == name
        assert manifest["steps"] == math.ceil(N_TRAIN / spec.batch_size)
        assert manifest["examples_seen"] == N_TRAIN
        assert manifest["wall_seconds"] > 0 and manifest["versions"]["tensorflow"]
        for split in ("train", "validation"):
            assert len(list((exp_dir / name / split).glob("events.out.tfevents.*"))) == 1
    experiment = json.loads((exp_dir / "experiment.json").read_text())
    assert experiment["dataset"]["train_examples"] == N_TRAIN
    assert sorted(experiment["runs"]) == sorted(names)


def test_event_files_hold_exact_tags_and_steps(smoke):
    from tbparse import SummaryReader

    _, exp_dir, exp = smoke
    df = SummaryReader(str(exp_dir), extra_columns={"dir_name"}).tensors
    df[["run", "split"]] = df["dir_name"].str.rsplit("/", n=1, expand=True)
    for spec in exp.runs:
        name = exp.run_name(spec)
        run = df[df["run"] == name]
        tags = {s: set(run[run["split"] == s]["tag"]) for s in ("train", "validation")}
        gradient = {t for t in tags["train"] if t.startswith(PREFIX)}  # checked in test_noise.py
        assert gradient and gradient <= {PREFIX + t for t in STEP_TAGS + EPOCH_TAGS}
        bn = "on" if spec.batch_norm else "off"
        compare = {f"compare/{axis}/{m}" for axis in (f"batch_size_{spec.batch_size}", f"batch_norm_{bn}")
                   for m in ("epoch_loss", "epoch_accuracy")}
        assert {"train": tags["train"] - gradient, "validation": tags["validation"]} == {
            "train": {"epoch_loss", "epoch_accuracy", "step_loss", *compare},
            "validation": {"epoch_loss", "epoch_accuracy", *compare}}
        for split in ("train", "validation"):  # the copies hold the epoch metrics' values
            rows = run[run["split"] == split].set_index(["tag", "step"])["value"]
            for tag in compare:
                assert rows[tag].tolist() == rows[tag.rsplit("/", 1)[1]].tolist()
        steps = run[run["tag"] == "step_loss"]["step"].tolist()
        run = run[~run["tag"].str.startswith(PREFIX)]
        assert steps == list(range(1, math.ceil(N_TRAIN / spec.batch_size) + 1))
        assert np.isfinite(run["value"].astype(float)).all()
        epochs = run[run["tag"] == "epoch_loss"]
        assert sorted(epochs["step"]) == [0, 0]  # one epoch, train and validation
        manifest = json.loads((exp_dir / name / "run.json").read_text())
        val_loss = epochs[epochs["split"] == "validation"]["value"].item()
        assert val_loss == pytest.approx(manifest["final"]["val_loss"], rel=1e-6)


def test_hparams_are_logged_per_run(smoke):
    from tbparse import SummaryReader

    _, exp_dir, exp = smoke
    hp = SummaryReader(str(exp_dir), extra_columns={"dir_name"}).hparams
    for spec in exp.runs:
        got = hp[hp["dir_name"] == exp.run_name(spec)].set_index("tag")["value"].to_dict()
        want = spec.hparams()
        assert set(got) == set(want)
        for key, value in want.items():
            assert got[key] == pytest.approx(value) if isinstance(value, float) else got[key] == value


def test_tensorboard_sees_runs_and_hparams(smoke):
    from tensorboard.backend.event_processing import plugin_event_multiplexer
    from tensorboard.plugins.hparams import metadata

    _, exp_dir, exp = smoke
    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(exp_dir))
    mux.Reload()
    names = [exp.run_name(s) for s in exp.runs]
    runs = set(mux.Runs())
    assert {f"{n}/train" for n in names} <= runs and {f"{n}/validation" for n in names} <= runs
    content = mux.PluginRunToTagToContent(metadata.PLUGIN_NAME)
    config = metadata.parse_experiment_plugin_data(content["."][metadata.EXPERIMENT_TAG])
    assert {h.name for h in config.hparam_infos} >= {"initializer", "batch_size", "batch_norm", "seed"}
    assert {(m.name.group, m.name.tag) for m in config.metric_infos} >= {
        ("validation", "epoch_loss"), ("validation", "epoch_accuracy")}
    for name in names:
        assert metadata.SESSION_START_INFO_TAG in content[name]
        info = metadata.parse_session_start_info_plugin_data(content[name][metadata.SESSION_START_INFO_TAG])
        assert info.group_name == name or info.hparams["batch_size"].number_value > 0
    # the validation metric TensorBoard's HParams table shows for a run
    events = mux.Tensors(f"{names[0]}/validation", "epoch_loss")
    assert len(events) == 1


def test_custom_scalars_tab_opens_on_the_documents_comparisons(smoke):
    """Read through TensorBoard's own Custom Scalars plugin: the layout at the experiment
    root, and the runs and tags each chart shows."""
    from tensorboard.backend.event_processing import (
        data_provider,
        plugin_event_multiplexer,
    )
    from tensorboard.context import RequestContext
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.custom_scalar.custom_scalars_plugin import (
        CustomScalarsPlugin,
    )
    from tensorboard.plugins.scalar.scalars_plugin import ScalarsPlugin

    _, exp_dir, exp = smoke
    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(exp_dir))
    mux.Reload()
    plugins = {}
    context = base_plugin.TBContext(logdir=str(exp_dir), multiplexer=mux, plugin_name_to_instance=plugins,
                                    data_provider=data_provider.MultiplexerDataProvider(mux, str(exp_dir)))
    plugins["scalars"] = ScalarsPlugin(context)
    custom = CustomScalarsPlugin(context)
    ctx = RequestContext()
    layout = json.loads(custom.layout_impl(ctx, ""))
    charts = {c["title"]: c["multiline"]["tag"] for cat in layout["category"] for c in cat["chart"]}
    assert [cat["title"] for cat in layout["category"]] == [
        "Per batch size: BN on and off, train and validation", "Per batch-norm setting: batch sizes side by side",
        "Gradient noise"]
    assert list(charts)[:6] == ["batch 64: loss, BN on and off", "batch 64: accuracy, BN on and off",
                                "batch 256: loss, BN on and off", "batch 256: accuracy, BN on and off",
                                "BN off: loss, batch sizes side by side", "BN off: accuracy, batch sizes side by side"]

    def shown(title):
        """{(run, tag)} the chart draws, as the frontend asks: each run, the chart's regex."""
        out = set()
        for run in mux.Runs():
            for pattern in charts[title]:
                out |= {(run, tag) for tag in custom.scalars_impl(ctx, run, pattern, "")["tag_to_events"]}
        return out

    names = {s: exp.run_name(s) for s in exp.runs}
    want = {(f"{names[s]}/{split}", "compare/batch_size_64/epoch_loss")
            for s in exp.runs if s.batch_size == 64 for split in ("train", "validation")}
    assert shown("batch 64: loss, BN on and off") == want
    assert {s.batch_norm for s in exp.runs if s.batch_size == 64} == {False, True}
    assert {run.rsplit("/", 1)[0] for run, _ in shown("BN on: accuracy, batch sizes side by side")} == {
        names[s] for s in exp.runs if s.batch_norm}
    noise = shown("B_simple at epoch ends, with its 95% interval")
    assert {tag for _, tag in noise} >= {"gradient/epoch_b_simple"} and {r for r, _ in noise} <= {
        f"{n}/train" for n in names.values()}


def test_a_skipped_run_logged_before_the_comparison_tags_is_named(smoke, synthetic_npz, capsys):
    _, exp_dir, exp = smoke
    path = exp_dir / exp.run_name(exp.runs[0]) / "run.json"
    text = path.read_text()
    manifest = json.loads(text)
    assert manifest.pop("comparison_tags") is True  # every run of this trainer writes them
    path.write_text(json.dumps(manifest))
    try:
        capsys.readouterr()
        assert main(["--experiment", "smoke", "--data", str(synthetic_npz), "--logdir", str(exp_dir.parent)]) == 0
        out = capsys.readouterr().out
    finally:
        path.write_text(text)
    assert out.count("already complete, skipped") == len(exp.runs)  # still reused: its numbers are the same
    assert "note: 1 skipped run(s) were logged before the compare/ tags" in out and exp.run_name(exp.runs[0]) in out


def test_the_batched_writer_refuses_a_tag_outside_the_layout(tmp_path):
    import tensorflow as tf

    from trainer.events import BatchedWriter

    writers = [{s: tf.summary.create_file_writer(str(tmp_path / s)) for s in ("train", "validation")}]
    writer = BatchedWriter(writers)
    writer.add(0, "train", {"compare/batch_size_64/epoch_loss": 0.5, "epoch_loss": 0.5}, 0)
    with pytest.raises(KeyError, match="not a tag of the log layout: 'epoch_los'"):
        writer.add(0, "train", {"epoch_los": 0.5}, 0)
    writer.close()


def test_rerun_skips_complete_runs_and_restarts_partial_ones(smoke, synthetic_npz, capsys):
    _, exp_dir, exp = smoke
    names = [exp.run_name(s) for s in exp.runs]
    before = snapshot(exp_dir / names[0])
    # simulate a run killed mid-way: status running and a half-written extra event file
    victim = exp_dir / names[3]
    manifest = json.loads((victim / "run.json").read_text())
    manifest["status"] = "running"
    (victim / "run.json").write_text(json.dumps(manifest))
    (victim / "train" / "events.out.tfevents.0.partial.v2").write_bytes(b"\x00" * 7)
    capsys.readouterr()
    assert main(["--experiment", "smoke", "--data", str(synthetic_npz), "--logdir", str(exp_dir.parent)]) == 0
    out = capsys.readouterr().out
    assert out.count("already complete, skipped") == len(names) - 1
    assert f"run 4/{len(names)} {names[3]}: complete" in out
    assert snapshot(exp_dir / names[0]) == before
    assert not (victim / "train" / "events.out.tfevents.0.partial.v2").exists()
    assert len(list((victim / "train").glob("events.out.tfevents.*"))) == 1
    assert json.loads((victim / "run.json").read_text())["status"] == "complete"


def tensorboard_status(run_dir):
    """(HParams session status, run_status text) as TensorBoard reads them from the run's root."""
    from tensorboard.backend.event_processing import plugin_event_multiplexer
    from tensorboard.plugins.hparams import api_pb2, metadata

    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(run_dir))
    mux.Reload()
    content = mux.PluginRunToTagToContent(metadata.PLUGIN_NAME)["."]
    end = metadata.parse_session_end_info_plugin_data(content[metadata.SESSION_END_INFO_TAG])
    (text,) = mux.Tensors(".", "run_status")
    return api_pb2.Status.Name(end.status), text.tensor_proto.string_val[0].decode()


def test_diverged_run_is_marked_and_the_grid_goes_on(tmp_path, synthetic_npz, capsys):
    path = tmp_path / "blowup.toml"
    path.write_text(textwrap.dedent("""
        [data]
        validation = "test"
        [run]
        activation = "relu"
        optimizer = "sgd"
        epochs = 2
        hidden = [16]
        [grid]
        learning_rate = [1e30, 0.01]
        batch_size = [100]
    """))
    code = main(["--experiment", str(path), "--data", str(synthetic_npz), "--logdir", str(tmp_path / "logs")])
    assert code == 0
    statuses = {}
    for run_dir in (tmp_path / "logs" / "blowup").glob("*/run.json"):
        m = json.loads(run_dir.read_text())
        statuses[m["spec"]["learning_rate"]] = m
    assert statuses[1e30]["status"] == "diverged"
    assert tensorboard_status(tmp_path / "logs" / "blowup" / statuses[1e30]["run"]) == (
        "STATUS_FAILURE", f"diverged: non-finite loss by step {statuses[1e30]['diverged_at_step']}")
    assert tensorboard_status(tmp_path / "logs" / "blowup" / statuses[0.01]["run"]) == (
        "STATUS_SUCCESS", "complete")
    assert statuses[1e30]["steps"] < 2 * 12 and statuses[1e30]["epochs_completed"] < 2
    assert statuses[0.01]["status"] == "complete" and statuses[0.01]["epochs_completed"] == 2
    assert "1 diverged" in capsys.readouterr().out


def test_same_spec_and_seed_give_same_initial_weights():
    from trainer.models import build_model

    spec = RunSpec(initializer="he_normal", hidden=(8,), batch_norm=True, seed=4)
    a, b = (build_model(spec, input_shape=(28, 28), classes=10) for _ in range(2))
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(wa, wb)
    c = build_model(RunSpec(initializer="he_normal", hidden=(8,), seed=5), input_shape=(28, 28), classes=10)
    assert not np.array_equal(a.get_weights()[0], c.get_weights()[0])


@pytest.mark.parametrize("architecture", ["cnn", "linear"])
def test_document_architectures_build(architecture):
    from trainer.models import build_model, summarize

    model = build_model(RunSpec(architecture=architecture), input_shape=(28, 28), classes=10)
    summary = summarize(model)
    types = [layer["type"] for layer in summary["layers"]]
    if architecture == "cnn":
        assert types == ["Reshape", "Conv2D", "MaxPooling2D", "Flatten", "Dense", "Dense"]
        assert summary["total_params"] == 320 + 13 * 13 * 32 * 128 + 128 + 1290
    else:
        assert types == ["Flatten", "Dense", "Dense"] and summary["total_params"] == 785 + 20


def test_unwritable_logdir_fails_before_training(tmp_path, synthetic_npz, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code = main(["--experiment", "smoke", "--data", str(synthetic_npz), "--logdir", str(blocker)])
    assert code == 2
    assert "cannot write to the log folder" in capsys.readouterr().err


def test_hparams_config_lists_the_grid_axes_first(tmp_path):
    """TensorBoard's HParams table shows the first hparams by default: the grid's axes."""
    import tensorflow as tf
    from tensorboard.plugins.hparams import metadata

    from trainer.events import write_hparams_config
    from trainer.spec import load_experiment

    exp = load_experiment("lab")
    write_hparams_config(tmp_path, exp)
    (event_file,) = tmp_path.glob("events.out.tfevents.*")
    names = None
    for event in tf.compat.v1.train.summary_iterator(str(event_file)):
        for value in event.summary.value:
            if value.metadata.plugin_data.plugin_name == metadata.PLUGIN_NAME:
                data = metadata.parse_experiment_plugin_data(value.metadata.plugin_data.content)
                names = [h.name for h in data.hparam_infos]
    assert names[:4] == ["initializer", "batch_size", "batch_norm", "seed"]
