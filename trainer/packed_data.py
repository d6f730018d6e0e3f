"""The fused engine's dataset as tensors (`tensors`), made once per dataset and shared by
every pack a process trains (`trainer.packed_model`)."""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from trainer.data import Dataset

EVAL_CHUNK = 2048  # validation examples per step of the validation pass


class Tensors(NamedTuple):
    x: tf.Tensor      # training inputs [examples, inputs]
    x_sq: tf.Tensor   # their squared norms [examples] (per-example gradient norms)
    y: tf.Tensor      # training labels [examples]
    x_val: tf.Tensor  # validation inputs in chunks [chunks, EVAL_CHUNK, inputs], zero-padded
    y_val: tf.Tensor  # [chunks, EVAL_CHUNK]
    w_val: tf.Tensor  # 1 for a real row, 0 for padding


_TENSORS: dict[int, tuple[Dataset, Tensors]] = {}


def tensors(data: Dataset) -> Tensors:
    """The dataset as tensors, made once per dataset and shared by every pack this process
    trains."""
    entry = _TENSORS.get(id(data))
    if entry is None or entry[0] is not data:
        _TENSORS.clear()
        n, size = len(data.x_val), min(EVAL_CHUNK, len(data.x_val))
        chunks = math.ceil(n / size)
        x_val = np.zeros((chunks * size, int(np.prod(data.x_val.shape[1:]))), np.float32)
        x_val[:n] = data.x_val.reshape(n, -1)
        y_val = np.zeros(chunks * size, data.y_val.dtype)
        y_val[:n] = data.y_val
        w_val = (np.arange(chunks * size) < n).astype(np.float32)
        x = data.x_train.reshape(len(data.x_train), -1)
        entry = (data, Tensors(tf.constant(x), tf.constant(np.square(x, dtype=np.float32).sum(axis=1)),
                               tf.constant(data.y_train),
                               tf.constant(x_val.reshape(chunks, size, -1)), tf.constant(y_val.reshape(chunks, size)),
                               tf.constant(w_val.reshape(chunks, size))))
        _TENSORS[id(data)] = entry
    return entry[1]
