"""Per-request LoRA: several adapters resident at once, each request picks its own, nothing is merged.

An adapter is a diffusers / PEFT LoRA safetensors file, what ``pipe.load_lora_weights`` reads:
``transformer.<module>.lora_A.weight`` [r, in] and ``transformer.<module>.lora_B.weight`` [out, r], with the
scale ``alpha / r`` from ``<module>.alpha`` keys or from the ``lora_adapter_metadata`` that diffusers'
``save_lora_weights`` writes (``lora_alpha``, ``alpha_pattern``, ``use_rslora``), 1.0 without either.
The model yaml's ``lora:`` section names the directory; each ``<name>.safetensors`` file, or ``<name>/``
folder holding one, is the adapter ``<name>``::

    lora:
      dir: models/shapes-flux-loras   # relative to the project root, or absolute
      preload: all                    # or a list of names; loaded when the denoiser loads
      max_resident: 4                 # adapters held at once
      max_per_request: 2              # LORA entries per request (params.py)
      scale: [-2.0, 2.0]              # LORA_SCALE range (params.py)

How (no global merge, no recompile per adapter):
* At load, every Linear layer that some resident adapter targets is replaced by a ``LoraLinear`` that keeps
  the original layer (``nn.Linear`` or ``Fp8Linear``) and, beside it, the A and B matrices of *every*
  resident adapter of that layer concatenated along the rank: A [R, in], B [out, R], R = sum of the ranks,
  with each rank row's adapter slot and its ``alpha / r``. Nothing of the base weights ever changes.
* A request's selection is one float32 vector [K] over the K resident adapters (its LORA_SCALE at its
  adapters' slots, 0 elsewhere). ``LoraSet.scope`` puts it in a thread-local for the duration of the
  request's denoise (``DenoiserStage.denoise`` is wrapped: families/base.py); the layers read it there and
  add ``B (s[slot] * alpha/r * (A x))``. A request without LORA sees no vector and runs the base layer alone,
  bit for bit the model without adapters. Two threads never see each other's vector.
* Under ``torch.compile`` the vector is a graph input of fixed shape: switching adapters or scales between
  requests compiles nothing. The compiled blocks have two variants, with and without LoRA (guarded on the
  vector's presence), both compiled by the load-time warm-up.

Exactness: for one adapter, the term is PEFT's ``lora_B(lora_A(x)) * scaling`` with the scaling applied
between the two GEMMs instead of after them, summed over the layer's resident adapters in one GEMM:
bit-identical to diffusers' unfused path when the scale is a power of two and the layer holds one adapter,
within float rounding otherwise (docs/lora.md).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError, ParamError
from .params import ModelParams, resolve_path

logger = logging.getLogger(__name__)

__all__ = [
    "LoraLinear",
    "LoraSection",
    "LoraSet",
    "adapter_files",
    "check_selection",
    "read_adapter",
    "resident_names",
]

SUFFIX = ".safetensors"
FOLDER_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' save_lora_weights default
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # as params.py accepts in LORA
# Key prefix of each transformer a stage runs (DenoiserStage.transformers() order), as diffusers names them.
COMPONENTS = ("transformer", "transformer_2")
_OTHER_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "prior", "decoder")
_SECTION_KEYS = ("dir", "preload", "max_resident", "max_per_request", "scale")


# --------------------------------------------------------------------------------------------
# The yaml section and the adapter directory
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraSection:
    """The model yaml's ``lora:`` section, checked (ConfigError naming the key)."""

    dir: Path
    preload: tuple[str, ...] | None  # None: every adapter in the directory
    max_resident: int

    @classmethod
    def of(cls, model: ModelParams) -> "LoraSection | None":
        """None when the model serves no LoRA (no section and LORA not in `accepts:`)."""
        raw = dict(model.lora or {})
        if not raw:
            if model.takes("LORA"):
                raise ConfigError(f"model {model.name!r}: accepts: LORA needs a `lora:` section with `dir`")
            return None
        where = f"model {model.name!r}: lora:"
        unknown = sorted(set(raw) - set(_SECTION_KEYS))
        if unknown:
            raise ConfigError(f"{where} unknown keys {unknown}; known: {list(_SECTION_KEYS)}")
        if not model.takes("LORA"):
            raise ConfigError(f"{where} the section needs LORA (and LORA_SCALE) in accepts:")
        if not raw.get("dir"):
            raise ConfigError(f"{where} `dir` (the adapter directory) is required")
        preload = raw.get("preload", "all")
        if preload == "all" or preload is None:
            names = None
        elif isinstance(preload, (list, tuple)) and all(isinstance(n, str) for n in preload):
            names = tuple(preload)
            bad = [n for n in names if not _NAME.match(n)]
            if bad or len(set(names)) != len(names):
                raise ConfigError(f"{where} preload: {list(names)} has bad or repeated adapter names")
        else:
            raise ConfigError(f"{where} preload: expected 'all' or a list of adapter names, got {preload!r}")
        try:
            max_resident = int(raw.get("max_resident", 4))
            int(raw.get("max_per_request", 4))
            scale = [float(s) for s in raw.get("scale", [-4.0, 4.0])]
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where} {exc}") from None
        if max_resident < 1:
            raise ConfigError(f"{where} max_resident: {max_resident}; must be >= 1")
        if len(scale) != 2 or not scale[0] <= scale[1]:
            raise ConfigError(f"{where} scale: expected [min, max], got {raw.get('scale')!r}")
        return cls(dir=resolve_path(str(raw["dir"])), preload=names, max_resident=max_resident)


