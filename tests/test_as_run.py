"""The experiment as it ran: command-line overrides written into experiment.json's
source_text (trainer.as_run.as_run_text), and each run.json's "pack" entry."""
import json
import os
import textwrap

import pytest
import tomllib

from trainer.as_run import as_run_text
from trainer.spec import list_presets, load_experiment, resolve_experiment_path

FILE = textwrap.dedent('''\
    # A comment at the top.
    [experiment]
    title = "T"
    objective = """Not a table:
    [data]
    dataset = "mnist"
    epochs = 7
    """

    [data]
    dataset = "mnist"   # the digits
    validation = 0.2

    [run]
    activation = "tanh"
    epochs = 3  # three passes
    hidden = [16]

    [grid]
    batch_size = [64, 128]  # two sizes
    seed = [0, 1]
''')

FROM_CLI = "# from the command line"
LOADER_KEYS = {"dataset": "dataset", "epochs": "epochs", "limit": "limit", "path": "data_path"}


def unchanged_lines(before: str, after: str) -> list[str]:
    return [line for line in before.splitlines() if line in after.splitlines()]


def test_a_value_in_the_file_is_replaced_with_the_old_one_in_a_comment():
    text = as_run_text(FILE, {"dataset": "fashion_mnist", "epochs": 1})
    lines = text.splitlines()
    assert 'dataset = "fashion_mnist"  # from the command line (the file says "mnist")' in lines
    assert "epochs = 1  # from the command line (the file says 3)" in lines
    assert 'dataset = "mnist"   # the digits' not in lines and "epochs = 3  # three passes" not in lines
    # Everything else, comments and the multi-line string that looks like a table, is as it was.
    kept = [line for line in FILE.splitlines() if line not in ('dataset = "mnist"   # the digits',
                                                               "epochs = 3  # three passes")]
    assert [line for line in lines if line in kept] == kept
    assert len(lines) == len(FILE.splitlines())
    doc = tomllib.loads(text)
    assert doc["data"]["dataset"] == "fashion_mnist" and doc["run"]["epochs"] == 1
    assert doc["experiment"]["objective"] == tomllib.loads(FILE)["experiment"]["objective"]


def test_a_key_the_table_lacks_is_added_below_its_header():
    text = as_run_text(FILE, {"limit": 500, "path": "/data/my \"set\"\\ü.npz"})
    lines = text.splitlines()
    at = max(i for i, line in enumerate(lines) if line == "[data]")  # not the one in the objective
    assert lines[at + 1:at + 3] == ["limit = 500  # from the command line",
                                    'path = "/data/my \\"set\\"\\\\ü.npz"  # from the command line']
    assert lines[at + 3] == 'dataset = "mnist"   # the digits'
    assert tomllib.loads(text)["data"] == {"dataset": "mnist", "validation": 0.2, "limit": 500,
                                           "path": '/data/my "set"\\ü.npz'}


def test_a_missing_table_is_added_at_the_end():
    source = '[run]\nepochs = 2\n\n[grid]\nseed = [0]'  # no [data], no last newline
    text = as_run_text(source, {"dataset": "fashion_mnist", "limit": 100})
    assert text == ('[run]\nepochs = 2\n\n[grid]\nseed = [0]\n\n[data]\n'
                    'dataset = "fashion_mnist"  # from the command line\nlimit = 100  # from the command line\n')
    assert as_run_text("", {"epochs": 4}) == "[run]\nepochs = 4  # from the command line\n"


def test_epochs_over_a_grid_axis_comment_the_axis_out():
    source = textwrap.dedent("""\
        [grid]
        epochs = [
            1,  # short
            5,
        ]
        batch_size = [32, 64]
    """)
    text = as_run_text(source, {"epochs": 2})
    assert text == textwrap.dedent("""\
        [grid]
        # from the command line: epochs = 2 for every run, so this grid axis is off:
        # epochs = [
        #     1,  # short
        #     5,
        # ]
        batch_size = [32, 64]

        [run]
        epochs = 2  # from the command line
    """)
    assert tomllib.loads(text) == {"grid": {"batch_size": [32, 64]}, "run": {"epochs": 2}}


