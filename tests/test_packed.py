"""The fused engine (trainer.packed): each member of a pack trains exactly as the same
Keras model trained alone on the same batches, whatever it is packed with."""
import json
import math
import textwrap

import numpy as np
import pytest

from contract.spec import RunSpec
from trainer.spec import load_experiment

N, BATCH, CLASSES, SHAPE = 300, 32, 4, (6, 6)  # 300 = 9 × 32 + 12: the last batch is partial
INITS = ("glorot_normal", "he_normal")


def member_specs(**kw):
    """Two initializers × batch norm off/on, batch norm last as a pack orders them."""
    base = dict(hidden=(16, 8), activation="tanh", batch_size=BATCH, epochs=1, learning_rate=0.01)
    return [RunSpec(**{**base, "initializer": i, "batch_norm": bn, **kw}) for bn in (False, True) for i in INITS]


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.random((N,) + SHAPE).astype("float32")
    y = rng.integers(0, CLASSES, N).astype("int32")
    x[np.arange(N), y, y] += 2.0  # learnable
    return x, y


def dataset(x, y):
    from trainer.data import Dataset

    return Dataset("synthetic", "test", x, y, x[:250], y[:250], "test")


def train_packed(specs, x, y, *, epochs=1, poison=None, pack=None):
    """A PackedMLP (with a gradient probe of 4 × 32; `pack` if given, loaded
    with `specs`) trained over `epochs` shuffled epochs; per step and member the loss."""
    from trainer.packed import _batches
    from trainer.packed_model import PackedMLP

    if pack is None:
        pack = PackedMLP(specs, input_shape=SHAPE, classes=CLASSES, probe=(4, 32))
    else:
        pack.load(specs, (4, 32))
    if poison is not None:  # member `poison`'s first-layer weights become NaN
        units = pack.units[0]
        k = pack.kernels[0].numpy()
        k[:, poison * units:(poison + 1) * units] = np.nan
        pack.kernels[0].assign(k)
    losses, rights = [], []
    for epoch in range(epochs):
        idx, counts = _batches(N, BATCH, specs[0].seed, epoch)
        out = pack.run_chunk(dataset(x, y), idx, counts, len(counts))
        losses.append(out["losses"])
        rights.append(out["right_sum"])
    return pack, np.concatenate(losses), np.sum(rights, axis=0)


def train_keras(spec, x, y, *, epochs=1):
    """The same run as a plain Keras model, `train_on_batch` on the same batches."""
    import keras

    from trainer.models import build_model, make_optimizer
    from trainer.packed import _batches

    keras.backend.clear_session(free_memory=False)
    model = build_model(spec, input_shape=SHAPE, classes=CLASSES)
    model.compile(optimizer=make_optimizer(spec), loss=spec.loss, metrics=["accuracy"])
    losses, right = [], 0.0
    for epoch in range(epochs):
        idx, counts = _batches(N, BATCH, spec.seed, epoch)
        for rows, count in zip(idx, counts):
            out = model.train_on_batch(x[rows[:count]], y[rows[:count]], return_dict=True)
            losses.append(out["loss"])
            right += out["accuracy"] * count
    return model, np.array(losses), right


@pytest.fixture(scope="module")
def trained(data):
    x, y = data
    specs = member_specs()
    pack, losses, rights = train_packed(specs, x, y, epochs=2)
    return specs, pack, losses, rights, [train_keras(s, x, y, epochs=2) for s in specs]


