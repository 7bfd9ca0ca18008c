"""The parameter taxonomy as code.

| kind   | life-cycle             | where                                   | who changes it |
|--------|------------------------|-----------------------------------------|----------------|
| model  | static, tied to weights| configs/models/<model>.yaml -> ModelParams  | nobody     |
| user   | per request            | request tensors -> UserParams (frozen)  | end user       |
| system | fixed at server start  | configs/system/<name>.yaml -> SystemParams | operator    |

User params are parsed from plain Python/numpy values (whatever the Triton adapter unpacked) and
validated against the model's limits and the system's budget. Every failure is a `ParamError`
(a ValueError) whose message names the field, the value and the allowed range.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import yaml

from .errors import ConfigError, ParamError
from .wire import FIELDS, request_field_names

PROJECT_ROOT_ENV = "SMART_DIFFUSION_HOME"


def project_root() -> Path:
    """Directory that relative config and weight paths are resolved against."""
    env = os.environ.get(PROJECT_ROOT_ENV)
    if env:
        return Path(env).resolve()
    return Path(__file__).resolve().parent.parent


def resolve_path(path: str | Path) -> Path:
    path = Path(path)
    return path if path.is_absolute() else (project_root() / path)


def config_path(kind: str, name_or_path: str) -> Path:
    """`tiny-flux` -> <root>/configs/models/tiny-flux.yaml; a path ending in .yaml is used as is."""
    if name_or_path.endswith((".yaml", ".yml")):
        return resolve_path(name_or_path)
    return project_root() / "configs" / kind / f"{name_or_path}.yaml"


@dataclass(frozen=True)
class Range:
    min: float
    max: float

    def __str__(self) -> str:
        return f"[{_fmt(self.min)}, {_fmt(self.max)}]"


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


# ---------------------------------------------------------------------------------------------
# Model params
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelParams:
    """Static facts about one set of weights: never changed by operators or users."""

    name: str
    family: str  # adapter name: "flux", "wan", ...
    task: str  # "image" or "video"
    weights: Path  # a diffusers pipeline directory (save_pretrained layout)
    default_steps: int
    default_guidance_scale: float
    default_height: int
    default_width: int
    steps: Range
    guidance_scale: Range
    height: Range
    width: Range
    size_multiple: int  # VAE scale x patch size: sizes must be multiples of it
    max_prompt_chars: int
    max_sequence_length: int  # text tokens fed to the transformer
    negative_prompt: bool  # whether the family uses a negative prompt (true CFG)
    default_num_frames: int | None = None
    num_frames: Range | None = None
    frames_multiple: int | None = None  # video: frames = k * frames_multiple + 1
    cache: Mapping[str, Any] = field(default_factory=dict)  # cache-ratio mapping, tuned per model
    # Optional request fields this model takes (wire.py's optional features), and their defaults/limits
    accepts: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()  # of accepts, what every request must carry (INPUT_IMAGE: image-to-video)
    default_strength: float = 0.6  # as diffusers' image-to-image pipelines
    strength: Range = Range(0.0, 1.0)
    num_images: Range = Range(1, 1)
    max_input_side: int = 4096  # INPUT_IMAGE / MASK_IMAGE sides (resized to HEIGHT x WIDTH by the encoder)
    min_input_side: int = 8
    lora: Mapping[str, Any] = field(default_factory=dict)  # `lora:` section (adapter directory, limits)
    # Sizes a compiled denoiser warms at load (HEIGHT, WIDTH), so no user request pays a compile
    warm_sizes: tuple[tuple[int, int], ...] = ()

    def takes(self, field_name: str) -> bool:
        return field_name in self.accepts

    @classmethod
    def load(cls, name_or_path: str) -> "ModelParams":
        path = config_path("models", name_or_path)
        raw = _read_yaml(path)
        try:
            defaults, limits = raw["defaults"], raw["limits"]
            task = raw.get("task", "image")
            video = task == "video"
            return cls(
                name=raw.get("name", path.stem),
                family=str(raw["family"]),
                task=task,
                weights=resolve_path(raw["weights"]),
                default_steps=int(defaults["steps"]),
                default_guidance_scale=float(defaults["guidance_scale"]),
                default_height=int(defaults["height"]),
                default_width=int(defaults["width"]),
                steps=_range(limits["steps"]),
                guidance_scale=_range(limits["guidance_scale"]),
                height=_range(limits["height"]),
                width=_range(limits["width"]),
                size_multiple=int(limits["size_multiple"]),
                max_prompt_chars=int(limits["max_prompt_chars"]),
                max_sequence_length=int(raw["max_sequence_length"]),
                negative_prompt=bool(raw.get("negative_prompt", False)),
                default_num_frames=int(defaults["num_frames"]) if video else None,
                num_frames=_range(limits["num_frames"]) if video else None,
                frames_multiple=int(limits["frames_multiple"]) if video else None,
                cache=dict(raw.get("cache", {})),
                accepts=_accepts(raw.get("accepts", []), path),
                requires=_requires(raw.get("requires", []), raw.get("accepts", []), path),
                default_strength=float(defaults.get("strength", 0.6)),
                strength=_range(limits.get("strength", [0.0, 1.0])),
                num_images=_range(limits.get("num_images", [1, 1])),
                max_input_side=int(limits.get("max_input_side", 4096)),
                min_input_side=int(limits.get("min_input_side", 8)),
                lora=dict(raw.get("lora", {})),
                warm_sizes=tuple((int(h), int(w)) for h, w in raw.get("warm_sizes") or [])
                or ((int(defaults["height"]), int(defaults["width"])),),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{path}: bad or missing model param ({exc!r})") from exc


# An optional request field -> the fields it needs beside it in `accepts:`.
_NEEDS = {"MASK_IMAGE": ("INPUT_IMAGE",), "STRENGTH": ("INPUT_IMAGE",), "LORA_SCALE": ("LORA",)}


def _accepts(names: Any, path: Path) -> tuple[str, ...]:
    optional = [f.name for f in FIELDS.values() if f.optional_feature]
    names = tuple(str(n) for n in names)
    for name in names:
        if name not in optional:
            raise ConfigError(f"{path}: accepts: {name!r} is not an optional request field; known: {optional}")
        missing = [n for n in _NEEDS.get(name, ()) if n not in names]
        if missing:
            raise ConfigError(f"{path}: accepts: {name} needs {missing} too")
    return names


# Optional request fields a model yaml may make required (`requires:`): a model that generates from an image.
_REQUIRABLE = ("INPUT_IMAGE",)


def _requires(names: Any, accepts: Any, path: Path) -> tuple[str, ...]:
    names = tuple(str(n) for n in names)
    for name in names:
        if name not in _REQUIRABLE:
            raise ConfigError(f"{path}: requires: {name!r} cannot be required; allowed: {list(_REQUIRABLE)}")
        if name not in [str(n) for n in accepts]:
            raise ConfigError(f"{path}: requires: {name} must be in accepts: too")
    return names


# ---------------------------------------------------------------------------------------------
# System params
# ---------------------------------------------------------------------------------------------

_DTYPES = ("float32", "bfloat16", "float16")
_DEVICES = ("cpu", "cuda")
# What `fast_path: true` sets unless the yaml gives the key itself
FAST_PATH_DEFAULTS: dict[str, Any] = {"attention_backend": "triton", "compile_transformer": True, "fp8_linear": "auto"}
_ATTENTION_BACKENDS = ("sdpa", "triton", "triton_int8", "triton_fp8", "flash_attn")  # triton_fp8: old name of triton_int8


@dataclass(frozen=True)
class SystemParams:
    """Operator's choices, fixed when the server starts."""

    name: str
    device: str = "cpu"
    dtype: str = "float32"
    attention_backend: str = "sdpa"
    ulysses_degree: int = 1
    ring_degree: int = 1
    cfg_degree: int = 1
    max_pixels_per_request: int = 1024 * 1024  # height * width (* frames for video)
    max_steps: int = 100  # a ceiling below the model's own limit, for latency budgets
    torch_threads: int = 0  # 0 = torch's default
    compile_transformer: bool = False
    # FP8 (e4m3, rowwise scales) GEMMs for the transformer blocks' projections and MLPs (quant/fp8_linear.py);
    # "auto": where the card has FP8 tensor cores and the dtype is bf16
    fp8_linear: bool | str = False
    # The fast path (GPU yamls): our attention, regional compile warmed at load, fp8_linear auto. It sets
    # those three defaults; a key given explicitly wins. false = the exact path, bit-identical to diffusers.
    fast_path: bool = False
    vae_tiling: bool = False
    # Requests waiting per entry model (FIFO) before new ones are refused with UNAVAILABLE; 0 = unbounded.
    max_queue_size: int = 0
    # The longest a request may wait for a pipeline slot; one predicted to wait longer is refused at
    # once (UNAVAILABLE), one that did is refused without running. 0 = unbounded.
    max_queue_delay_s: float = 0.0

    @property
    def world_size(self) -> int:
        return self.ulysses_degree * self.ring_degree * self.cfg_degree

    @property
    def stage_tensors_on_gpu(self) -> bool:
        """Embeddings and latents stay in GPU memory between the stages (GPU stage instances, CUDA IPC through
        BLS). Only with one rank: a worker pool takes and returns host arrays anyway, and on 2× H100 a
        pooled server with GPU-resident stage tensors left the text encoder stuck at unload."""
        return self.device == "cuda" and self.world_size == 1

    @classmethod
    def load(cls, name_or_path: str) -> "SystemParams":
        path = config_path("system", name_or_path)
        raw = _read_yaml(path)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"{path}: unknown system params {unknown}; known: {sorted(known)}")
        raw.setdefault("name", path.stem)
        if raw.get("fast_path"):
            for key, value in FAST_PATH_DEFAULTS.items():
                raw.setdefault(key, value)
        try:
            params = cls(**raw)
        except TypeError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
        params.validate(path)
        return params

    def validate(self, where: Path | str = "system params") -> None:
        checks = [
            (self.device in _DEVICES, f"device={self.device!r} not in {_DEVICES}"),
            (self.dtype in _DTYPES, f"dtype={self.dtype!r} not in {_DTYPES}"),
            (
                self.attention_backend in _ATTENTION_BACKENDS,
                f"attention_backend={self.attention_backend!r} not in {_ATTENTION_BACKENDS}",
            ),
            (min(self.ulysses_degree, self.ring_degree, self.cfg_degree) >= 1, "parallel degrees must be >= 1"),
            (self.cfg_degree in (1, 2), f"cfg_degree={self.cfg_degree} must be 1 or 2"),
            (self.max_pixels_per_request > 0, "max_pixels_per_request must be > 0"),
            (self.max_steps > 0, "max_steps must be > 0"),
            (self.max_queue_size >= 0, "max_queue_size must be >= 0 (0: unbounded)"),
            (self.max_queue_delay_s >= 0, "max_queue_delay_s must be >= 0 (0: unbounded)"),
            (self.fp8_linear in (True, False, "auto"), f"fp8_linear={self.fp8_linear!r} not in (true, false, auto)"),
            (
                not (self.fp8_linear is True and self.device == "cuda" and self.dtype != "bfloat16"),
                f"fp8_linear on cuda needs dtype bfloat16 (rowwise-scaled FP8 GEMMs write bf16), got {self.dtype!r}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"{where}: {message}")


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return raw


def _range(value: Any) -> Range:
    lo, hi = value
    return Range(float(lo), float(hi))


# ---------------------------------------------------------------------------------------------
# User params
# ---------------------------------------------------------------------------------------------

SEED_MAX = 2**63 - 1


@dataclass(frozen=True)
class UserParams:
    """One request's parameters, after defaults and validation."""

    prompt: str
    negative_prompt: str
    height: int
    width: int
    steps: int
    guidance_scale: float
    cache_ratio: float
    seed: int
    num_frames: int | None = None  # video models only
    # Optional features (models whose yaml `accepts:` them); images are uint8 arrays, left out of ==
    input_image: np.ndarray | None = field(default=None, compare=False, repr=False)  # [H, W, 3]
    mask_image: np.ndarray | None = field(default=None, compare=False, repr=False)  # [H, W], 255 = repaint
    strength: float | None = None  # with input_image: how much of the schedule re-noises it
    lora: tuple[str, ...] = ()  # adapter names
    lora_scale: tuple[float, ...] = ()  # one per adapter
    num_images: int = 1

    @property
    def uses_negative_prompt(self) -> bool:
        return bool(self.negative_prompt)


def _scalar(name: str, value: Any, kind: str, max_bytes: int) -> Any:
    """One element out of a request tensor, with its dtype checked; text longer than `max_bytes` is
    refused before it is decoded."""
    arr = np.asarray(value)
    if arr.size != 1:
        raise ParamError(name, f"expected exactly one element, got shape {list(arr.shape)}")
    item = arr.reshape(-1)[0]
    if kind == "bytes":
        if isinstance(item, (bytes, np.bytes_, str)) and len(item) > max_bytes:
            raise ParamError(name, f"has {len(item)} bytes; allowed at most {max_bytes}")
        if isinstance(item, (bytes, np.bytes_)):
            try:
                return bytes(item).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ParamError(name, f"is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        if isinstance(item, str):
            return item
        raise ParamError(name, f"expected BYTES (a UTF-8 string), got {arr.dtype}")
    if kind == "int":
        if arr.dtype.kind not in "iu":
            raise ParamError(name, f"expected an integer tensor, got {arr.dtype}")
        return int(item)
    if kind == "float":
        if arr.dtype.kind not in "fiu":
            raise ParamError(name, f"expected a float tensor, got {arr.dtype}")
        value = float(item)
        if not math.isfinite(value):
            raise ParamError(name, f"{value} is not a finite number")
        return value
    raise AssertionError(kind)  # programming error, not user input


def _check_range(name: str, value: float, allowed: Range) -> None:
    if not (allowed.min <= value <= allowed.max):
        raise ParamError(name, f"{_fmt(value)} is out of range; allowed {allowed}")


def parse_user_params(
    values: Mapping[str, Any],
    model: ModelParams,
    system: SystemParams,
    *,
    require_prompt: bool = True,
    had_input_image: bool | None = None,
) -> UserParams:
    """Request tensors (name -> numpy array or scalar) -> validated UserParams.

    Absent names take the model's defaults; SEED absent draws a fresh random seed (reported back).
    `require_prompt=False` lets stages that never see the prompt (denoiser, decoder) reuse the checks.
    `had_input_image`: for a stage that gets the image's conditioning instead of INPUT_IMAGE (the denoiser),
    whether the request carried one; STRENGTH then defaults and is checked as it is beside the image.
    """
    allowed_names = request_field_names(model.task, model.accepts)
    for name in values:
        if name not in FIELDS:
            raise ParamError(name, f"unknown input; accepted inputs: {', '.join(allowed_names)}")
        if name not in allowed_names:
            if FIELDS[name].video_only:
                raise ParamError(name, f"is only accepted by video models; model {model.name!r} makes {model.task}s")
            raise ParamError(name, f"is not accepted by model {model.name!r}; accepted inputs: {', '.join(allowed_names)}")

    max_bytes = 4 * model.max_prompt_chars  # UTF-8 takes at most 4 bytes per character
    got = {FIELDS[n].attr: _scalar(n, v, FIELDS[n].kind, max_bytes) for n, v in values.items() if FIELDS[n].scalar}
    features = _optional_features(values, got, model, had_input_image)
    # A model that generates from an image refuses a request without one. Checked where the request's fields
    # are (entry models, the encoder) and by the denoiser (from the conditioning); not for a load-time warm-up.
    if "INPUT_IMAGE" in model.requires and (require_prompt or had_input_image is not None):
        if features["input_image"] is None and not had_input_image:
            raise ParamError(
                "INPUT_IMAGE", f"is required by model {model.name!r}: it generates from an input image (UINT8 [H, W, 3])"
            )

    prompt = got.get("prompt")
    if prompt is None:
        if require_prompt:
            raise ParamError("PROMPT", "is required")
        prompt = ""
    elif require_prompt and not prompt.strip():
        raise ParamError("PROMPT", "is empty; give a non-empty text")
    if len(prompt) > model.max_prompt_chars:
        raise ParamError("PROMPT", f"has {len(prompt)} characters; allowed at most {model.max_prompt_chars}")

    negative = got.get("negative_prompt", "")
    if negative and not model.negative_prompt:
        raise ParamError(
            "NEGATIVE_PROMPT",
            f"is not supported by model {model.name!r} (family {model.family} has no negative-prompt guidance); "
            "leave it out or empty",
        )
    if len(negative) > model.max_prompt_chars:
        raise ParamError(
            "NEGATIVE_PROMPT", f"has {len(negative)} characters; allowed at most {model.max_prompt_chars}"
        )

    height = got.get("height", model.default_height)
    width = got.get("width", model.default_width)
    for name, value, allowed in (("HEIGHT", height, model.height), ("WIDTH", width, model.width)):
        _check_range(name, value, allowed)
        if value % model.size_multiple:
            raise ParamError(name, f"{value} is not a multiple of {model.size_multiple}; allowed {allowed}")

    num_frames = None
    if model.task == "video":
        assert model.num_frames is not None and model.frames_multiple is not None
        num_frames = got.get("num_frames", model.default_num_frames)
        _check_range("NUM_FRAMES", num_frames, model.num_frames)
        if (num_frames - 1) % model.frames_multiple:
            raise ParamError(
                "NUM_FRAMES",
                f"{num_frames} is not of the form {model.frames_multiple}*k+1; allowed {model.num_frames}",
            )

    pixels = height * width * (num_frames or 1) * features["num_images"]
    if pixels > system.max_pixels_per_request:
        what = "HEIGHT*WIDTH*NUM_FRAMES" if num_frames else "HEIGHT*WIDTH"
        count = features["num_images"]
        what, times = (what + "*NUM_IMAGES", f"x{count}") if count > 1 else (what, "")
        raise ParamError(
            what,
            f"{height}x{width}{'x' + str(num_frames) if num_frames else ''}{times} = {pixels} pixels exceeds this "
            f"server's max_pixels_per_request {system.max_pixels_per_request}",
        )

    steps = got.get("steps", model.default_steps)
    steps_range = Range(model.steps.min, min(model.steps.max, system.max_steps))
    _check_range("STEPS", steps, steps_range)

    guidance = got.get("guidance_scale", model.default_guidance_scale)
    _check_range("GUIDANCE_SCALE", guidance, model.guidance_scale)

    cache_ratio = got.get("cache_ratio", 0.0)
    # A model with no tuned cache section cannot honour a ratio: refuse it rather than ignore it.
    _check_range("CACHE_RATIO", cache_ratio, Range(0.0, 1.0 if model.cache else 0.0))

    seed = got.get("seed")
    if seed is None:
        seed = secrets.randbelow(SEED_MAX)
    _check_range("SEED", seed, Range(0, SEED_MAX))

    return UserParams(
        prompt=prompt,
        negative_prompt=negative,
        height=height,
        width=width,
        steps=steps,
        guidance_scale=guidance,
        cache_ratio=cache_ratio,
        seed=seed,
        num_frames=num_frames,
        **features,
    )


_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _image(name: str, value: Any, model: ModelParams, channels: int | None) -> np.ndarray:
    """A uint8 image tensor [H, W, channels] ([H, W] when channels is None), checked by shape alone."""
    arr = np.asarray(value)
    wanted = "[H, W, 3]" if channels else "[H, W]"
    if arr.dtype != np.uint8:
        raise ParamError(name, f"expected UINT8 {wanted}, got {arr.dtype}")
    if arr.ndim != (3 if channels else 2) or (channels and arr.shape[2] != channels):
        raise ParamError(name, f"expected shape {wanted}, got {list(arr.shape)}")
    sides = arr.shape[:2]
    if min(sides) < model.min_input_side or max(sides) > model.max_input_side:
        allowed = f"[{model.min_input_side}, {model.max_input_side}]"
        raise ParamError(name, f"{sides[0]}x{sides[1]} pixels; each side allowed in {allowed}")
    return arr


def _optional_features(
    values: Mapping[str, Any], got: dict[str, Any], model: ModelParams, had_input_image: bool | None = None
) -> dict[str, Any]:
    """The optional request fields (image conditioning, LoRA, several images), parsed and checked."""
    features: dict[str, Any] = {"num_images": got.get("num_images", 1)}
    _check_range("NUM_IMAGES", features["num_images"], model.num_images)

    image = _image("INPUT_IMAGE", values["INPUT_IMAGE"], model, 3) if "INPUT_IMAGE" in values else None
    mask = _image("MASK_IMAGE", values["MASK_IMAGE"], model, None) if "MASK_IMAGE" in values else None
    if mask is not None:
        if image is None:
            raise ParamError("MASK_IMAGE", "needs INPUT_IMAGE (the image to repaint)")
        if mask.shape != image.shape[:2]:
            raise ParamError("MASK_IMAGE", f"is {mask.shape[0]}x{mask.shape[1]}; INPUT_IMAGE is {image.shape[0]}x{image.shape[1]}")
    strength = got.get("strength")
    has_image = image is not None if had_input_image is None else had_input_image
    if strength is not None and not has_image:
        raise ParamError("STRENGTH", "needs INPUT_IMAGE (the image it re-noises)")
    if has_image and model.takes("STRENGTH"):
        strength = model.default_strength if strength is None else strength
        _check_range("STRENGTH", strength, model.strength)
        if strength <= 0:
            raise ParamError("STRENGTH", f"{_fmt(strength)} leaves no denoising step; allowed (0, {_fmt(model.strength.max)}]")
    features.update(input_image=image, mask_image=mask, strength=strength)

    lora: tuple[str, ...] = ()
    if "LORA" in values:
        lora = tuple(_text_items("LORA", values["LORA"]))
        max_loras = int(model.lora.get("max_per_request", 4))
        if not 1 <= len(lora) <= max_loras:
            raise ParamError("LORA", f"{len(lora)} adapters; allowed 1 to {max_loras}")
        for adapter in lora:
            if not _ADAPTER_NAME.match(adapter):
                raise ParamError("LORA", f"{adapter!r} is not an adapter name (letters, digits, '_', '.', '-')")
        if len(set(lora)) != len(lora):
            raise ParamError("LORA", f"names an adapter twice: {list(lora)}")
    scales: tuple[float, ...] = ()
    if "LORA_SCALE" in values:
        if not lora:
            raise ParamError("LORA_SCALE", "needs LORA (the adapters it scales)")
        arr = np.asarray(values["LORA_SCALE"])
        if arr.dtype.kind != "f" or arr.ndim != 1 or arr.size != len(lora):
            raise ParamError("LORA_SCALE", f"expected FP32 [{len(lora)}] (one per LORA adapter), got {arr.dtype} {list(arr.shape)}")
        allowed = _range(model.lora.get("scale", [-4.0, 4.0]))
        scales = tuple(float(s) for s in arr)
        for scale in scales:
            if not math.isfinite(scale):
                raise ParamError("LORA_SCALE", f"{scale} is not a finite number")
            _check_range("LORA_SCALE", scale, allowed)
    elif lora:
        scales = tuple(1.0 for _ in lora)
    features.update(lora=lora, lora_scale=scales)
    return features


def _text_items(name: str, value: Any) -> list[str]:
    arr = np.asarray(value)
    if arr.dtype != np.object_ or arr.ndim != 1:
        raise ParamError(name, f"expected BYTES [K], got {arr.dtype} {list(arr.shape)}")
    items = []
    for item in arr:
        if isinstance(item, (bytes, np.bytes_)) and len(item) <= 256:
            try:
                items.append(bytes(item).decode("utf-8"))
                continue
            except UnicodeDecodeError:
                pass
        elif isinstance(item, str) and len(item) <= 256:
            items.append(item)
            continue
        raise ParamError(name, "expected UTF-8 names of at most 256 bytes")
    return items