def adapter_files(directory: Path) -> dict[str, Path]:
    """Adapter name -> safetensors file: ``<name>.safetensors``, or ``<name>/`` holding
    ``pytorch_lora_weights.safetensors`` or exactly one ``.safetensors`` file. Other entries are ignored."""
    found: dict[str, Path] = {}
    if not directory.is_dir():
        return found
    for entry in sorted(directory.iterdir()):
        if entry.is_file() and entry.name.endswith(SUFFIX):
            name, path = entry.name[: -len(SUFFIX)], entry
        elif entry.is_dir():
            files = sorted(entry.glob(f"*{SUFFIX}"))
            preferred = entry / FOLDER_WEIGHT_NAME
            path = preferred if preferred.is_file() else (files[0] if len(files) == 1 else None)
            if path is None:
                continue
            name = entry.name
        else:
            continue
        if not _NAME.match(name):
            logger.warning("lora: %s: %r is not an adapter name a request can use (letters, digits, '_', '.', '-'); "
                           "skipped", entry, name)
            continue
        if name in found:
            raise ConfigError(f"lora: adapter {name!r} is both {found[name]} and {path}")
        found[name] = path
    return found


def resident_names(model: ModelParams, section: LoraSection | None = None) -> tuple[str, ...]:
    """The adapters a denoiser of this model holds (the slot order): every one in the directory, sorted, or
    the `preload` list. ConfigError when more than `max_resident` or a preloaded one is missing."""
    section = section or LoraSection.of(model)
    if section is None:
        return ()
    files = adapter_files(section.dir)
    if section.preload is None:
        names = tuple(files)
    else:
        missing = [n for n in section.preload if n not in files]
        if missing:
            raise ConfigError(f"model {model.name!r}: lora: preload names {missing}, not in {section.dir} "
                              f"(found: {list(files) or 'none'})")
        names = section.preload
    if len(names) > section.max_resident:
        raise ConfigError(f"model {model.name!r}: lora: {len(names)} adapters in {section.dir} ({list(names)}) exceed "
                          f"max_resident {section.max_resident}; list the ones to load under `preload:` or raise the limit")
    if not names:
        logger.warning("model %s: lora: no adapter in %s; requests naming one are refused", model.name, section.dir)
    return names


def pin_resident(model: ModelParams, names: Sequence[str]) -> ModelParams:
    """The model params with `preload` set to exactly `names` (what a pool hands every worker, so all ranks and
    every respawn load the same adapters)."""
    if not model.lora:
        return model
    return dataclasses.replace(model, lora={**model.lora, "preload": list(names)})


