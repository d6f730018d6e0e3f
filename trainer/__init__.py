"""Experiment files → grids of Keras runs logged to TensorBoard."""