def test_each_member_trains_as_keras_trains_it_alone(trained):
    specs, pack, losses, rights, keras_runs = trained
    assert losses.shape == (2 * math.ceil(N / BATCH), len(specs))
    for j, (model, ref_losses, ref_right) in enumerate(keras_runs):
        np.testing.assert_allclose(losses[:, j], ref_losses, rtol=1e-5, atol=1e-6)
        assert rights[j] == pytest.approx(ref_right, abs=1e-3)
        dense = [l for l in model.layers if type(l).__name__ == "Dense"]
        units = pack.units[0]
        np.testing.assert_allclose(pack.kernels[0].numpy()[:, j * units:(j + 1) * units],
                                   dense[0].kernel.numpy(), atol=1e-5)
        np.testing.assert_allclose(pack.kernels[-1].numpy()[j], dense[-1].kernel.numpy(), atol=1e-5)
        if specs[j].batch_norm:
            norm = [l for l in model.layers if type(l).__name__ == "BatchNormalization"][1]
            k = j - (len(specs) - pack.normed)
            np.testing.assert_allclose(pack.norms[1][2].numpy()[k, 0], norm.moving_mean.numpy(), atol=1e-5)
            np.testing.assert_allclose(pack.norms[1][3].numpy()[k, 0], norm.moving_variance.numpy(), atol=1e-5)
    assert pack.steps == 2 * math.ceil(N / BATCH)


def test_validation_matches_keras_evaluate(trained, data, monkeypatch):
    import trainer.packed_data

    specs, pack, _, _, keras_runs = trained
    x, y = data
    monkeypatch.setattr(trainer.packed_data, "EVAL_CHUNK", 64)  # 250 rows: 3 whole chunks and a padded one
    trainer.packed_data._TENSORS.clear()
    out = pack.run_chunk(dataset(x, y), np.zeros((1, BATCH), np.int32), np.zeros(1, np.int32), 0, validate=True)
    loss, accuracy = out["val_loss"], out["val_accuracy"]
    for j, (model, _, _) in enumerate(keras_runs):
        ref = model.evaluate(x[:250], y[:250], batch_size=64, verbose=0, return_dict=True)
        assert loss[j] == pytest.approx(ref["loss"], rel=1e-5)
        assert accuracy[j] == pytest.approx(ref["accuracy"], abs=1e-6)


def _copy_of(pack, specs, *, per_example=False):
    """A new pack of `specs` with `pack`'s weights and a probe of 4 × 32."""
    from trainer.packed_model import PackedMLP

    copy = PackedMLP(specs, input_shape=SHAPE, classes=CLASSES, probe=(4, 32), per_example=per_example)
    for variable, value in zip(copy.state, pack.state):
        variable.assign(value)
    return copy


def _probe_after_a_still_step(pack, x, y, rows, batch, *, cross: bool = False):
    """The probe inside a training step that changes no weight (learning rate 0): its
    (|G_small|², |G_big|², cosine of the step's gradient with G_big), per member, and with
    `cross` the dot product of the two."""
    pack.optimizer.learning_rate.assign(0.0)
    out = pack.run_chunk(dataset(x, y), batch[None].astype(np.int32), np.array([len(batch)], np.int32), 1,
                         probes={0: rows})
    return (out["probe_small"][0], out["probe_big"][0], out["probe_cosine"][0]) + ((out["probe_cross"][0],) if cross else ())


def test_gradient_probe_matches_the_single_model_probe(trained, data):
    """The probe inside the training program, against the Keras engine's probe on the same
    weights; with per-example norms for the members without batch norm it takes the
    batch-norm members' gradients only, with the same values."""
    from trainer.noise_probe import GradientProbe

    specs, pack, _, _, keras_runs = trained
    x, y = data
    ys = y[:128].reshape(4, 32)
    rows, batch = np.arange(128).reshape(4, 32), np.arange(200, 232)
    small, big, cosine, cross = _probe_after_a_still_step(_copy_of(pack, specs), x, y, rows, batch, cross=True)
    for j, (model, _, _) in enumerate(keras_runs):
        probe = GradientProbe(model, specs[j].loss)
        ref = probe.measure(x[:128].reshape((4, 32) + SHAPE), ys, x[batch], y[batch])
        np.testing.assert_allclose([small[j], big[j], cosine[j]], ref, rtol=1e-4)
        mean = np.mean([probe.gradient(x[r], y[r]) for r in rows], axis=0)
        assert cross[j] == pytest.approx(float(probe.gradient(x[batch], y[batch]) @ mean), rel=1e-4)
    assert not np.allclose(small, small[0])  # the members really differ
    mixed = _copy_of(pack, specs, per_example=True)
    normed = [j for j, spec in enumerate(specs) if spec.uses_batch_norm]
    assert mixed.probe_from == normed[0] == 2
    for got, want in zip(_probe_after_a_still_step(mixed, x, y, rows, batch), (small, big, cosine)):
        np.testing.assert_allclose(got[normed], want[normed], rtol=1e-5)


