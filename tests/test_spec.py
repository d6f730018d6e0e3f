"""Experiment files: grid expansion, names, and the messages for bad input."""
import textwrap

import pytest

from trainer.cli import main
from contract.spec import RunSpec
from trainer.spec import ExperimentError, list_presets, load_experiment

VALID = """
[experiment]
title = "T"
[data]
dataset = "mnist"
validation = 0.2
[run]
activation = "tanh"
epochs = 3
[grid]
initializer = ["xavier", "uniform", "he"]
batch_size = [64, 128]
batch_norm = [false, true]
repeats = 2
"""


def write(tmp_path, text, name="exp.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_grid_is_the_cross_product_with_aliases_resolved(tmp_path):
    exp = load_experiment(str(write(tmp_path, VALID)))
    assert len(exp.runs) == 3 * 2 * 2 * 2
    assert {r.initializer for r in exp.runs} == {"glorot_normal", "random_uniform", "he_normal"}
    assert {r.seed for r in exp.runs} == {0, 1}
    assert all(r.activation == "tanh" and r.epochs == 3 for r in exp.runs)
    assert exp.validation == 0.2 and exp.dataset == "mnist"
    names = [exp.run_name(r) for r in exp.runs]
    assert len(set(names)) == len(names)
    assert names[0] == "init=glorot_normal,bs=64,bn=off,seed=0"


def test_overrides_replace_file_values(tmp_path):
    exp = load_experiment(str(write(tmp_path, VALID)), dataset="fashion_mnist", epochs=1, limit=500)
    assert exp.dataset == "fashion_mnist" and exp.limit == 500
    assert {r.epochs for r in exp.runs} == {1}


def test_every_preset_loads():
    presets = list_presets()
    for needed in ("lab", "lab3-mnist", "smoke", "batch-noise-cnn", "batch-noise-mlp",
                   "linear-large-batch", "batchnorm-mlp"):
        assert needed in presets
    for name in presets:
        assert load_experiment(name).runs


def test_lab3_mnist_is_document_004():
    exp = load_experiment("lab3-mnist")
    # 004's grid (3 initializers × 5 batch sizes × BN off/on), with 3 seeds so that the
    # report can test its comparisons.
    assert exp.dataset == "mnist" and len(exp.runs) == 90
    assert sorted({r.seed for r in exp.runs}) == [0, 1, 2]
    assert sorted({r.seed for r in load_experiment("lab").runs}) == [0, 1, 2]
    run = exp.runs[0]
    assert (run.activation, run.optimizer, run.learning_rate, run.epochs) == ("tanh", "adam", 0.001, 5)
    assert sorted({r.batch_size for r in exp.runs}) == [64, 128, 256, 512, 1024]


def test_smoke_is_a_2x2x2_grid_of_one_epoch():
    exp = load_experiment("smoke")
    assert len(exp.runs) == 8 and {r.epochs for r in exp.runs} == {1}


def test_runspec_round_trips_through_dict():
    spec = RunSpec(hidden=(128, 64), batch_norm=True, seed=3)
    assert RunSpec.from_dict(spec.to_dict()) == spec
    assert spec.hparams()["hidden"] == "128x64"


BAD = {
    "unknown key, with suggestion": ("[run]\nactivaton = 'tanh'\n", ["[run] activaton", "did you mean 'activation'"]),
    "unknown initializer": ("[grid]\ninitializer = ['xavierr']\n", ["[grid] initializer", "valid values", "glorot_normal"]),
    "unknown optimizer": ("[run]\noptimizer = 'adamm'\n", ["[run] optimizer", "adam", "sgd"]),
    "unknown dataset": ("[data]\ndataset = 'cifar'\n", ["[data] dataset", "mnist, fashion_mnist"]),
    "unknown activation": ("[run]\nactivation = 'tanhh'\n", ["[run] activation", "relu"]),
    "negative batch size": ("[grid]\nbatch_size = [64, -1]\n", ["[grid] batch_size", "positive integer"]),
    "zero epochs": ("[run]\nepochs = 0\n", ["[run] epochs", "positive integer"]),
    "split outside (0,1)": ("[data]\nvalidation = 1.5\n", ["[data] validation", "(0, 1)"]),
    "empty grid list": ("[grid]\nbatch_size = []\n", ["[grid] batch_size", "at least one value"]),
    "grid value not a list": ("[grid]\nbatch_size = 64\n", ["[grid] batch_size", "must be a list"]),
    "unknown table": ("[trainng]\nepochs = 2\n", ["[trainng]", "valid tables"]),
    "invalid toml": ("[run\nepochs = 2\n", ["invalid TOML"]),
    "wrong type for a number": ("[run]\nlearning_rate = 'fast'\n", ["[run] learning_rate", "positive number"]),
    "negative learning rate": ("[grid]\nlearning_rate = [0.1, -0.01]\n", ["[grid] learning_rate", "positive number"]),
    "boolean given as a word": ("[grid]\nbatch_norm = ['yes']\n", ["[grid] batch_norm", "true or false"]),
    "zero-width layer": ("[run]\nhidden = [128, 0]\n", ["[run] hidden", "positive layer widths"]),
    "typo in template": ("[experiment]\ntemplate = 'labb'\n", ["[experiment] template", "did you mean 'lab'"]),
    "zero steps per execution": ("[execution]\nsteps_per_execution = 0\n", ["[execution] steps_per_execution"]),
    "typo in the engine": ("[execution]\nengine = 'fuse'\n", ["[execution] engine", "did you mean 'fused'", "fused, keras"]),
    "pack of zero runs": ("[execution]\npack = 0\n", ["[execution] pack", "positive integer"]),
    "unknown gradient-noise key": ("[gradient_noise]\nevry = 100\n", ["[gradient_noise] evry", "did you mean 'every_examples'", "small_batch"]),
    "one small batch": ("[gradient_noise]\nbatches = 1\n", ["[gradient_noise] batches", "at least 2"]),
    "EMA weight of 1": ("[gradient_noise]\nbeta = 1.0\n", ["[gradient_noise] beta", "[0, 1)"]),
    "negative probe seed": ("[gradient_noise]\nprobe_seed = -1\n", ["[gradient_noise] probe_seed", "integer ≥ 0"]),
    "gradient noise switch as a word": ("[gradient_noise]\nenabled = 'no'\n", ["[gradient_noise] enabled", "true or false"]),
    "repeats and seeds both": ("[grid]\nrepeats = 2\nseed = [0, 1]\n", ["[grid] repeats", "not both"]),
    "NUL in the title": ('[experiment]\ntitle = "a\\u0000b"\n', ["[experiment] title", "U+0000"]),
    "very long author": (f"[experiment]\nauthor = '{'x' * 5000}'\n", ["[experiment] author", "limit is 300"]),
    "huge grid without confirmation": (
        "[grid]\nbatch_size = %s\nseed = %s\n" % (list(range(1, 31)), list(range(30))),
        ["[grid]", "900 runs", "--confirm-large"]),
    "file name that is not a folder name": ("[run]\nepochs = 1\n", ["file name", "rename the file"], "my exp<1>.toml"),
    "dot-dot file name": ("[run]\nepochs = 1\n", ["file name", "rename the file"], "...toml"),
    "not UTF-8": (b"\xff\xfe[run]\n", ["not a UTF-8 text file"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_files_exit_2_with_one_message_naming_file_and_key(case, tmp_path, capsys):
    text, expected, *name = BAD[case]
    path = tmp_path / (name[0] if name else "exp.toml")
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(textwrap.dedent(text))
    logdir = tmp_path / "logs"
    assert main(["--experiment", str(path), "--logdir", str(logdir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert str(path) in err
    for piece in expected:
        assert piece in err, (piece, err)
    assert not logdir.exists()


def test_all_problems_reported_at_once(tmp_path):
    path = write(tmp_path, "[run]\nepochs = -2\nactivation = 'nope'\n")
    with pytest.raises(ExperimentError, match="2 problem"):
        load_experiment(str(path))


def test_unknown_preset_lists_the_presets(capsys):
    assert main(["--experiment", "no-such-preset"]) == 2
    assert "lab3-mnist" in capsys.readouterr().err


def test_huge_grid_needs_confirmation(tmp_path):
    path = write(tmp_path, "[grid]\nbatch_size = %s\nseed = %s\n" % (list(range(1, 31)), list(range(30))))
    with pytest.raises(ExperimentError, match="--confirm-large"):
        load_experiment(str(path))
    assert len(load_experiment(str(path), confirm_large=True).runs) == 900
