"""Which checkpoint a run continues from: ``--resume auto`` / ``--resume PATH``.

``auto`` continues only a run whose saved config matches the current one in every field that
changes the numbers (``RESUME_FIELDS``: the model's shape, the data, the optimizer, the diffusion,
the objective and transport, batch / precision / seed / EMA decay): two experiments that share a --results-dir and differ in
--lr never continue each other. Among the matching checkpoints the newest by time wins (a run
restarted from an older step overwrites the later steps of its abandoned timeline). Every
candidate is reported with the fields that differ, so "why did it start fresh?" has an answer in
the log. ``PATH`` is the deliberate choice: any difference is allowed (and logged) except the
model's shape, which cannot load.

Before looking, an interrupted publish is repaired (run_dir.recover_checkpoints), so the previous
complete checkpoint is always found. The chosen checkpoint's files are checked against its
manifest (integrity.py) before anything loads: ``auto`` skips a damaged one with a warning and
takes the next newest, ``PATH`` refuses a damaged one.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint.run_files import STEP_DIR, TRAIN_STATE, is_complete, list_checkpoints
from .integrity import verify_checkpoint
from .run_dir import recover_checkpoints

# Fields whose change makes a continued run another experiment. Speed switches (attention backend,
# fused adaLN, checkpointing, compile), duration (--epochs, --max-steps), logging and workers are
# free to change between restarts.
RESUME_FIELDS = {
    "model": ("model", "depth", "hidden_size", "num_heads", "in_channels", "input_size",
              "num_classes", "learn_sigma", "class_dropout_prob", "image_size"),
    "data": ("features_path", "data_path", "vae", "random_flip", "latent_norm"),
    "optim": ("lr", "weight_decay", "betas", "eps", "grad_clip"),
    "diffusion": ("diffusion_steps", "noise_schedule", "timestep_respacing"),
    "train": ("global_batch_size", "grad_accum", "precision", "global_seed", "ema_decay", "objective"),
    "transport": ("path_type", "prediction", "loss_weight", "train_eps", "sample_eps"),
    "repa": ("enc_type", "encoder_depth", "proj_coeff", "projector_dim", "repa_path_type", "weighting"),
}
_PATH_FIELDS = {("data", "features_path"), ("data", "data_path"), ("data", "vae")}
_ADDED_LATER = {("data", "latent_norm")}


@dataclass
class ResumeChoice:
    """The checkpoint to continue (None: start fresh) and the lines to log about the choice."""

    path: Path | None
    notes: list[str] = field(default_factory=list)


def _norm(section: str, key: str, value):
    if (section, key) in _PATH_FIELDS and isinstance(value, str) and value:
        p = Path(value).expanduser()
        return str(p.resolve()) if p.exists() else value
    return list(value) if isinstance(value, tuple) else value


def config_differences(saved: dict, current: dict) -> list[str]:
    """``section.field: checkpoint X vs now Y`` for every RESUME_FIELDS entry that differs."""
    from ..config import Config, config_to_dict
    defaults = config_to_dict(Config())  # a field a config was saved without has its default
    diffs = []
    for section, keys in RESUME_FIELDS.items():
        old, new = saved.get(section, {}), current.get(section, {})
        for key in keys:
            if (section, key) in _ADDED_LATER and key not in old:
                continue  # saved before the field existed: nothing to compare
            default = defaults[section][key]
            a, b = _norm(section, key, old.get(key, default)), _norm(section, key, new.get(key, default))
            if a != b:
                diffs.append(f"{section}.{key}: checkpoint {old.get(key)!r} vs now {new.get(key)!r}")
    return diffs


def _saved_config(ckpt: Path) -> dict | None:
    from ..checkpoint import CheckpointError, safe_torch_load
    try:
        state = safe_torch_load(ckpt / TRAIN_STATE)
    except (CheckpointError, OSError):
        return None
    return state.get("config") if isinstance(state, dict) else None


def _candidates(results_dir: Path) -> list[tuple[float, int, Path]]:
    """(mtime, step, path) of every complete checkpoint of every run under results_dir, and of
    every step-N.old left alone by an interrupted publish (read only: another job may share the
    results dir; only the chosen run is repaired)."""
    found = []
    for ckpt_root in sorted(results_dir.glob("*/checkpoints")):
        complete = list_checkpoints(ckpt_root)
        found += [((path / TRAIN_STATE).stat().st_mtime, step, path) for step, path in complete]
        steps = {step for step, _ in complete}
        for old in ckpt_root.glob("step-*.old"):
            match = STEP_DIR.match(old.name[:-len(".old")])
            if match and int(match.group(1)) not in steps and (old / TRAIN_STATE).is_file():
                found.append(((old / TRAIN_STATE).stat().st_mtime, int(match.group(1)), old))
    return found


def choose_auto(results_dir: str | os.PathLike, current: dict) -> ResumeChoice:
    """The newest complete checkpoint whose saved config matches ``current`` (config_to_dict)."""
    root = Path(results_dir)
    notes, matching = [], []
    for mtime, step, path in _candidates(root) if root.is_dir() else []:
        saved = _saved_config(path)
        diffs = ["no readable saved config"] if saved is None else config_differences(saved, current)
        if diffs:
            notes.append(f"--resume auto: candidate {path} differs: {'; '.join(diffs)}")
        else:
            notes.append(f"--resume auto: candidate {path} matches")
            matching.append((mtime, step, path))
    for _, _, chosen in sorted(matching, reverse=True):  # newest first; a damaged one is skipped
        if chosen.name.endswith(".old"):
            recover_checkpoints(chosen.parent)
            chosen = chosen.with_name(chosen.name[:-len(".old")])
        problems, note = verify_checkpoint(chosen)
        if problems:
            notes.append(f"WARNING --resume auto: skipping damaged checkpoint {chosen}: "
                         f"{_summary(problems)}; falling back to the previous complete one")
            continue
        notes += [note] if note else []
        notes.append(f"--resume auto: continuing {chosen} (the newest matching checkpoint, "
                     f"{'files verified' if not note else 'not verified'})")
        return ResumeChoice(chosen, notes)
    tail = ("; use --resume PATH to continue one of them with these changes" if notes else "")
    notes.append(f"--resume auto: no matching checkpoint under {root}; starting fresh{tail}")
    return ResumeChoice(None, notes)


def resolve_resume(spec: str | None, results_dir: str, current: dict | None = None) -> ResumeChoice:
    """--resume value -> the checkpoint to continue (or None) and notes to log."""
    if not spec:
        return ResumeChoice(None)
    if spec == "auto":
        return choose_auto(results_dir, current or {})
    path = Path(spec)
    if path.name.endswith(".tmp") or path.name.endswith(".old"):
        raise ValueError(f"--resume {spec!r} is an unfinished save ({path.suffix}); resume from a "
                         "complete step-NNNNNNN dir or use --resume auto")
    if STEP_DIR.match(path.name) and path.parent.is_dir():
        recover_checkpoints(path.parent)
    if not is_complete(path):
        raise FileNotFoundError(f"--resume {spec!r} is not a complete checkpoint dir (expected "
                                f"<run>/checkpoints/step-NNNNNNN/ with {TRAIN_STATE})")
    problems, note = verify_checkpoint(path)
    if problems:
        raise ValueError(f"--resume {spec!r} is damaged: {_summary(problems)}; use --resume auto "
                         "(falls back to the newest intact checkpoint) or another checkpoint")
    saved = _saved_config(path)
    diffs = config_differences(saved, current) if saved is not None and current else []
    notes = [f"--resume {path}: continuing with changed settings: {'; '.join(diffs)}"] if diffs else []
    return ResumeChoice(path, notes + ([note] if note else []))


def _summary(problems: list[str]) -> str:
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return problems[0] + more


def check_resume_latent_norm(spec: str | None, latent_norm: dict | None) -> None:
    """--resume PATH: the run must have trained on latents normalised as the data now is (another
    features dir's statistics would silently shift every input); read-only, before anything is made."""
    if not spec or spec == "auto":  # auto never picks such a run: latent_norm is a RESUME_FIELD
        return
    saved = _saved_config(Path(spec))
    data = saved.get("data", {}) if isinstance(saved, dict) else {}
    if "latent_norm" in data and data["latent_norm"] != latent_norm:
        raise ValueError(f"--resume {spec!r}: the run trained on latents normalised as "
                         f"{data['latent_norm']}, the data now gives {latent_norm}; resume with the "
                         "run's own features (or VAE), or start a new run")


def check_resume_spec(spec: str | None) -> None:
    """Read-only check of --resume before anything is created (resolve_resume decides later, on
    rank 0): an unfinished save or a path that is no checkpoint fails here."""
    if not spec or spec == "auto":
        return
    path = Path(spec)
    if path.name.endswith(".tmp") or path.name.endswith(".old"):
        raise ValueError(f"--resume {spec!r} is an unfinished save ({path.suffix}); resume from a "
                         "complete step-NNNNNNN dir or use --resume auto")
    aside = path.with_name(path.name + ".old")  # an interrupted publish, repaired by resolve_resume
    if not (is_complete(path) or (aside / TRAIN_STATE).is_file()):
        raise FileNotFoundError(f"--resume {spec!r} is not a complete checkpoint dir (expected "
                                f"<run>/checkpoints/step-NNNNNNN/ with {TRAIN_STATE}), nor 'auto'")