def check_selection(lora: Sequence[str], resident: Sequence[str]) -> None:
    """ParamError (INVALID_ARG) naming LORA for an adapter that is not resident."""
    unknown = [n for n in lora if n not in resident]
    if unknown:
        listed = ", ".join(resident) if resident else "none (this model has no adapters loaded)"
        raise ParamError("LORA", f"unknown adapter{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                                 f"resident adapters: {listed}")


# --------------------------------------------------------------------------------------------
# One adapter file
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModuleLora:
    """One adapter's matrices for one Linear layer, with its ``alpha / r`` (or ``alpha / sqrt(r)``)."""

    down: torch.Tensor  # lora_A [r, in]
    up: torch.Tensor  # lora_B [out, r]
    scaling: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass(frozen=True)
class Adapter:
    name: str
    path: Path
    modules: dict[tuple[int, str], ModuleLora]  # (transformer index, module path) -> matrices


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key): the first key that
    matches the end of the module path at a dot boundary."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter(name: str, path: Path, components: int = 1) -> Adapter:
    """Parse one diffusers / PEFT LoRA file (ConfigError naming the file and key for anything else)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    where = f"lora adapter {name!r} ({path})"
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            file_metadata = f.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - any unreadable file fails the load with its name
        raise ConfigError(f"{where}: cannot read: {exc}") from exc
    try:
        metadata_all = json.loads(file_metadata[METADATA_KEY]) if METADATA_KEY in file_metadata else {}
    except ValueError as exc:
        raise ConfigError(f"{where}: bad {METADATA_KEY} JSON: {exc}") from None

    prefixed = any(k.split(".", 1)[0] in COMPONENTS + _OTHER_COMPONENTS for k in tensors)
    downs: dict[tuple[int, str], torch.Tensor] = {}
    ups: dict[tuple[int, str], torch.Tensor] = {}
    alphas: dict[tuple[int, str], float] = {}
    for key, tensor in tensors.items():
        component, rest = key.split(".", 1) if prefixed else ("transformer", key.removeprefix("base_model.model."))
        if component in _OTHER_COMPONENTS:
            raise ConfigError(f"{where}: {key}: only transformer LoRAs are served (the text encoders run in "
                              "their own stage); save the adapter without its text-encoder layers")
        if component not in COMPONENTS[:components]:
            raise ConfigError(f"{where}: {key}: no component {component!r} in this model; keys must start with "
                              f"{' or '.join(repr(c + '.') for c in COMPONENTS[:components])}")
        index = COMPONENTS.index(component)
        if rest.endswith(".lora_A.weight"):
            downs[(index, rest[: -len(".lora_A.weight")])] = tensor
        elif rest.endswith(".lora_B.weight"):
            ups[(index, rest[: -len(".lora_B.weight")])] = tensor
        elif rest.endswith(".alpha"):
            if tensor.numel() != 1 or not tensor.is_floating_point():
                raise ConfigError(f"{where}: {key}: alpha must be one float")
            alphas[(index, rest[: -len(".alpha")])] = float(tensor.reshape(()))
        elif "lora_magnitude_vector" in rest or "dora_scale" in rest:
            raise ConfigError(f"{where}: {key}: DoRA adapters are not supported")
        elif rest.endswith(".lora_B.bias"):
            raise ConfigError(f"{where}: {key}: LoRA biases (lora_bias) are not supported")
        else:
            raise ConfigError(f"{where}: {key} is not a diffusers/PEFT LoRA key (<module>.lora_A.weight, "
                              "<module>.lora_B.weight, <module>.alpha); other formats (kohya, xlabs, ...): convert "
                              "them with the pipeline's lora_state_dict and save_lora_weights first")
    if set(downs) != set(ups):
        odd = sorted(set(downs) ^ set(ups))[:4]
        raise ConfigError(f"{where}: modules with only one of lora_A / lora_B: {[m for _, m in odd]}")
    if not downs:
        raise ConfigError(f"{where}: no transformer LoRA weights in the file")
    if metadata_all and alphas:
        raise ConfigError(f"{where}: has both <module>.alpha keys and {METADATA_KEY}; diffusers refuses that too")

    modules: dict[tuple[int, str], ModuleLora] = {}
    common_alpha = collections.Counter(alphas.values()).most_common(1)[0][0] if alphas else None
    for key in sorted(downs):
        index, module = key
        down, up = downs[key], ups[key]
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            raise ConfigError(f"{where}: {module}: lora_A {list(down.shape)} and lora_B {list(up.shape)} are not "
                              "[r, in] and [out, r] of one rank (only Linear layers are supported)")
        rank = down.shape[0]
        config = {k.removeprefix(f"{COMPONENTS[index]}."): v for k, v in metadata_all.items()
                  if k.startswith(f"{COMPONENTS[index]}.")}
        if config:
            if config.get("use_dora"):
                raise ConfigError(f"{where}: DoRA adapters are not supported")
            alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", rank)))
            rslora = bool(config.get("use_rslora", False))
        else:
            alpha = alphas.get(key, common_alpha if common_alpha is not None else float(rank))
            rslora = False
        scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        modules[key] = ModuleLora(down=down, up=up, scaling=scaling)
    return Adapter(name=name, path=path, modules=modules)


# --------------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------------


class RequestScales(threading.local):
    """The current request's scale vector [K] (None: no LoRA), per thread: what `LoraSet.scope` sets."""

    def __init__(self) -> None:
        self.scales: torch.Tensor | None = None