def test_no_overrides_leave_the_text_alone_and_crlf_stays():
    assert as_run_text(FILE, {}) == FILE
    assert as_run_text(FILE, {"dataset": None, "epochs": None}) == FILE
    crlf = FILE.replace("\n", "\r\n")
    text = as_run_text(crlf, {"epochs": 1, "limit": 9})
    assert "\n" not in text.replace("\r\n", "")
    assert tomllib.loads(text)["run"]["epochs"] == 1 and tomllib.loads(text)["data"]["limit"] == 9


def test_a_file_the_lines_cannot_express_is_rebuilt_from_its_values():
    source = 'data.dataset = "mnist"  # a dotted key\n[run]\nepochs = 3\n'
    text = as_run_text(source, {"limit": 5, "dataset": "fashion_mnist"})
    assert text.startswith("# The experiment file with the command-line options dataset, limit applied")
    assert tomllib.loads(text) == {"data": {"dataset": "fashion_mnist", "limit": 5}, "run": {"epochs": 3}}
    inline = as_run_text('run = {epochs = 3, seed = 1}\n', {"epochs": 1})
    assert tomllib.loads(inline) == {"run": {"epochs": 1, "seed": 1}}
    # A dotted key that the line edit can replace stays a line edit.
    dotted = as_run_text(source, {"dataset": "fashion_mnist"})
    assert dotted.splitlines()[0] == 'data.dataset = "fashion_mnist"  # from the command line (the file says "mnist")'


GRID_EPOCHS = """
[data]
limit = 300
[run]
hidden = [8]
[grid]
epochs = [1, 3]
learning_rate = [0.01, 0.1]
repeats = 2
"""

OVERRIDE_SETS = [
    {"dataset": "fashion_mnist", "epochs": 1},
    {"epochs": 2},
    {"limit": 123, "path": "some/relative.npz"},
    {"dataset": "mnist", "epochs": 4, "limit": 50, "path": "/abs/data"},
]


@pytest.mark.parametrize("overrides", OVERRIDE_SETS, ids=lambda o: ",".join(o))
@pytest.mark.parametrize("source", ["FILE", "GRID_EPOCHS", *list_presets()])
def test_as_run_text_loads_to_the_runs_the_overrides_gave(source, overrides, tmp_path):
    if source in ("FILE", "GRID_EPOCHS"):
        path = tmp_path / "given" / f"{source.lower()}.toml"
        path.parent.mkdir()
        path.write_text(globals()[source])
    else:
        path = resolve_experiment_path(source)
    ran = load_experiment(str(path), **{LOADER_KEYS[k]: v for k, v in overrides.items()})
    assert ran.overrides == {**overrides, **({"path": os.path.abspath(overrides["path"])} if "path" in overrides else {})}
    text = as_run_text(path.read_text(encoding="utf-8"), ran.overrides)
    tomllib.loads(text)
    again_path = tmp_path / path.name
    again_path.write_text(text, encoding="utf-8")
    again = load_experiment(str(again_path))
    assert again.runs == ran.runs
    assert [again.run_name(s) for s in again.runs] == [ran.run_name(s) for s in ran.runs]
    assert again.grid_axes == ran.grid_axes and again.name == ran.name
    assert (again.dataset, again.limit) == (ran.dataset, ran.limit)
    assert again.data_path == (os.path.abspath(ran.data_path) if ran.data_path else None)
    assert again.overrides == {} and as_run_text(text, {}) == text
    if "epochs" in overrides:
        assert {s.epochs for s in ran.runs} == {overrides["epochs"]}


