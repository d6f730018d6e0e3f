"""Log your own Keras training in the layout our trainer writes, for `python -m report`.

    import keras
    from tblab import LabLogger

    keras.utils.set_random_seed(0)          # the seed LabLogger records (or give seed=)
    model = ...                             # your model, compiled with metrics=["accuracy"]
    model.fit(x, y, validation_data=(xv, yv), epochs=5, batch_size=64,
              callbacks=[LabLogger("logs/myexp", initializer="glorot_normal", batch_size=64,
                                   batch_norm=True, seed=0)])

One LabLogger per fit; each run goes to logs/myexp/<run name>/ (here
init=glorot_normal,bs=64,bn=on,seed=0) with run.json, its hparams and train/ and
validation/ event files, and logs/myexp/experiment.json lists the runs logged so far.
Then `python -m report --logdir logs/myexp`. See `tblab.callback.LabLogger`.
"""
from contract.spec import NoiseSettings
from tblab.callback import LabLogger

__all__ = ["LabLogger", "NoiseSettings"]
