"""Keras models of the documents, built from a `RunSpec`."""
from __future__ import annotations

import keras
import tensorflow as tf

from contract.layout import STEP_LOSS
from contract.spec import RunSpec


class StepLossModel(keras.Model):
    """A Keras model that writes the loss of every training step in-graph.

    Keras 3's batch-level logs are running means over the epoch, not the loss of the
    step; writing from `compute_loss` gives one exact value per step, with the global
    step as its index, also when several steps run per execution. The summary goes to
    whatever `tf.summary` writer is the default while `fit` runs.
    """

    loss_diffs = None  # a trainer.noise_probe.LossDiffs when the roughness of the curve is measured

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        loss = super().compute_loss(x, y, y_pred, sample_weight, training=training)
        if training:
            # iterations counts applied updates, so this step is number iterations + 1.
            tf.summary.scalar(STEP_LOSS, loss, step=self.optimizer.iterations + 1)
            if self.loss_diffs is not None:
                self.loss_diffs.update(loss)
        return loss


def build_model(spec: RunSpec, *, input_shape: tuple[int, ...], classes: int) -> StepLossModel:
    """The same spec and seed give the same initial weights."""
    counter = iter(range(10_000))
    made: dict[str, int] = {}

    def name(kind: str) -> str:
        # Keras' own naming (dense, dense_1, …) without its global counter: the names do
        # not depend on what else this process (or thread) built before.
        made[kind] = made.get(kind, -1) + 1
        return kind if made[kind] == 0 else f"{kind}_{made[kind]}"

    def init():
        # One explicit seed per layer, so the weights do not depend on what ran before.
        cls = type(keras.initializers.get(spec.initializer))
        return cls(seed=spec.seed * 10_000 + next(counter))

    def dense(units, activation):
        return keras.layers.Dense(units, activation=activation, kernel_initializer=init(), name=name("dense"))

    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    if spec.architecture == "cnn":
        # Document 000: Conv2D(32, 3, relu) → MaxPool → Flatten → Dense(128, relu) → Dense(10).
        x = keras.layers.Reshape(input_shape + (1,), name=name("reshape"))(x) if len(input_shape) == 2 else x
        x = keras.layers.Conv2D(32, 3, activation=spec.activation, kernel_initializer=init(),
                                name=name("conv2d"))(x)
        if spec.batch_norm:
            x = keras.layers.BatchNormalization(name=name("batch_normalization"))(x)
        x = keras.layers.MaxPooling2D(name=name("max_pooling2d"))(x)
        x = keras.layers.Flatten(name=name("flatten"))(x)
        hidden = spec.hidden
    elif spec.architecture == "linear":
        # Document 002: a one-unit linear bottleneck in front of the softmax.
        x = keras.layers.Flatten(name=name("flatten"))(x)
        hidden = ()
        x = dense(1, "linear")(x)
    else:
        x = keras.layers.Flatten(name=name("flatten"))(x)
        hidden = spec.hidden
    for units in hidden:
        x = dense(units, spec.activation)(x)
        if spec.batch_norm:  # after each hidden Dense, as in document 003
            x = keras.layers.BatchNormalization(name=name("batch_normalization"))(x)
    outputs = dense(classes, "softmax")(x)
    model = StepLossModel(inputs=inputs, outputs=outputs, name=spec.architecture)
    return model


def make_optimizer(spec: RunSpec) -> keras.optimizers.Optimizer:
    classes = {
        "adam": keras.optimizers.Adam, "adamw": keras.optimizers.AdamW, "sgd": keras.optimizers.SGD,
        "rmsprop": keras.optimizers.RMSprop, "adagrad": keras.optimizers.Adagrad,
        "nadam": keras.optimizers.Nadam,
    }
    return classes[spec.optimizer](learning_rate=spec.learning_rate)


def summarize(model: keras.Model) -> dict:
    """Layer table and parameter counts for run.json and the report."""
    layers = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        shape = tuple(layer.output.shape)
        layers.append({
            "name": layer.name, "type": type(layer).__name__,
            "output_shape": "(" + ", ".join("None" if d is None else str(d) for d in shape) + ")",
            "params": int(layer.count_params()),
        })
    trainable = sum(int(tf.size(w)) for w in model.trainable_weights)
    total = sum(int(tf.size(w)) for w in model.weights)
    return {"layers": layers, "trainable_params": trainable, "total_params": total}
