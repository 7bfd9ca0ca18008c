"""Generate a Triton model repository for one or more pipelines.

The committed `model_repository/` is this generator's output for the default pipeline (DEFAULT_MODEL,
DEFAULT_SYSTEM, no name prefix); a test keeps the two equal. `make serve MODEL=a,b SYSTEM=s` writes a
repository with one set of six models per pipeline, prefixed by the model name when there are
several (e.g. `tiny-wan_smart_diffusion`), into build/ and serves that. Adding a pipeline is adding
a model yaml: the model.py adapters are copied, never edited per pipeline.

Bounded queues: a system yaml's `max_queue_size` becomes a `dynamic_batching` queue policy on the
entry models (FIFO; a full queue answers UNAVAILABLE "Exceeds maximum queue size"). The stage models
get the same bound plus what the orchestrators can have in flight, so BLS traffic never trips it
and the ensemble path (whose queue builds at the denoiser) is bounded too.

Hot upgrade (`write_upgrade`, used by scripts/hot_upgrade.py): a new set of stage models under a
tag (`v2_text_encoder`, ...) next to the serving ones, and a new version directory of the entry
models whose config points at the tagged stages; loading the entry models then switches traffic.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from .params import REQUEST_FIELDS, ModelParams, SystemParams, project_root, request_fields_for

# What the committed model_repository/ serves: our trained model on the CPU system config.
DEFAULT_MODEL, DEFAULT_SYSTEM = "shapes-flux", "cpu"

STAGES = ("text_encoder", "denoiser", "vae_decoder")
ORCHESTRATORS = ("smart_diffusion", "smart_diffusion_stream")
ENSEMBLE = "smart_diffusion_ensemble"
ALL_MODELS = (*STAGES, *ORCHESTRATORS, ENSEMBLE)
ENTRY_MODELS = (*ORCHESTRATORS, ENSEMBLE)
STAGE_MODEL_PARAMS = tuple(f"{s}_model" for s in STAGES)  # orchestrator config keys naming the stages
ORCHESTRATOR_INSTANCES = 4  # while one request is denoising, others encode or decode

_TRITON_DTYPE = {"bytes": "TYPE_STRING", "int": "TYPE_INT32", "float": "TYPE_FP32"}


def _user_input_dtype(name: str) -> str:
    return "TYPE_INT64" if name == "SEED" else _TRITON_DTYPE[REQUEST_FIELDS[name][1]]


@dataclass(frozen=True)
class PipelineEntry:
    model_config: str  # name under configs/models/ (or a yaml path)
    prefix: str  # "" for the default pipeline
    stage_tag: str = ""  # hot upgrade: the new stage models' names get it ("v2_" -> "v2_denoiser")

    def name(self, base: str) -> str:
        tag = self.stage_tag if base in STAGES else ""
        return f"{self.prefix}{tag}{base}"


def _tensor(name: str, dtype: str, dims: list[int], optional: bool = False) -> str:
    opt = " optional: true" if optional else ""
    return f'  {{ name: "{name}" data_type: {dtype} dims: [ {", ".join(map(str, dims))} ]{opt} }}'


def _io(kind: str, tensors: list[str]) -> str:
    return f"{kind} [\n" + ",\n".join(tensors) + "\n]\n"


def _params(values: dict[str, str]) -> str:
    return "".join(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}\n' for k, v in values.items())


def _user_inputs(model: ModelParams, names: list[str], prompt_required: bool) -> list[str]:
    return [_tensor(n, _user_input_dtype(n), [1], optional=not (prompt_required and n == "PROMPT")) for n in names]


def _stats(optional: bool = False) -> str:
    return _tensor("STATS", "TYPE_STRING", [1], optional=optional)


def _pixels(model: ModelParams) -> str:
    if model.task == "video":
        return _tensor("VIDEO", "TYPE_UINT8", [-1, -1, -1, 3])
    return _tensor("IMAGE", "TYPE_UINT8", [-1, -1, 3])


def _latent_dims(model: ModelParams) -> list[int]:
    return [-1] * (5 if model.task == "video" else 4)


def _queue_policy(max_queue_size: int) -> str:
    """FIFO queue bounded at `max_queue_size` waiting requests (0: no policy, unbounded)."""
    if not max_queue_size:
        return ""
    # allow_timeout_override: a request's own `timeout` also drops it from the queue once expired.
    return (
        "dynamic_batching { default_queue_policy { "
        f"max_queue_size: {max_queue_size} allow_timeout_override: true }} }}\n"
    )


def model_configs(entry: PipelineEntry, system_config: str) -> dict[str, str]:
    """config.pbtxt text for each of the six models of one pipeline."""
    model = ModelParams.load(entry.model_config)
    system = SystemParams.load(system_config)
    queue = system.max_queue_size
    on_gpu = system.stage_tensors_on_gpu
    entry_queue = _queue_policy(queue)
    # Plain and streaming orchestrators each keep at most ORCHESTRATOR_INSTANCES BLS calls waiting.
    stage_queue = _queue_policy(queue + 2 * ORCHESTRATOR_INSTANCES if queue else 0)
    user = request_fields_for(model)
    text_inputs = [n for n in user if n in ("PROMPT", "NEGATIVE_PROMPT")]
    denoise_inputs = [n for n in user if n not in text_inputs]
    common = {"model_config": entry.model_config, "system_config": system_config}
    stage_names = {key: entry.name(s) for key, s in zip(STAGE_MODEL_PARAMS, STAGES)}
    embeds = [
        _tensor("PROMPT_EMBEDS", "TYPE_FP32", [-1, -1, -1]),
        _tensor("POOLED_PROMPT_EMBEDS", "TYPE_FP32", [-1, -1]),
    ]
    configs: dict[str, str] = {}

    def python_model(base: str, inputs: list[str], outputs: list[str], count: int, extra: str = "", **params: str) -> str:
        # With one GPU rank (SystemParams.stage_tensors_on_gpu) the stages are GPU instances on device 0
        # that take their tensor inputs where Triton holds them: embeddings and latents travel GPU to GPU
        # (CUDA IPC), never via host memory. The orchestrators only relay, on the CPU.
        gpu_stage = on_gpu and base not in ORCHESTRATORS
        kind = "kind: KIND_GPU gpus: [ 0 ]" if gpu_stage else "kind: KIND_CPU"
        if gpu_stage and base != "text_encoder":
            params = {**params, "FORCE_CPU_ONLY_INPUT_TENSORS": "no"}
        return (
            f'name: "{entry.name(base)}"\nbackend: "python"\nmax_batch_size: 0\n{extra}'
            + _io("input", inputs)
            + _io("output", outputs)
            + f"instance_group [ {{ count: {count} {kind} }} ]\n"
            + (entry_queue if base in ORCHESTRATORS else stage_queue)
            + _params({**common, **params})
        )

    configs["text_encoder"] = python_model(
        "text_encoder", _user_inputs(model, text_inputs, True) + [_stats(True)], embeds + [_stats()], 1
    )
    configs["denoiser"] = python_model(
        "denoiser",
        embeds
        + _user_inputs(model, denoise_inputs, False)
        + [_stats(True), _tensor("PROGRESS_CHANNEL", "TYPE_STRING", [1], optional=True)],
        [_tensor("LATENTS", "TYPE_FP32", _latent_dims(model)), _stats()],
        1,
    )
    configs["vae_decoder"] = python_model(
        "vae_decoder",
        [_tensor("LATENTS", "TYPE_FP32", _latent_dims(model)), _stats(True)],
        [_pixels(model), _stats()],
        1,
    )
    # Several orchestrator instances: while one request is denoising, others encode or decode.
    orchestrator_inputs = _user_inputs(model, user, True)
    configs["smart_diffusion"] = python_model(
        "smart_diffusion", orchestrator_inputs, [_pixels(model), _stats()], ORCHESTRATOR_INSTANCES, **stage_names
    )
    configs["smart_diffusion_stream"] = python_model(
        "smart_diffusion_stream",
        orchestrator_inputs,
        [
            _tensor("STEP", "TYPE_INT32", [1]),
            _tensor("TOTAL_STEPS", "TYPE_INT32", [1]),
            _pixels(model),
            _stats(),
        ],
        ORCHESTRATOR_INSTANCES,
        extra="model_transaction_policy { decoupled: true }\n",
        **stage_names,
    )

    def step(stage: str, inputs: dict[str, str], outputs: dict[str, str]) -> str:
        maps = "".join(f' input_map {{ key: "{k}" value: "{v}" }}' for k, v in inputs.items())
        maps += "".join(f' output_map {{ key: "{k}" value: "{v}" }}' for k, v in outputs.items())
        return f'  {{ model_name: "{entry.name(stage)}" model_version: -1{maps} }}'

    pixels = "VIDEO" if model.task == "video" else "IMAGE"
    steps = [
        step(
            "text_encoder",
            {n: n for n in text_inputs},
            {"PROMPT_EMBEDS": "prompt_embeds", "POOLED_PROMPT_EMBEDS": "pooled_prompt_embeds", "STATS": "encode_stats"},
        ),
        step(
            "denoiser",
            {
                "PROMPT_EMBEDS": "prompt_embeds",
                "POOLED_PROMPT_EMBEDS": "pooled_prompt_embeds",
                "STATS": "encode_stats",
                **{n: n for n in denoise_inputs},
            },
            {"LATENTS": "latents", "STATS": "denoise_stats"},
        ),
        step("vae_decoder", {"LATENTS": "latents", "STATS": "denoise_stats"}, {pixels: pixels, "STATS": "STATS"}),
    ]
    configs[ENSEMBLE] = (
        f'name: "{entry.name(ENSEMBLE)}"\nplatform: "ensemble"\nmax_batch_size: 0\n'
        + _io("input", orchestrator_inputs)
        + _io("output", [_pixels(model), _stats()])
        + "ensemble_scheduling { step [\n"
        + ",\n".join(steps)
        + "\n] }\n"
    )
    return configs


def adapter_source(base: str) -> Path:
    """The canonical model.py of a model (the committed default repository holds them)."""
    return project_root() / "model_repository" / base / "1" / "model.py"


def write_repository(out_dir: Path, model_configs_names: list[str], system_config: str) -> list[str]:
    """Write a repository serving each named model yaml; returns the Triton model names written."""
    prefix_names = len(model_configs_names) > 1
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for config_name in model_configs_names:
        entry = PipelineEntry(config_name, f"{Path(config_name).stem}_" if prefix_names else "")
        for base, text in model_configs(entry, system_config).items():
            model_dir = out_dir / entry.name(base)
            version_dir = model_dir / "1"
            version_dir.mkdir(parents=True, exist_ok=True)
            (model_dir / "config.pbtxt").write_text(text)
            if base != ENSEMBLE:
                source = adapter_source(base)
                if source.resolve() != (version_dir / "model.py").resolve():
                    shutil.copyfile(source, version_dir / "model.py")
            written.append(entry.name(base))
    return written


def _write_model(out_dir: Path, name: str, base: str, text: str, version: int) -> None:
    model_dir = out_dir / name
    version_dir = model_dir / str(version)
    version_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(text)
    if base != ENSEMBLE:
        shutil.copyfile(adapter_source(base), version_dir / "model.py")


def latest_version(model_dir: Path) -> int:
    versions = [int(p.name) for p in Path(model_dir).iterdir() if p.is_dir() and p.name.isdigit()]
    return max(versions, default=0)


@dataclass(frozen=True)
class Upgrade:
    """What write_upgrade wrote: the new stage models and the entry models' new version."""

    stages: list[str]  # new stage models (load these first)
    entries: list[str]  # entry models to reload (switches traffic)
    entry_version: int


def write_upgrade(out_dir: Path, model_config: str, system_config: str, tag: str, prefix: str = "") -> Upgrade:
    """Write a new pipeline generation into a served repository without touching what serves now.

    Stage models go under new names (`{prefix}{tag}{stage}`, version 1); each entry model gets a new
    version directory (the current adapter code) and a config pointing at the new stages. Triton's
    default version policy (latest 1) serves only the new version once the entry model is reloaded.
    """
    if not tag:
        raise ValueError("an upgrade needs a non-empty stage tag (e.g. 'v2_')")
    out_dir = Path(out_dir)
    entry = PipelineEntry(model_config, prefix, stage_tag=tag)
    configs = model_configs(entry, system_config)
    version = 1 + max(latest_version(out_dir / entry.name(b)) for b in ENTRY_MODELS if (out_dir / entry.name(b)).is_dir())
    for base in STAGES:
        _write_model(out_dir, entry.name(base), base, configs[base], 1)
    for base in ENTRY_MODELS:
        _write_model(out_dir, entry.name(base), base, configs[base], version)
    return Upgrade([entry.name(b) for b in STAGES], [entry.name(b) for b in ENTRY_MODELS], version)