@pytest.mark.parametrize("batch", [16, BATCH])
def test_the_probe_inside_a_chunk_sees_the_weights_of_its_step(trained, data, batch):
    """A probe at step 2 of a 3-step chunk: at batch 16 (below the probe's small batch of
    32) after that step's update, so it equals the probe of a pack that trained 2 steps
    and then stood still; at batch 32 before it, at the weights of its gradient, so it
    equals the probe of a pack that trained step 1 and stood still on step 2's batch, the
    step's gradient (cosine, dot product) included."""
    specs, pack, _, _, _ = trained
    x, y = data
    rows = np.arange(128).reshape(4, 32)
    idx, counts = np.arange(3 * batch, dtype=np.int32).reshape(3, batch), np.full(3, batch, np.int32)
    inside = _copy_of(pack, specs).run_chunk(dataset(x, y), idx, counts, 3, probes={1: rows})
    assert np.isnan(inside["probe_small"][[0, 2]]).all() and np.isnan(inside["probe_cross"][[0, 2]]).all()
    with_step = batch >= 32
    assert pack.takes_step_gradient(batch) == with_step
    second = _copy_of(pack, specs)
    before = 1 if with_step else 2
    second.run_chunk(dataset(x, y), idx[:before], counts[:before], before)
    still = _probe_after_a_still_step(second, x, y, rows, idx[1 if with_step else 2], cross=True)
    keys = ("probe_small", "probe_big", "probe_cosine", "probe_cross") if with_step else ("probe_small", "probe_big")
    for key, want in zip(keys, still):
        np.testing.assert_allclose(inside[key][1], want, rtol=1e-5)
    # After the update the step's gradient is of other weights: no cross term for |G|².
    assert np.isfinite(inside["probe_cross"][1]).all() == with_step


def test_a_member_does_not_depend_on_its_pack_mates(data):
    x, y = data
    specs = member_specs()
    alone = train_packed([specs[2]], x, y)[1][:, 0]  # glorot with batch norm, trained by itself
    _, together, _ = train_packed(specs, x, y, poison=0)  # member 0 starts with NaN weights
    np.testing.assert_allclose(together[:, 2], alone, rtol=1e-5, atol=1e-6)
    assert np.isnan(together[:, 0]).all() and np.isfinite(together[:, 1:]).all()


def test_a_reused_pack_trains_as_a_new_one(data):
    """Loading other runs into a pack that has trained (weights, optimizer state and
    batch-norm statistics all moved) starts them exactly where a new pack starts them."""
    x, y = data
    pack, _, _ = train_packed(member_specs(), x, y, epochs=2)
    later = member_specs(seed=1)
    reused, reused_losses, reused_rights = train_packed(later, x, y, epochs=2, pack=pack)
    assert reused is pack
    _, new_losses, new_rights = train_packed(later, x, y, epochs=2)
    np.testing.assert_allclose(reused_losses, new_losses, rtol=1e-6)
    np.testing.assert_allclose(reused_rights, new_rights)
    with pytest.raises(ValueError, match="same structure"):
        pack.load(member_specs()[:3], None)  # 3 members: other variables


def test_build_reuses_a_released_pack_of_the_same_structure(data, monkeypatch):
    import trainer.packed as packed

    monkeypatch.setattr(packed, "_FREE", [])
    x, y = data
    lab, ds = load_experiment("lab"), dataset(x, y)
    first = packed.build(lab, [s for s in lab.runs if s.batch_size == 64 and s.seed == 0], ds)
    packed.release(first)
    second = packed.build(lab, [s for s in lab.runs if s.batch_size == 128 and s.seed == 0], ds)
    assert second is first and {s.batch_size for s in second.specs} == {128}
    assert packed.build(lab, [s for s in lab.runs if s.batch_size == 256 and s.seed == 0], ds) is not first  # in use
    packed.release(second)
    assert packed.build(lab, [s for s in lab.runs if s.batch_size == 256 and s.seed == 0][:2], ds) is not first  # 2 members


