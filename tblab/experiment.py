"""The experiment folder's own files for runs logged by `LabLogger`: experiment.json
(the runs logged so far, their specs, the dataset, the title block, template) and the
experiment-level HParams config, both rewritten under one lock each time a run starts or
ends, so notebooks logging into one folder at once never lose each other's runs."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from filelock import FileLock

from contract.files import read_json_dict, write_json_atomic
from contract.layout import EXPERIMENT_MANIFEST, LOCK_DIR, TEMPLATES
from contract.spec import NoiseSettings, RunSpec, SpecError
from tblab.infer import NAME_ORDER
from trainer import events
from trainer.spec import Experiment

WRITER = "tblab.LabLogger"  # experiment.json and run.json "logged_by"
META_FIELDS = ("title", "author", "id", "date", "objective", "template")


def _specs(by_name: dict[str, Any]) -> list[RunSpec]:
    out = []
    for stored in by_name.values():
        try:
            out.append(RunSpec.from_dict(stored))
        except (SpecError, TypeError, ValueError):
            continue  # a hand-edited entry: kept in the file, left out of the HParams config
    return out


def record_run(exp_dir: Path, name: str, spec: RunSpec, *, axes: tuple[str, ...], dataset: dict,
               meta: dict, noise: NoiseSettings) -> dict:
    """Add (or update) run `name` in `exp_dir`'s experiment.json and rewrite the HParams
    config over every run listed; returns what was written. Title-block fields not given
    (None) keep the values the file already has."""
    (exp_dir / LOCK_DIR).mkdir(parents=True, exist_ok=True)
    with FileLock(exp_dir / LOCK_DIR / f"{EXPERIMENT_MANIFEST}.lock"):
        old = read_json_dict(exp_dir / EXPERIMENT_MANIFEST) or {}
        runs = [r for r in old.get("runs") or [] if isinstance(r, str)]
        specs = old.get("specs") if isinstance(old.get("specs"), list) else []
        by_name = dict(zip(runs, specs))
        by_name.update({r: {} for r in runs[len(specs):]})  # names without a spec stay listed
        by_name[name] = spec.to_dict()
        old_meta = old.get("experiment") if isinstance(old.get("experiment"), dict) else {}
        kept = {k: v for k, v in old_meta.items() if k in META_FIELDS and isinstance(v, str)}
        given = {k: v for k, v in meta.items() if v is not None}
        merged = {"title": exp_dir.name, "template": TEMPLATES[0], **kept, **given}
        old_axes = [a for a in old_meta.get("grid_axes") or [] if a in NAME_ORDER]
        grid_axes = tuple(a for a in NAME_ORDER if a in old_axes or a in axes)
        old_dataset = old.get("dataset") if isinstance(old.get("dataset"), dict) else {}
        described = {**old_dataset, **{k: v for k, v in dataset.items() if v is not None}}
        experiment = Experiment(
            name=exp_dir.name, source="", dataset=str(described.get("name", "custom")),
            validation=str(described.get("validation", "fit's validation data")),
            engine="keras", gradient_noise=noise, grid_axes=grid_axes, runs=tuple(dict.fromkeys(_specs(by_name))),
            **merged)
        data = {**old, "experiment": {**old_meta, **experiment.to_dict()}, "dataset": described,
                "runs": list(by_name), "specs": list(by_name.values()), "logged_by": WRITER}
        write_json_atomic(exp_dir / EXPERIMENT_MANIFEST, data)
        events.write_hparams_config(exp_dir, experiment)
    return data
