"""The scalars `LabLogger` writes itself (the rest through `trainer.events`): fit's epoch
logs as the two splits' epoch scalars, and the step losses, many per graph call."""
from __future__ import annotations

import numpy as np
import tensorflow as tf
from tensorboard.plugins.scalar import metadata as scalar_metadata

from contract.layout import EPOCH_ACCURACY, STEP_LOSS


def split_logs(logs: dict, *, validation: bool) -> dict:
    """Keras' epoch logs as one split's epoch scalars: loss → epoch_loss in train/,
    val_loss → epoch_loss in validation/. A metric named otherwise than "accuracy"
    (sparse_categorical_accuracy, acc) is also written as epoch_accuracy when it is the one."""
    prefix = "val_" if validation else ""
    mine = {k.removeprefix(prefix): v for k, v in logs.items() if k.startswith("val_") == validation}
    out = {f"epoch_{k}": v for k, v in mine.items()}
    accuracies = [k for k in mine if k.endswith(("acc", "accuracy"))]
    if EPOCH_ACCURACY not in out and len(accuracies) == 1:
        out[EPOCH_ACCURACY] = mine[accuracies[0]]
    return out


# What `tf.summary.scalar` attaches to each value: the scalars plugin's metadata.
_SCALAR_METADATA = scalar_metadata.create_summary_metadata(display_name=None, description=None).SerializeToString()


def write_step_losses(writer, values, steps) -> None:
    """values[i] as `step_loss` at steps[i] to the summary writer `writer`."""
    # `_resource`: the handle `tf.summary.write` itself uses; TensorFlow has no public accessor.
    _write(writer._resource, np.array(values, np.float32), np.array(steps, np.int64))


@tf.function(autograph=False, input_signature=[tf.TensorSpec([], tf.resource), tf.TensorSpec([None], tf.float32),
                                               tf.TensorSpec([None], tf.int64)])
def _write(writer, values, steps):
    """values[i] as `step_loss` at steps[i], to the summary writer `writer` (its handle):
    one graph call for many values (eager `tf.summary.scalar` costs ≈0.5 ms a value). The
    writer is an argument, so one trace serves every run (the trainer's batched writer
    does the same, trainer.events)."""
    def write(i):
        tf.raw_ops.WriteSummary(writer=writer, step=steps[i], tensor=values[i], tag=STEP_LOSS,
                                summary_metadata=_SCALAR_METADATA)
        return i + 1

    tf.while_loop(lambda i: i < tf.shape(values)[0], write, (tf.constant(0),))
