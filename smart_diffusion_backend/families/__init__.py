"""Model families: one folder each, listed in FOLDERS. Nothing outside the folders names a family.

    family(name)            -> Family   the model yaml's ``family:`` (families/spec.py says what it declares)
    family_of(transformer)  -> Family   the family that registers the transformer's class
    stage_class(name, kind) -> type     a family's stage class (imports it, and torch, on first use)
    load_stage(kind, model, system)     a loaded stage of the model's family

This module and every ``families/<name>/spec.py`` import without torch. The stage base classes
(``Embeddings``, ``Stage``, ``TextEncoderStage``, ``DenoiserStage``, ``DecoderStage``: families/base.py)
load on first access.

A family folder holds ``spec.py`` (its ``FAMILY``), ``stages.py`` (the three stages) and ``attention.py``
(its attention processor); docs/architecture.md lists the steps to add one.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .spec import STAGE_KINDS, Family, StageKind

if TYPE_CHECKING:
    from ..params import ModelParams, SystemParams
    from .base import Stage

# The family folders: a model yaml's `family:` names one of them.
FOLDERS: tuple[str, ...] = ("flux", "wan", "sd3")

_BASE_NAMES = ("DecoderStage", "DenoiserStage", "Embeddings", "Stage", "TextEncoderStage")


def family(name: str) -> Family:
    """The family a model yaml names (ValueError for one that is not in FOLDERS)."""
    if name not in FOLDERS:
        raise ValueError(f"unknown model family {name!r}; known: {sorted(FOLDERS)}")
    return importlib.import_module(f"{__name__}.{name}.spec").FAMILY


def family_of(transformer: Any) -> Family:
    """The family whose ``transformer_classes`` name the class of ``transformer`` (or a base class of it;
    a torch.compile wrapper is looked through). ValueError when no family registers it."""
    module = getattr(transformer, "_orig_mod", transformer)
    classes = {cls.__name__ for cls in type(module).__mro__}
    for name in FOLDERS:
        candidate = family(name)
        if classes & set(candidate.transformer_classes):
            return candidate
    registered = ", ".join(f"{cls} ({name})" for name in FOLDERS for cls in family(name).transformer_classes)
    raise ValueError(
        f"unsupported transformer {type(module).__name__}: no model family registers it; registered: {registered}"
    )


def stage_class(name: str, kind: StageKind) -> type["Stage"]:
    return family(name).stage_class(kind)


def load_stage(kind: StageKind, model: "ModelParams", system: "SystemParams") -> "Stage":
    return stage_class(model.family, kind)(model, system)


def __getattr__(name: str) -> Any:
    if name in _BASE_NAMES:
        value = getattr(importlib.import_module(f"{__name__}.base"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DecoderStage",
    "DenoiserStage",
    "Embeddings",
    "FOLDERS",
    "Family",
    "STAGE_KINDS",
    "Stage",
    "StageKind",
    "TextEncoderStage",
    "family",
    "family_of",
    "load_stage",
    "stage_class",
]
