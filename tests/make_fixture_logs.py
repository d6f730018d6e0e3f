"""Write tiny, seeded TensorBoard logs in the trainer's layout with values known in advance.

Grid: initializer glorot_normal × batch size 64, 128 × batch norm off/on × seeds 0, 1, 2,
three epochs. Batch norm lowers the losses by a seed-dependent amount, so paired
differences have a spread and their t-tests are defined. One run (bs 128, BN on, seed 1) diverges; the grid lists one more run
(bs 256) that has no logs. `expected_*` give the exact numbers the report must show.

Run as a script to write a folder: python -m tests.make_fixture_logs OUT_DIR
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

EPOCHS = 3
N_TRAIN = 640
BATCH_SIZES = (64, 128)
SEEDS = (0, 1, 2)
DIVERGED = (128, True, 1)
MISSING_RUN = "init=glorot_normal,bs=256,bn=off,seed=0"


def train_loss(epoch: int, bs: int, bn: bool, seed: int) -> float:
    return round(1.0 / (epoch + 1) + 0.01 * bs / 64 + (0.0 if bn else 0.05 + 0.004 * ((seed * 7) % 3))
                 + 0.002 * seed, 6)


def val_loss(epoch: int, bs: int, bn: bool, seed: int) -> float:
    return round(train_loss(epoch, bs, bn, seed) + 0.03 - 0.004 * seed, 6)


def accuracy(epoch: int, bs: int, bn: bool, seed: int) -> float:
    return round(0.5 + 0.1 * epoch + (0.02 if bn else 0.0) - 0.001 * bs / 64 + 0.001 * seed, 6)


def step_loss(step: int, bs: int, bn: bool, seed: int) -> float:
    return round(2.0 / (1 + 0.1 * step) + 0.01 * ((step * 7 + seed) % 5), 6)


def run_name(bs: int, bn: bool, seed: int) -> str:
    return f"init=glorot_normal,bs={bs},bn={'on' if bn else 'off'},seed={seed}"


def spec(bs: int, bn: bool, seed: int) -> dict:
    return {"architecture": "mlp", "hidden": [16], "activation": "tanh", "initializer": "glorot_normal",
            "batch_norm": bn, "optimizer": "adam", "learning_rate": 0.001,
            "loss": "sparse_categorical_crossentropy", "batch_size": bs, "epochs": EPOCHS, "seed": seed}


def write(out: Path, *, title: str = "Fixture lab", author: str = "A. Student",
          template: str = "lab") -> Path:
    import tensorflow as tf
    from tensorboard.plugins.hparams import api as hp

    out.mkdir(parents=True, exist_ok=True)
    dataset = {"name": "fashion_mnist", "source": "fixture", "validation": "test set",
               "train_examples": N_TRAIN, "validation_examples": 100, "image_shape": [28, 28], "classes": 10}
    names = []
    for bs in BATCH_SIZES:
        for bn in (False, True):
            for seed in SEEDS:
                name = run_name(bs, bn, seed)
                names.append(name)
                run_dir = out / name
                diverged = (bs, bn, seed) == DIVERGED
                steps_per_epoch = N_TRAIN // bs
                writers = {s: tf.summary.create_file_writer(str(run_dir / s)) for s in ("train", "validation")}
                with tf.summary.create_file_writer(str(run_dir)).as_default():
                    hp.hparams({k: ("x".join(map(str, v)) if isinstance(v, list) else v)
                                for k, v in spec(bs, bn, seed).items()}, trial_id=name)
                step = 0
                for epoch in range(EPOCHS):
                    with writers["train"].as_default():
                        for _ in range(steps_per_epoch):
                            step += 1
                            value = float("nan") if diverged and epoch == 1 else step_loss(step, bs, bn, seed)
                            tf.summary.scalar("step_loss", value, step=step)
                        if diverged and epoch == 1:
                            tf.summary.scalar("epoch_loss", float("nan"), step=epoch)
                            break
                        tf.summary.scalar("epoch_loss", train_loss(epoch, bs, bn, seed), step=epoch)
                        tf.summary.scalar("epoch_accuracy", accuracy(epoch, bs, bn, seed), step=epoch)
                    with writers["validation"].as_default():
                        tf.summary.scalar("epoch_loss", val_loss(epoch, bs, bn, seed), step=epoch)
                        tf.summary.scalar("epoch_accuracy", accuracy(epoch, bs, bn, seed) - 0.01, step=epoch)
                for w in writers.values():
                    w.close()
                manifest = {
                    "experiment": "fixture", "run": name, "spec": spec(bs, bn, seed), "seed": seed,
                    "status": "diverged" if diverged else "complete", "steps": step,
                    "wall_seconds": 1.5, "dataset": dataset,
                    "versions": {"python": "3.11", "tensorflow": "fixture"},
                    "hardware": {"cpu": "fixture cpu", "cpu_count": 2, "gpus": []},
                    "model": {"layers": [{"name": "dense", "type": "Dense", "output_shape": "(None, 16)",
                                          "params": 12560}], "trainable_params": 12560, "total_params": 12560},
                }
                (run_dir / "run.json").write_text(json.dumps(manifest))
    experiment = {"experiment": {"name": "fixture", "title": title, "author": author, "id": "ID-1",
                                 "date": "2025-02-02", "template": template,
                                 "objective": "Fixture objective."},
                  "dataset": dataset, "runs": names + [MISSING_RUN],
                  "specs": [spec(bs, bn, s) for bs in BATCH_SIZES for bn in (False, True) for s in SEEDS]
                  + [spec(256, False, 0)],
                  "source_text": "[grid]\nbatch_size = [64, 128]\n"}
    (out / "experiment.json").write_text(json.dumps(experiment))
    return out


def expected_final(split: str, bs: int, bn: bool) -> list[float]:
    """Final-epoch loss values of the finished (non-diverged) seeds of a cell."""
    f = train_loss if split == "train" else val_loss
    return [f(EPOCHS - 1, bs, bn, s) for s in SEEDS if (bs, bn, s) != DIVERGED]


if __name__ == "__main__":
    print(write(Path(sys.argv[1])))