class LoraLinear(nn.Module):
    """A Linear layer (``nn.Linear`` or ``Fp8Linear``) plus the resident adapters' low-rank terms of it.

    ``forward(x) = base(x) + B ((s[slot] * scaling) * (A x))`` where ``s`` is the current request's scale
    vector (read from ``state``, a thread-local); without one, ``base(x)`` alone. A and B are buffers in the
    stage's dtype; the GEMMs of the term run in that dtype beside the base GEMM (in bf16 beside an fp8 one)."""

    def __init__(self, base: nn.Module, state: RequestScales, parts: list[tuple[int, ModuleLora]], dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.base = base
        self.state = state
        self.in_features, self.out_features = base.in_features, base.out_features
        self.register_buffer("lora_A", torch.cat([p.down for _, p in parts]).to(device, dtype))  # [R, in]
        self.register_buffer("lora_B", torch.cat([p.up for _, p in parts], dim=1).to(device, dtype))  # [out, R]
        self.register_buffer("row_slot", torch.tensor([s for s, p in parts for _ in range(p.rank)], device=device))
        self.register_buffer("row_scaling", torch.tensor([p.scaling for _, p in parts for _ in range(p.rank)],
                                                         dtype=torch.float32, device=device))
        self.slots = tuple(s for s, _ in parts)

    # Code that reads a Linear's parameters (dtype / device probes) still finds them.
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def lora_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the layer's matrix multiplies: x, or for an ``Fp8Linear`` of a fused GELU MLP (quant/fp8_linear.py:
        its input is the first projection's output before bias and GELU) GELU(tanh)(x + bias)."""
        bias = getattr(self.base, "input_gelu_bias", None)
        if bias is None:
            return x
        return F.gelu(x + bias.to(x.dtype), approximate="tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        scales = self.state.scales
        if scales is None:
            return out
        row_scales = scales[self.row_slot] * self.row_scaling  # [R] float32
        hidden = F.linear(self.lora_input(x), self.lora_A)
        hidden = (hidden * row_scales).to(self.lora_B.dtype)
        return out + F.linear(hidden, self.lora_B).to(out.dtype)

    def extra_repr(self) -> str:
        return f"slots={list(self.slots)}, rank={self.lora_A.shape[0]}"


def _resolve(transformer: nn.Module, module: str) -> tuple[nn.Module, str, nn.Module]:
    """(parent, attribute, layer) of a LoRA target path (AttributeError when there is none). A diffusers GELU
    wrapper that fp8_linear's MLP fusion folded into its projection (``ff.net.0.proj`` is then the
    ``Fp8Linear`` at ``ff.net.0``) is followed."""
    from .quant import Fp8Linear

    path = module
    try:
        layer = transformer.get_submodule(path)
    except AttributeError:
        if not module.endswith(".proj"):
            raise
        path = module.removesuffix(".proj")
        layer = transformer.get_submodule(path)
        if not isinstance(layer, Fp8Linear):
            raise AttributeError(module) from None
    parent_path, _, attribute = path.rpartition(".")
    return (transformer.get_submodule(parent_path) if parent_path else transformer), attribute, layer


def _is_linear(layer: nn.Module) -> bool:
    from .quant import Fp8Linear

    return isinstance(layer, (nn.Linear, Fp8Linear))


# --------------------------------------------------------------------------------------------
# The resident set
# --------------------------------------------------------------------------------------------


class LoraSet:
    """The resident adapters of one denoiser: their layers installed in its transformers, and the request scope."""

    def __init__(self, names: tuple[str, ...], layers: list[LoraLinear], state: RequestScales, device: torch.device):
        self.names, self.layers, self.state, self.device = names, layers, state, device

    @classmethod
    def load(cls, model: ModelParams, transformers: Sequence[nn.Module], device: torch.device,
             dtype: torch.dtype) -> "LoraSet | None":
        """Read the resident adapters and wrap the layers they target (None: the model serves no LoRA).
        Call after fp8_linear (the base layers may be Fp8Linear) and before the attention processors and
        compile. ConfigError for a file that does not fit the transformer."""
        section = LoraSection.of(model)
        if section is None:
            return None
        names = resident_names(model, section)
        files = adapter_files(section.dir)
        adapters = [read_adapter(name, files[name], len(transformers)) for name in names]
        per_module: dict[tuple[int, str], list[tuple[int, ModuleLora]]] = collections.defaultdict(list)
        for slot, adapter in enumerate(adapters):
            for key, part in adapter.modules.items():
                per_module[key].append((slot, part))
        state = RequestScales()
        layers: list[LoraLinear] = []
        for (index, module), parts in sorted(per_module.items()):
            owners = [adapters[s].name for s, _ in parts]
            try:
                parent, attribute, layer = _resolve(transformers[index], module)
            except AttributeError:
                raise ConfigError(f"lora adapters {owners}: {COMPONENTS[index]} has no module {module!r}") from None
            if not _is_linear(layer):
                raise ConfigError(f"lora adapters {owners}: {module} is a {type(layer).__name__}; only Linear layers "
                                  "take LoRA here")
            for slot, part in parts:
                if part.down.shape[1] != layer.in_features or part.up.shape[0] != layer.out_features:
                    raise ConfigError(
                        f"lora adapter {adapters[slot].name!r}: {module}: lora_A {list(part.down.shape)} / lora_B "
                        f"{list(part.up.shape)} do not fit a Linear({layer.in_features}, {layer.out_features})")
            wrapped = LoraLinear(layer, state, parts, dtype, device)
            setattr(parent, attribute, wrapped)
            layers.append(wrapped)
        for adapter in adapters:
            ranks = sorted({p.rank for p in adapter.modules.values()})
            logger.info("%s: lora adapter %s: %d layers, rank %s (%s)", model.name, adapter.name,
                        len(adapter.modules), "/".join(map(str, ranks)), adapter.path)
        return cls(tuple(names), layers, state, device)

    def scale_vector(self, lora: Sequence[str], lora_scale: Sequence[float]) -> torch.Tensor | None:
        """The request's [K] float32 scales (None without LORA); ParamError for an adapter not resident."""
        if not lora:
            return None
        check_selection(lora, self.names)
        scales = [0.0] * len(self.names)
        for name, scale in zip(lora, lora_scale if lora_scale else [1.0] * len(lora)):
            scales[self.names.index(name)] = float(scale)
        # Always an inference tensor: its dispatch keys (which compiled guards check) never vary by caller.
        with torch.inference_mode():
            return torch.tensor(scales, dtype=torch.float32, device=self.device)

    @contextlib.contextmanager
    def scope(self, lora: Sequence[str], lora_scale: Sequence[float]) -> Iterator[None]:
        """The request's selection for this thread, for the duration of the block (nesting restores the outer one)."""
        vector = self.scale_vector(lora, lora_scale)
        previous = self.state.scales
        self.state.scales = vector
        try:
            yield
        finally:
            self.state.scales = previous
