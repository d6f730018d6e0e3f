"""The exact loss of every training step of a Keras 3 `fit`, taken from inside the step.

Keras 3's batch logs are running means over the epoch (its loss tracker weighs each
batch by its size), so differencing them only approximates each step's loss. Instead,
for the length of one `fit`, `StepCapture` puts a wrapper around the model's
`compute_loss` (on the model object, not its class) and rebuilds the train and test
functions, which then trace through it. In a training step the wrapper stores the loss
(the value that is differentiated and that Keras averages) and the batch size in small
variables, one slot per step of an execution, so `steps_per_execution > 1` loses no step;
variable writes also compile under XLA. In a validation step it counts the examples.
After each execution the callback reads the slots. Whether a step is a training step is
decided when the function is traced, inside `guard`, which knows which function runs.

`guard` also sees every exception raised inside a training or validation call (the data
pipeline, the step itself, Ctrl-C while it computes), so the run can be closed before the
exception leaves `fit`. `restore` gives the model its own `compute_loss` and functions back.
"""
from __future__ import annotations

from collections.abc import Callable

import keras
import tensorflow as tf


class StepCapture:
    def __init__(self, model, on_error: Callable[[BaseException], None]):
        self.model, self.on_error = model, on_error
        self.slots = max(1, int(getattr(model, "steps_per_execution", 1) or 1))
        self.losses = tf.Variable(tf.zeros([self.slots], tf.float32), trainable=False)
        self.sizes = tf.Variable(tf.zeros([self.slots], tf.int64), trainable=False)
        self.count = tf.Variable(tf.constant(0, tf.int64), trainable=False)
        self.val_count = tf.Variable(tf.constant(0, tf.int64), trainable=False)
        self.read_steps = 0  # steps handed out by `new_steps`
        self._mode = None    # "train" or "test" while that function runs (and so while it is traced)
        self._own = vars(model).get("compute_loss")  # an instance attribute someone else set, kept
        original = model.compute_loss

        def compute_loss(*args, **kwargs):
            loss = original(*args, **kwargs)
            y_pred = args[2] if len(args) > 2 else kwargs.get("y_pred")
            size = tf.cast(tf.shape(keras.tree.flatten(y_pred)[0])[0], tf.int64)
            if self._mode == "train":
                slot = tf.reshape(self.count % self.slots, [1, 1])
                self.losses.scatter_nd_update(slot, tf.reshape(tf.cast(loss, tf.float32), [1]))
                self.sizes.scatter_nd_update(slot, tf.reshape(size, [1]))
                self.count.assign_add(1)
            elif self._mode == "test":
                self.val_count.assign_add(size)
            return loss

        self._old = model.train_function, model.test_function
        self._wrapper = model.compute_loss = compute_loss
        model.make_train_function(force=True)
        model.train_function = self._train = self.guard(model.train_function, "train")
        model.make_test_function(force=True)
        model.test_function = self._test = self.guard(model.test_function, "test")
        self.installed = True

    def guard(self, function, mode: str):
        def guarded(iterator):
            previous, self._mode = self._mode, mode
            try:
                return function(iterator)
            except (StopIteration, tf.errors.OutOfRangeError):
                raise  # the end of the data: how Keras' epoch loop ends
            except BaseException as exc:
                self.on_error(exc)
                raise
            finally:
                self._mode = previous
        return guarded

    def new_steps(self) -> list[tuple[float, int]]:
        """(loss, batch size) of each training step since the last call, in order."""
        count = int(self.count.numpy())
        new = count - self.read_steps
        if new > self.slots:
            raise RuntimeError(f"LabLogger: {new} steps ran in one execution, more than steps_per_execution "
                               f"({self.slots}); their losses were overwritten")
        if not new:
            return []
        losses, sizes = self.losses.numpy(), self.sizes.numpy()
        slots = [(step - 1) % self.slots for step in range(self.read_steps + 1, count + 1)]
        self.read_steps = count
        return [(float(losses[s]), int(sizes[s])) for s in slots]

    def reset_validation(self) -> None:
        self.val_count.assign(0)

    def validation_examples(self) -> int:
        return int(self.val_count.numpy())

    def restore(self) -> None:
        if not self.installed:
            return
        self.installed = False
        model = self.model
        if vars(model).get("compute_loss") is self._wrapper:
            del model.compute_loss
            if self._own is not None:
                model.compute_loss = self._own
        if model.train_function is self._train:
            model.train_function = self._old[0]
        if model.test_function is self._test:
            model.test_function = self._old[1]
