"""Names of the log layout, each defined once.

    logs/<experiment>/
        experiment.json                 the grid as planned (EXPERIMENT_MANIFEST)
        events.out.tfevents.*           the HParams config of the whole grid
        .locks/<run>.lock, .owner.json  who is training a run (LOCK_DIR)
        <run>/run.json                  the run's spec, status and final values (RUN_MANIFEST)
        <run>/events.out.tfevents.*     its hparams and run status (RUN_STATUS_TAG)
        <run>/train/events...           STEP_LOSS at steps 1..N, EPOCH_METRICS at epoch 0..E-1,
                                        gradient noise (NOISE_PREFIX + NOISE_*_TAGS), and the
                                        EPOCH_METRICS again under `comparison_tags`
        <run>/validation/events...      EPOCH_METRICS at epoch 0..E-1 (and their comparison tags)

    The root's event file also holds the Custom Scalars layout (`trainer.events`).
"""
from __future__ import annotations

import re

# -- files and folders ---------------------------------------------------------------
EXPERIMENT_MANIFEST = "experiment.json"
RUN_MANIFEST = "run.json"
LOCK_DIR = ".locks"
EVENT_FILE_GLOB = "events.out.tfevents.*"

# -- splits: a run's subfolders, one event file each ----------------------------------
TRAIN, VALIDATION = "train", "validation"
SPLITS = (TRAIN, VALIDATION)

# -- scalar tags ------------------------------------------------------------------------
STEP_LOSS = "step_loss"            # train/, one value per optimizer step (from step 1)
EPOCH_LOSS = "epoch_loss"          # train/ and validation/, step = epoch index (from 0)
EPOCH_ACCURACY = "epoch_accuracy"
EPOCH_METRICS = (EPOCH_LOSS, EPOCH_ACCURACY)
RUN_STATUS_TAG = "run_status"      # a text summary at the run's root: "diverged: ..."

# Gradient noise, in train/: measured at the global step...
NOISE_PREFIX = "gradient/"
NOISE_G2, NOISE_TRACE, NOISE_B_SIMPLE = "G2", "trace_sigma", "b_simple"
NOISE_AT_BATCH, NOISE_COSINE = "noise_at_batch", "cosine"
NOISE_STEP_TAGS = (NOISE_G2, NOISE_TRACE, NOISE_B_SIMPLE, NOISE_AT_BATCH, NOISE_COSINE)
# ...and the epoch-end values again at step = epoch index, plus the loss curve's roughness.
NOISE_EPOCH_B_SIMPLE, NOISE_EPOCH_AT_BATCH = "epoch_b_simple", "epoch_noise_at_batch"
NOISE_EPOCH_COSINE, NOISE_ROUGHNESS = "epoch_cosine", "loss_roughness"
# The 95% interval of the epoch-end B_simple (see contract/noise.py for how it is formed).
NOISE_EPOCH_B_LOW, NOISE_EPOCH_B_HIGH = "epoch_b_simple_low", "epoch_b_simple_high"
NOISE_EPOCH_TAGS = (NOISE_EPOCH_B_SIMPLE, NOISE_EPOCH_AT_BATCH, NOISE_EPOCH_COSINE, NOISE_ROUGHNESS,
                    NOISE_EPOCH_B_LOW, NOISE_EPOCH_B_HIGH)


def noise_tag(name: str) -> str:
    """The full tag of a gradient-noise scalar, e.g. "gradient/b_simple"."""
    return NOISE_PREFIX + name


NOISE_TAGS = tuple(noise_tag(t) for t in NOISE_STEP_TAGS + NOISE_EPOCH_TAGS)
# Every scalar tag our trainer writes, in a fixed order (the fused engine's tag ids).
SCALAR_TAGS = (STEP_LOSS, *EPOCH_METRICS, *NOISE_TAGS)

# -- TensorBoard's Custom Scalars tab ----------------------------------------------------
# Its charts pick tags by regular expression, over every run: a chart of one batch size's
# runs (BN on and off side by side) needs tags that only those runs write. So each epoch
# metric is also written, at the same epoch index, under one tag naming the run's batch
# size and one naming its batch-norm setting (`comparison_tags`). The report reads none
# of them (`is_comparison_tag`): they repeat EPOCH_METRICS.
COMPARE_PREFIX = "compare/"
BN_NAMES = {True: "on", False: "off"}


def comparison_tags(metric: str, batch_size: int, batch_norm: bool) -> tuple[str, str]:
    """The copies of epoch `metric` for a run: by batch size, by batch-norm setting."""
    return (f"{COMPARE_PREFIX}batch_size_{int(batch_size)}/{metric}",
            f"{COMPARE_PREFIX}batch_norm_{BN_NAMES[bool(batch_norm)]}/{metric}")


def is_comparison_tag(tag: str) -> bool:
    return tag.startswith(COMPARE_PREFIX)


# run.json's key that says a run wrote the comparison tags (runs logged before they existed
# did not, and are missing from the Custom Scalars charts until retrained).
COMPARISON_MANIFEST_KEY = "comparison_tags"


# -- run statuses (run.json "status") ----------------------------------------------------
RUNNING, COMPLETE, DIVERGED, FAILED, INTERRUPTED = "running", "complete", "diverged", "failed", "interrupted"
STATUSES = (RUNNING, COMPLETE, DIVERGED, FAILED, INTERRUPTED)
# A run in one of these states has a result that rerunning the same spec would repeat.
FINISHED = (COMPLETE, DIVERGED)

# -- report templates and outputs ------------------------------------------------------------
TEMPLATES = ("lab", "task", "results")
REPORT_HTML, REPORT_PDF, REPORT_TABLES, REPORT_CACHE = "report.html", "report.pdf", "tables", ".cache"
REPORT_OUTPUTS = (REPORT_HTML, REPORT_PDF, REPORT_TABLES, REPORT_CACHE)  # all a report folder holds

# -- text: what a title block may hold ------------------------------------------------------
# Checked by the trainer when it reads an experiment file, and cut to by the report.
TEXT_LIMITS = {"title": 300, "author": 300, "id": 100, "objective": 4000}
DATE_LIMIT = 300
SOURCE_TEXT_LIMIT = 50_000
# Control characters other than tab and newline: NUL and friends break HTML and PDF text.
CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def control_characters(text: str) -> list[str]:
    """The control characters in `text`, as sorted U+XXXX names (empty: none)."""
    return sorted({f"U+{ord(c):04X}" for c in text if CONTROL_RE.match(c)})


def printable(text: str) -> str:
    """`text` with each control character shown as U+FFFD."""
    return CONTROL_RE.sub("\ufffd", text)


def clip(text: object, limit: int) -> str:
    """`text` cut to `limit` characters (the last one an ellipsis when cut)."""
    text = str(text)
    return text if len(text) <= limit else text[:limit - 1] + "…"
