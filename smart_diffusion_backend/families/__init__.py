"""Registry of model families: family name -> its three stage classes (imported lazily)."""

from __future__ import annotations

import importlib
from typing import Literal

from ..params import ModelParams, SystemParams
from .base import DecoderStage, DenoiserStage, Embeddings, Stage, TextEncoderStage

StageKind = Literal["text_encoder", "denoiser", "decoder"]

# family -> (module, text encoder class, denoiser class, decoder class)
FAMILIES: dict[str, tuple[str, str, str, str]] = {
    "flux": ("smart_diffusion_backend.families.flux", "FluxTextEncoder", "FluxDenoiser", "FluxDecoder"),
    "wan": ("smart_diffusion_backend.families.wan", "WanTextEncoder", "WanDenoiser", "WanDecoder"),
}
_KIND_INDEX = {"text_encoder": 1, "denoiser": 2, "decoder": 3}


def stage_class(family: str, kind: StageKind) -> type[Stage]:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {sorted(FAMILIES)}")
    spec = FAMILIES[family]
    return getattr(importlib.import_module(spec[0]), spec[_KIND_INDEX[kind]])


def load_stage(kind: StageKind, model: ModelParams, system: SystemParams) -> Stage:
    return stage_class(model.family, kind)(model, system)


__all__ = [
    "DecoderStage",
    "DenoiserStage",
    "Embeddings",
    "FAMILIES",
    "Stage",
    "TextEncoderStage",
    "load_stage",
    "stage_class",
]
