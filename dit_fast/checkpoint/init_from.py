"""``train.py --init-from``: a trained DiT's weights as the starting point of a NEW model, which may
have another number of classes or another image size (fine-tuning the official DiT-XL/2 on your own
classes, or 256 px weights continued at 512 px).

What carries over and what does not:

- every tensor whose shape is the same in both models is copied;
- ``pos_embed`` is never loaded: it is DiT's fixed sin-cos table, and the new model computed its own
  for its own patch grid (the same numbers when the grid is the same);
- ``y_embedder.embedding_table`` for another number of classes is rebuilt from the new model's
  initialisation; the checkpoint's null row (DiT's index num_classes, its last) moves to the new
  null index, and with ``keep_labels`` the rows of classes 0..min(old, new)-1 keep their vectors. The
  checkpoint's class count comes from its saved config where it has one (our run and step
  directories and their EMA files, a diffusers folder), so a table without a null row (trained with
  class dropout off) is read as one; a bare weights file is assumed to end with its null row, as
  every DiT, SiT and REPA checkpoint does, and the log says so;
- any other difference (patch size, width, depth, channels, learn-sigma) cannot carry over: a
  CheckpointError names the first such tensor, before anything is created.

Every tensor of the new model that is not copied whole is named in ``InitPlan.notes``.
``plan_init_from`` needs only the new model's shapes (a model built on the meta device will do), so
train.py checks the source before it creates the run directory; ``apply_init_plan`` then copies.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .loading import load_state_dict, normalize_keys
from .official import resolve_official
from .run_files import resolve_run_weights, saved_config
from .safe_io import CheckpointError

POS_EMBED = "pos_embed"
LABEL_TABLE = "y_embedder.embedding_table.weight"
# Extra heads of other DiT-family trainers that a plain DiT has no place for (REPA's projectors).
_IGNORED_PREFIXES = ("projectors.",)


@dataclass
class InitPlan:
    """What ``apply_init_plan`` copies: ``full`` tensors whole, ``label_rows`` (new row, old row) pairs
    of the label table; ``notes`` name every tensor of the model that is not copied whole."""

    source: str
    full: dict[str, torch.Tensor] = field(default_factory=dict)
    label_rows: list[tuple[int, int]] = field(default_factory=list)
    labels: torch.Tensor | None = None
    notes: list[str] = field(default_factory=list)


def plan_init_from(source, model: torch.nn.Module, num_classes: int, keep_labels: bool = False) -> InitPlan:
    """Read ``source`` (anything ``load_state_dict`` reads) and decide, tensor by tensor, what of it
    the new ``model`` (``num_classes`` classes; it may live on the meta device) takes.

    Raises CheckpointError naming the first tensor that cannot carry over.
    """
    loaded = load_state_dict(source)
    source_classes = _source_classes(source, loaded)
    given = normalize_keys(loaded)
    wanted = {name: tuple(t.shape) for name, t in normalize_keys(model.state_dict()).items()}
    plan = InitPlan(str(source))
    for name in sorted(given):
        if name not in wanted and not name.startswith(_IGNORED_PREFIXES):
            raise CheckpointError(f"--init-from {source}: the checkpoint's {name} has no place in this model "
                                  f"(another depth or architecture?)")
        if name not in wanted:
            plan.notes.append(f"{name}: not used (no such tensor in a DiT)")
    for name, shape in wanted.items():
        have = tuple(given[name].shape) if name in given else None
        if name == POS_EMBED:
            grid = f"{round(shape[1] ** 0.5)}x{round(shape[1] ** 0.5)}"
            plan.notes.append(f"{POS_EMBED}: not loaded; the fixed sin-cos table of this model's {grid} patch grid")
        elif have is None:
            raise CheckpointError(f"--init-from {source}: the checkpoint has no {name} {shape} "
                                  f"(another depth or architecture?)")
        elif name == LABEL_TABLE and have[1:] == shape[1:] and (
                have != shape or source_classes not in (None, num_classes)):  # other classes
            _plan_labels(plan, given[name], shape[0], num_classes, keep_labels, source_classes)
        elif have == shape:
            plan.full[name] = given[name]
        else:
            raise CheckpointError(
                f"--init-from {source}: {name} is {have} in the checkpoint but {shape} in this model; only "
                f"the class count and the image size may differ (not the patch size, width, depth, "
                f"channels or learn-sigma)")
    return plan


def _source_classes(source, loaded) -> int | None:
    """The class count ``source`` was trained with where it says: the config saved in our checkpoint
    beside its EMA file, a diffusers transformer's config.json; None for a bare weights file."""
    config = getattr(loaded, "config", None)  # a diffusers folder's config.json
    if config is not None:
        return config.get("num_embeds_ada_norm")
    saved = saved_config(resolve_run_weights(resolve_official(source)))
    return None if saved is None else saved["model"]["num_classes"]


def _plan_labels(plan: InitPlan, old: torch.Tensor, rows: int, num_classes: int, keep_labels: bool,
                 old_classes: int | None) -> None:
    """Rows of the rebuilt label table: the old null row to the new null index, and with
    ``keep_labels`` the classes both tables have. ``old_classes`` None: the table's last row is
    assumed to be its null row (DiT's table is num_classes + 1 rows with class dropout on)."""
    assumed = old_classes is None
    old_classes = old.shape[0] - 1 if assumed else old_classes
    if old.shape[0] not in (old_classes, old_classes + 1):
        raise CheckpointError(f"--init-from {plan.source}: {LABEL_TABLE} has {old.shape[0]} rows, but the "
                              f"checkpoint's config says {old_classes} classes (expected {old_classes} or "
                              f"{old_classes + 1} rows)")
    old_null = old_classes if old.shape[0] == old_classes + 1 else None
    kept = min(old_classes, num_classes) if keep_labels else 0
    plan.label_rows = [(i, i) for i in range(kept)]
    new_null = rows == num_classes + 1  # the new model has a null row (class dropout on)
    if new_null and old_null is not None:
        plan.label_rows.append((num_classes, old_null))
    plan.labels = old
    what = f"rows of classes 0..{kept - 1} kept" if kept else "every class row newly initialised"
    if not new_null:
        null = "no null row (class dropout off)"
    elif old_null is None:
        null = "the null row newly initialised (the checkpoint has none: trained with class dropout off)"
    else:
        null = "the null row carried over" + (" (assumed to be the checkpoint's last row)" if assumed else "")
    plan.notes.append(f"{LABEL_TABLE}: rebuilt for {num_classes} classes (the checkpoint has {old_classes}): "
                      f"{what}, {null}")


@torch.no_grad()
def apply_init_plan(model: torch.nn.Module, plan: InitPlan) -> torch.nn.Module:
    """Copy the planned tensors into ``model`` (any device and dtype); returns ``model``."""
    own = {name: t for name, t in normalize_keys(model.state_dict(keep_vars=True)).items()}
    for name, value in plan.full.items():
        own[name].copy_(value)
    for new_row, old_row in plan.label_rows:
        own[LABEL_TABLE][new_row].copy_(plan.labels[old_row])
    return model


def apply_init_from(model: torch.nn.Module, source, keep_labels: bool = False,
                    log: Callable[[str], None] = print) -> InitPlan:
    """Plan and apply ``source`` on ``model`` (its class count read from the model), logging each
    tensor not copied whole; returns the plan."""
    plan = plan_init_from(source, model, model.num_classes, keep_labels)
    apply_init_plan(model, plan)
    for note in plan.notes:
        log(f"--init-from: {note}")
    return plan