def test_build_prefers_a_released_pack_that_compiled_the_batch_size(data, monkeypatch):
    """Of two released packs of one structure, a pack of batch size B loads into the one
    whose training program XLA compiled for B, so no second copy of it is compiled."""
    import trainer.packed as packed

    monkeypatch.setattr(packed, "_FREE", [])
    x, y = data
    lab, ds = load_experiment("lab"), dataset(x, y)
    runs = {(b, seed): [s for s in lab.runs if s.batch_size == b and s.seed == seed] for b in (64, 128) for seed in (0, 1)}
    at_64 = packed.prepare(lab, runs[64, 0], ds)
    at_128 = packed.prepare(lab, runs[128, 0], ds)
    assert at_64.batch_sizes == {64} and at_128.batch_sizes == {128} and at_64 is not at_128
    packed.release(at_64)  # released first: first in line, were it not for the batch size
    packed.release(at_128)
    assert packed.build(lab, runs[128, 1], ds) is at_128
    assert packed.build(lab, runs[64, 1], ds) is at_64


def test_the_next_pack_is_prepared_ahead_only_when_it_needs_another_program(data, monkeypatch):
    """`_run_here` compiles the next pack in a thread while one trains only across
    programs (batch size, structure): the lab grid's 15 packs (5 batch sizes × 3 seeds)
    are prepared ahead at the first seed of each batch size, the rest load into the pack
    just released."""
    from trainer import executors

    x, y = data
    lab, ds = load_experiment("lab"), dataset(x, y)
    monkeypatch.setattr(executors, "_dataset", lambda experiment, allow_download: ds)
    prepared, trained = [], []
    monkeypatch.setattr(executors, "prepare_task", lambda task: prepared.append(task.indices) or task.indices)
    monkeypatch.setattr(executors, "train_one", lambda task, ahead, out: trained.append(ahead) or [])
    tasks = [executors.Task(lab, tuple(p), "unused") for p in lab.packs(list(range(len(lab.runs))))]
    list(executors._run_here(tasks, None))
    sizes = [lab.runs[t.indices[0]].batch_size for t in tasks]
    firsts = [k for k in range(len(tasks)) if k == 0 or sizes[k] != sizes[k - 1]]
    assert len(firsts) == 5 and prepared == [tasks[k].indices for k in firsts]
    assert trained == [tasks[k].indices if k in firsts else None for k in range(len(tasks))]


def test_divergence_is_recorded_per_member_at_its_first_non_finite_step():
    from trainer.packed import _record_divergence

    diverged = [None, None, 7]
    losses = np.array([[1.0, 1.0, np.nan], [np.inf, 1.0, np.nan], [np.nan, 1.0, np.nan]])
    written = _record_divergence(losses, 10, diverged)
    assert written.tolist() == [2, 3, 0]  # up to and including the first bad step; none once diverged
    assert diverged == [12, None, 7]


def test_runs_are_packed_by_shared_data_order(tmp_path):
    lab = load_experiment("lab")
    packs = lab.packs(list(range(len(lab.runs))))
    # 5 batch sizes × 3 seeds: a pack is one (batch size, seed), its 6 members the
    # initializer × batch-norm settings that share that data order.
    assert len(packs) == 15 and all(len(p) == 6 for p in packs)
    for pack in packs:
        assert len({(lab.runs[i].batch_size, lab.runs[i].seed) for i in pack}) == 1
        assert len({(lab.runs[i].initializer, lab.runs[i].batch_norm) for i in pack}) == 6
    assert sorted(i for p in packs for i in p) == list(range(90))
    path = tmp_path / "mixed.toml"
    path.write_text(textwrap.dedent("""
        [grid]
        architecture = ["mlp", "cnn"]
        initializer = ["glorot_normal", "he_normal", "lecun_normal"]
        seed = [0, 1]
        [execution]
        pack = 2
    """))
    mixed = load_experiment(str(path))
    packs = mixed.packs(list(range(len(mixed.runs))))
    cnn = [p for p in packs if mixed.runs[p[0]].architecture == "cnn"]
    assert len(cnn) == 6 and all(len(p) == 1 for p in cnn)  # only Keras trains a CNN
    mlp = [p for p in packs if mixed.runs[p[0]].architecture == "mlp"]
    assert sorted(map(len, mlp)) == [1, 1, 2, 2]  # 3 initializers per seed, at most 2 per pack
    assert all(len({mixed.runs[i].seed for i in p}) == 1 for p in mlp)
    path.write_text(path.read_text().replace("pack = 2", 'engine = "keras"'))
    keras_only = load_experiment(str(path))
    assert all(len(p) == 1 for p in keras_only.packs(list(range(len(keras_only.runs)))))