def test_only_given_overrides_are_kept(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text(FILE)
    assert load_experiment(str(path)).overrides == {}
    exp = load_experiment(str(path), epochs=1, dataset="fashion_mnist")
    assert exp.overrides == {"dataset": "fashion_mnist", "epochs": 1}
    assert "overrides" not in exp.to_dict()


# --- real training -----------------------------------------------------------------------

PACKED = """
# Four fused runs in two packs of two.
[data]
dataset = "mnist"  # the file's choice
validation = "test"
[run]
hidden = [8]
epochs = 3
[grid]
initializer = ["glorot_normal", "he_normal"]
batch_norm = [false, true]
batch_size = [200]
[gradient_noise]
enabled = false
[execution]
pack = 2
"""


@pytest.mark.slow
def test_trained_grid_records_the_overrides_and_its_packs(tmp_path, synthetic_npz, capsys):
    from trainer.cli import main

    path = tmp_path / "packed.toml"
    path.write_text(PACKED)
    logdir = tmp_path / "logs"
    argv = ["--experiment", str(path), "--data", str(synthetic_npz), "--logdir", str(logdir),
            "--epochs", "1", "--dataset", "fashion_mnist", "--limit", "600"]
    assert main(argv) == 0
    exp_dir = logdir / "packed"
    manifest = json.loads((exp_dir / "experiment.json").read_text())
    assert manifest["overrides"] == {"dataset": "fashion_mnist", "epochs": 1, "limit": 600,
                                     "path": str(synthetic_npz)}
    lines = manifest["source_text"].splitlines()
    assert "epochs = 1  # from the command line (the file says 3)" in lines
    assert 'dataset = "fashion_mnist"  # from the command line (the file says "mnist")' in lines
    assert "limit = 600  # from the command line" in lines
    assert "# Four fused runs in two packs of two." in lines
    assert manifest["experiment"]["dataset"] == "fashion_mnist"

    runs = {p.parent.name: json.loads(p.read_text()) for p in exp_dir.glob("*/run.json")}
    assert len(runs) == 4 and all(r["status"] == "complete" and r["epochs_completed"] == 1 for r in runs.values())
    packs: dict[str, list] = {}
    for name, run in runs.items():
        pack = run["pack"]
        assert set(pack) >= {"size", "index", "id"} and pack["members"][pack["index"]] == name
        packs.setdefault(pack["id"], []).append(run)
    assert len(packs) == 2
    for members in packs.values():
        assert [m["pack"]["size"] for m in members] == [2, 2]
        assert sorted(m["pack"]["index"] for m in members) == [0, 1]
        assert members[0]["pack"]["members"] == members[1]["pack"]["members"]
        assert {m["run"] for m in members} == set(members[0]["pack"]["members"])

    # The finished runs are reused on a rerun with the same options.
    capsys.readouterr()
    assert main(argv) == 0
    assert capsys.readouterr().out.count(": already complete, skipped") == 4
    assert {p.parent.name: json.loads(p.read_text())["pack"] for p in exp_dir.glob("*/run.json")} == \
        {name: run["pack"] for name, run in runs.items()}


@pytest.mark.slow
def test_a_run_trained_alone_is_a_pack_of_one(tmp_path, synthetic_npz):
    from trainer.cli import main

    path = tmp_path / "alone.toml"
    path.write_text('[data]\nvalidation = "test"\n[run]\nhidden = [8]\nepochs = 1\nbatch_size = 300\n'
                    '[gradient_noise]\nenabled = false\n[execution]\nengine = "keras"\n')
    logdir = tmp_path / "logs"
    assert main(["--experiment", str(path), "--data", str(synthetic_npz), "--logdir", str(logdir),
                 "--limit", "600"]) == 0
    (run_json,) = (logdir / "alone").glob("*/run.json")
    run = json.loads(run_json.read_text())
    assert run["engine"] == "keras" and run["status"] == "complete"
    assert run["pack"]["size"] == 1 and run["pack"]["index"] == 0 and run["pack"]["members"] == [run["run"]]
    experiment = json.loads((logdir / "alone" / "experiment.json").read_text())
    assert experiment["overrides"] == {"limit": 600, "path": str(synthetic_npz)}
    lines = experiment["source_text"].splitlines()
    assert lines[:3] == ["[data]", f"limit = 600  {FROM_CLI}", f"path = {json.dumps(str(synthetic_npz))}  {FROM_CLI}"]


def test_no_gradient_noise_is_written_into_the_text_as_run():
    exp = load_experiment("smoke", gradient_noise=False)
    assert exp.overrides == {"gradient_noise": False} and not exp.gradient_noise.enabled
    text = as_run_text(resolve_experiment_path("smoke").read_text(), exp.overrides)
    assert "enabled = false  # from the command line" in text
    assert not load_experiment_text(text).gradient_noise.enabled


def load_experiment_text(text: str):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "smoke.toml"
        path.write_text(text)
        return load_experiment(str(path))
