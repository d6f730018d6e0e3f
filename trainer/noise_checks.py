"""The trainer's checks of [gradient_noise] against the runs and the data: refused at
load time (exit 2, before anything is written), each with the fix named."""
from __future__ import annotations

from contract.spec import PER_EXAMPLE, NoiseSettings
from trainer.spec import Experiment, ExperimentError


def estimator_problem(experiment: Experiment) -> str | None:
    """Why `[gradient_noise] estimator = "per_example"` cannot serve the experiment's runs
    (None if it can, or another estimator is chosen)."""
    noise = experiment.gradient_noise
    if not (noise.enabled and noise.estimator == PER_EXAMPLE):
        return None
    if any(r.batch_size < 2 for r in experiment.runs):
        return '"per_example" needs batches of at least 2 examples: use estimator = "probe" or "auto" for batch_size = 1'
    if any(r.uses_batch_norm for r in experiment.runs):
        # Its example's gradient depends on the whole batch (contract.noise says why).
        return ('"per_example" needs models without batch norm (with it, an example\'s gradient depends on '
                'the whole batch): use estimator = "auto" (the probe for the batch-norm runs) or "probe"')
    other = sorted({experiment.engine_of(r) for r in experiment.runs} - {"fused"})
    if other:
        return ('"per_example" needs the fused engine (an MLP or linear model with integer labels, float32, '
                f'[execution] engine = "fused"), and some runs take the {" and ".join(other)} engine: use '
                'estimator = "probe", or "auto" (per-example where the engine can, the probe elsewhere)')
    return None


def check_noise_fits_limit(experiment: Experiment) -> None:
    """ExperimentError when the gradient-noise probe's big batch cannot fit in the training
    examples the experiment's limit leaves (at most `limit`, less the validation split when
    that is a fraction): the trainer's command line refuses it before TensorFlow or the
    data are loaded; `trainer.grid.check_fits` checks the data itself."""
    noise, limit = experiment.gradient_noise, experiment.limit
    if not experiment.uses_probe or limit is None:
        return
    validation = experiment.validation
    train = limit if validation == "test" else limit - max(1, int(round(limit * float(validation))))
    if noise.big_batch > train:
        where = (f"--limit {limit} (LIMIT= with make)" if "limit" in experiment.overrides
                 else f"[data] limit = {limit}")
        raise ExperimentError(f"{experiment.source}: [gradient_noise]: "
                              + noise_fix(noise, train, f"the {train} training examples left by {where}"))


def noise_fix(noise: NoiseSettings, examples: int, what: str) -> str:
    """Why the gradient-noise probe cannot run on `examples` training examples, and the
    ways out (also used by `trainer.grid.check_fits`)."""
    return (f"the gradient-noise probe takes batches × small_batch = {noise.batches} × {noise.small_batch} = "
            f"{noise.big_batch} training examples at once, more than {what}. Raise the limit to at least "
            f"{noise.big_batch} (LIMIT= with make, --limit), lower [gradient_noise] batches or small_batch "
            f"(their product at most {examples}), or train without the probe: NOISE=0 with make, "
            "--no-gradient-noise, or [gradient_noise] enabled = false")