@pytest.mark.slow
def test_fused_and_keras_engines_log_the_same_layout(tmp_path, synthetic_npz):
    """The same grid on both engines: same runs, tags and step numbers, and final
    validation losses from the same distribution (the same data order, `epoch_order`, but
    different programs and initial draws: not the same bits)."""
    from tbparse import SummaryReader

    from trainer.cli import main

    finals = {}
    for engine in ("fused", "keras"):
        path = tmp_path / f"{engine}.toml"
        path.write_text(textwrap.dedent(f"""
            [data]
            validation = "test"
            [run]
            hidden = [32]
            activation = "tanh"
            epochs = 2
            [grid]
            initializer = ["glorot_normal", "he_normal"]
            batch_size = [64]
            batch_norm = [false, true]
            [execution]
            steps_per_execution = 8
            engine = "{engine}"
            [gradient_noise]
            every_examples = 640
        """))
        assert main(["--experiment", str(path), "--data", str(synthetic_npz), "--logdir", str(tmp_path)]) == 0
        exp_dir = tmp_path / engine
        df = SummaryReader(str(exp_dir), extra_columns={"dir_name"}).tensors
        layout = {(d, t): sorted(g["step"]) for (d, t), g in df.groupby(["dir_name", "tag"])}
        finals[engine] = {}
        for run in sorted(p for p in exp_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            manifest = json.loads((run / "run.json").read_text())
            assert manifest["status"] == "complete" and manifest["engine"] == engine
            assert manifest["steps"] == 2 * math.ceil(1200 / 64)
            assert layout[(f"{run.name}/train", "step_loss")] == list(range(1, manifest["steps"] + 1))
            finals[engine][run.name] = manifest["final"]["val_loss"]
        finals[engine + " layout"] = {k: v for k, v in layout.items() if not k[1].startswith("gradient/")}
        # b_simple is left out while the averaged |G|² is not positive: it may be in one only.
        # The fused engine's per-example estimator (its default without batch norm) takes no
        # cosine; the probe (Keras, and the fused engine's batch-norm runs) does.
        finals[engine + " tags"] = {k for k in layout if "b_simple" not in k[1] and "cosine" not in k[1]}
        cosine = {k[0].split("/")[0] for k in layout if "cosine" in k[1]}
        assert cosine == {r for r in finals[engine] if engine == "keras" or "bn=on" in r}
    assert finals["fused layout"] == finals["keras layout"]
    assert finals["fused tags"] == finals["keras tags"]
    for name, loss in finals["fused"].items():
        assert loss == pytest.approx(finals["keras"][name], rel=0.25)


def _example_norms_by_row_copies(pack, j, x, y):
    """Member j's (mean |g_i|², |G_B|²) on the batch (x, y) at the pack's current weights
    (a member without batch norm), computed another way: every example gets its own copy
    of every weight, so the gradient with respect to copy i is example i's term of the
    batch gradient, g_i = B times it."""
    import tensorflow as tf

    kernels, biases, _ = pack._unpack([v.numpy() for v in pack.state])
    u, n = pack.units[0], len(x)
    weights = [kernels[0][:, j * u:(j + 1) * u]] + [k[j] for k in kernels[1:]]
    offsets = [biases[0][j * u:(j + 1) * u]] + [b[j, 0] for b in biases[1:]]
    copies = [tf.Variable(np.repeat(p[None], n, axis=0)) for p in weights + offsets]
    layers = len(weights)
    with tf.GradientTape() as tape:
        h = tf.constant(x.reshape(n, -1))
        for layer in range(layers):
            h = tf.einsum("bi,bio->bo", h, copies[layer]) + copies[layers + layer]
            h = tf.tanh(h) if layer < layers - 1 else h
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, h))
    terms = [g.numpy().reshape(n, -1).astype(np.float64) for g in tape.gradient(loss, copies)]
    per_example = n * n * sum((t * t).sum(axis=1) for t in terms)
    return per_example.mean(), sum(float((t.sum(axis=0) ** 2).sum()) for t in terms)


def test_per_example_norms_match_a_gradient_per_example(data, monkeypatch):
    """contract.noise's per-example estimator reads, from each training step, mean |g_i|²
    and |G_B|² per member without batch norm (NaN for the others, which the probe
    measures): checked against per-example weight copies, two hidden layers, on a full
    batch and then a partial (padded) one; taken on one step in ⌊256 / batch⌋, and on at
    most 256 rows of it."""
    from trainer import packed_model
    from trainer.packed_model import PackedMLP

    x, y = data
    specs = member_specs()
    plain = sum(not s.uses_batch_norm for s in specs)
    monkeypatch.setattr(packed_model, "EXAMPLE_NORM_EVERY", 1)  # every step (read when traced)
    pack = PackedMLP(specs, input_shape=SHAPE, classes=CLASSES, per_example=True)
    for rows in (np.arange(BATCH), np.arange(BATCH, BATCH + 12)):  # 12 real rows of 32: padding masked
        want = [_example_norms_by_row_copies(pack, j, x[rows], y[rows]) for j in range(plain)]
        idx = np.zeros((1, BATCH), np.int32)
        idx[0, :len(rows)] = rows
        out = pack.run_chunk(dataset(x, y), idx, np.array([len(rows)], np.int32), 1)
        np.testing.assert_allclose(out["example_sq"][0, :plain], [w[0] for w in want], rtol=2e-4)
        np.testing.assert_allclose(out["batch_sq"][0, :plain], [w[1] for w in want], rtol=2e-4)
        assert (out["example_sq"][0, :plain] > out["batch_sq"][0, :plain]).all()  # tr Σ > 0
        assert np.isnan(out["example_sq"][0, plain:]).all() and np.isnan(out["batch_sq"][0, plain:]).all()
    assert pack.steps == 2
    monkeypatch.undo()
    pack = PackedMLP(specs, input_shape=SHAPE, classes=CLASSES, per_example=True)
    idx, counts = np.tile(np.arange(BATCH, dtype=np.int32), (9, 1)), np.full(9, BATCH, np.int32)
    out = pack.run_chunk(dataset(x, y), idx, counts, 9)
    assert np.flatnonzero(np.isfinite(out["example_sq"][:, 0])).tolist() == [0, 8]  # 256 / 32 = 8
    # A measurement's step always gets its norms (else a short block would have none).
    out = pack.run_chunk(dataset(x, y), idx, counts, 9, norms_at=[4])
    assert np.flatnonzero(np.isfinite(out["example_sq"][:, 0])).tolist() == [4, 7]  # iterations 9…17
    # Norms on the batch's first 16 rows only: their mean |g_i|², and the whole batch's |G_B|².
    monkeypatch.setattr(packed_model, "EXAMPLE_NORM_ROWS", 16)
    pack = PackedMLP(specs, input_shape=SHAPE, classes=CLASSES, per_example=True)
    rows = np.arange(BATCH)
    small = [_example_norms_by_row_copies(pack, j, x[rows[:16]], y[rows[:16]])[0] for j in range(plain)]
    big = [_example_norms_by_row_copies(pack, j, x[rows], y[rows])[1] for j in range(plain)]
    out = pack.run_chunk(dataset(x, y), rows[None].astype(np.int32), np.array([BATCH], np.int32), 1)
    np.testing.assert_allclose(out["example_sq"][0, :plain], small, rtol=2e-4)
    np.testing.assert_allclose(out["batch_sq"][0, :plain], big, rtol=2e-4)
