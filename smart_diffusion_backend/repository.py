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

from .admission import PIPELINE_SLOTS
from .errors import ConfigError
from .params import ModelParams, SystemParams, project_root
from .stage_shapes import StageShapes
from .wire import (
    CONDITIONING_TENSORS,
    FIELDS,
    TENSOR_DTYPES,
    conditioning_rank,
    denoiser_input_names,
    encoder_input_names,
    pixel_output,
    request_field_names,
)

# What the committed model_repository/ serves: our trained model on the CPU system config.
DEFAULT_MODEL, DEFAULT_SYSTEM = "shapes-flux", "cpu"

STAGES = ("text_encoder", "denoiser", "vae_decoder")
GATE = "request_gate"  # the ensemble's first step: validates, and grants the text encoder its request
ORCHESTRATORS = ("smart_diffusion", "smart_diffusion_stream")
ENSEMBLE = "smart_diffusion_ensemble"
ALL_MODELS = (*STAGES, GATE, *ORCHESTRATORS, ENSEMBLE)
ENTRY_MODELS = (*ORCHESTRATORS, ENSEMBLE)
STAGE_MODEL_PARAMS = tuple(f"{s}_model" for s in STAGES)  # orchestrator config keys naming the stages

@dataclass(frozen=True)
class PipelineEntry:
    model_config: str  # name under configs/models/ (or a yaml path)
    prefix: str  # "" for the default pipeline
    stage_tag: str = ""  # hot upgrade: the new stage models' names get it ("v2_" -> "v2_denoiser")

    def name(self, base: str) -> str:
        tag = self.stage_tag if base in (*STAGES, GATE) else ""
        return f"{self.prefix}{tag}{base}"


def _tensor(name: str, dims: list[int], optional: bool = False) -> str:
    """One config.pbtxt input/output, its data_type from the wire schema."""
    dtype = (FIELDS[name].dtype if name in FIELDS else TENSOR_DTYPES[name]).config
    opt = " optional: true" if optional else ""
    return f'  {{ name: "{name}" data_type: {dtype} dims: [ {", ".join(map(str, dims))} ]{opt} }}'


def _io(kind: str, tensors: list[str]) -> str:
    return f"{kind} [\n" + ",\n".join(tensors) + "\n]\n"


def _params(values: dict[str, str]) -> str:
    return "".join(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}\n' for k, v in values.items())


def _user_inputs(model: ModelParams, names: list[str], prompt_required: bool) -> list[str]:
    return [_tensor(n, list(FIELDS[n].shape), optional=not (prompt_required and n == "PROMPT")) for n in names]


def _stats(optional: bool = False) -> str:
    return _tensor("STATS", [1], optional=optional)


def _pixels(model: ModelParams) -> str:
    if model.task == "video":
        return _tensor("VIDEO", [-1, -1, -1, 3])
    return _tensor("IMAGE", [-1, -1, -1, 3])  # [N, H, W, 3]: NUM_IMAGES images


def _stage_dims(model: ModelParams) -> tuple[list[int], list[int], list[int]]:
    """(PROMPT_EMBEDS, POOLED_PROMPT_EMBEDS, LATENTS) dims: fixed where the weights fix them, so Triton
    refuses a mismatching tensor before it reaches a stage; all -1 where the weights are not on this host
    (a repository generated for another machine; the stages still check at load and per request)."""
    try:
        shapes = StageShapes.load(model)
    except ConfigError:
        return [-1, -1, -1], [-1, -1], [-1] * (5 if model.task == "video" else 4)
    # A zero-size dim (Wan has no pooled embedding: [2, 0]) is declared -1: Triton takes no 0 in dims.
    pooled = [d if d else -1 for d in shapes.pooled_dims()]
    return shapes.embeds_dims(), pooled, shapes.latent_dims()


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
    # The orchestrators hand every request to their own admission at once (admission.py): it holds the
    # bound, so Triton's queue in front of them only buffers arrivals and gets none. The ensemble's gate
    # and the stages are bounded by Triton's queue.
    queues = {GATE: _queue_policy(queue), **{name: "" for name in ORCHESTRATORS}}
    # Plain and streaming orchestrators each keep at most PIPELINE_SLOTS BLS calls waiting.
    stage_queue = _queue_policy(queue + 2 * PIPELINE_SLOTS if queue else 0)
    queues.update({name: stage_queue for name in STAGES})
    user = request_field_names(model.task, model.accepts)
    text_inputs = encoder_input_names(model.task, model.accepts)
    denoise_inputs = denoiser_input_names(model.task, model.accepts)
    common = {"model_config": entry.model_config, "system_config": system_config}
    stage_names = {key: entry.name(s) for key, s in zip(STAGE_MODEL_PARAMS, STAGES)}
    embeds_dims, pooled_dims, latent_dims = _stage_dims(model)
    embeds = [
        _tensor("PROMPT_EMBEDS", embeds_dims),
        _tensor("POOLED_PROMPT_EMBEDS", pooled_dims),
    ]
    # Models taking image conditioning: the encoder also hands the denoiser these (zero-size without an
    # image, so the ensemble always has them); their exact shapes are the family's, checked by the stages.
    conditioning_names = list(CONDITIONING_TENSORS) if model.takes("INPUT_IMAGE") else []
    conditioning = [_tensor(n, [-1] * conditioning_rank(n, model.task)) for n in conditioning_names]
    configs: dict[str, str] = {}

    def python_model(base: str, inputs: list[str], outputs: list[str], count: int, extra: str = "", **params: str) -> str:
        # With one GPU rank (SystemParams.stage_tensors_on_gpu) the stages are GPU instances on device 0
        # that take their tensor inputs where Triton holds them: embeddings and latents travel GPU to GPU
        # (CUDA IPC), never via host memory. The orchestrators only relay, on the CPU.
        gpu_stage = on_gpu and base in STAGES
        kind = "kind: KIND_GPU gpus: [ 0 ]" if gpu_stage else "kind: KIND_CPU"
        if gpu_stage and base != "text_encoder":
            params = {**params, "FORCE_CPU_ONLY_INPUT_TENSORS": "no"}
        return (
            f'name: "{entry.name(base)}"\nbackend: "python"\nmax_batch_size: 0\n{extra}'
            + _io("input", inputs)
            + _io("output", outputs)
            + f"instance_group [ {{ count: {count} {kind} }} ]\n"
            + queues[base]
            + _params({**common, **params})
        )

    configs["text_encoder"] = python_model(
        "text_encoder", _user_inputs(model, text_inputs, True) + [_stats(True)], embeds + conditioning + [_stats()], 1
    )
    configs["denoiser"] = python_model(
        "denoiser",
        embeds
        + conditioning
        + _user_inputs(model, denoise_inputs, False)
        + [_stats(True), _tensor("PROGRESS_CHANNEL", [1], optional=True)],
        [_tensor("LATENTS", latent_dims), _stats()],
        1,
    )
    configs["vae_decoder"] = python_model(
        "vae_decoder",
        [_tensor("LATENTS", latent_dims), _stats(True)],
        [_pixels(model), _stats()],
        1,
    )
    # One orchestrator instance: it hands each request to its admission at once, which runs up to
    # PIPELINE_SLOTS of them concurrently (orchestrator.serve_admitted).
    orchestrator_inputs = _user_inputs(model, user, True)
    configs[GATE] = python_model(GATE, orchestrator_inputs, [_stats(), _tensor("SEED", [1])], 1)
    configs["smart_diffusion"] = python_model(
        "smart_diffusion", orchestrator_inputs, [_pixels(model), _stats()], 1, **stage_names
    )
    configs["smart_diffusion_stream"] = python_model(
        "smart_diffusion_stream",
        orchestrator_inputs,
        [
            _tensor("STEP", [1]),
            _tensor("TOTAL_STEPS", [1]),
            _pixels(model),
            _stats(),
        ],
        1,
        extra="model_transaction_policy { decoupled: true }\n",
        **stage_names,
    )

    def step(stage: str, inputs: dict[str, str], outputs: dict[str, str]) -> str:
        maps = "".join(f' input_map {{ key: "{k}" value: "{v}" }}' for k, v in inputs.items())
        maps += "".join(f' output_map {{ key: "{k}" value: "{v}" }}' for k, v in outputs.items())
        return f'  {{ model_name: "{entry.name(stage)}" model_version: -1{maps} }}'

    pixels = pixel_output(model.task)

    def fed(names: list[str]) -> dict[str, str]:
        # SEED comes from the gate, which draws one when the request has none: the encoder (VAE sampling)
        # and the denoiser (noise) then draw from the same seed, the one STATS reports.
        return {n: "resolved_seed" if n == "SEED" else n for n in names}

    steps = [
        step(GATE, {n: n for n in user}, {"STATS": "grant_stats", "SEED": "resolved_seed"}),
        step(
            "text_encoder",
            {**fed(text_inputs), "STATS": "grant_stats"},
            {
                "PROMPT_EMBEDS": "prompt_embeds",
                "POOLED_PROMPT_EMBEDS": "pooled_prompt_embeds",
                **{n: n.lower() for n in conditioning_names},
                "STATS": "encode_stats",
            },
        ),
        step(
            "denoiser",
            {
                "PROMPT_EMBEDS": "prompt_embeds",
                "POOLED_PROMPT_EMBEDS": "pooled_prompt_embeds",
                **{n: n.lower() for n in conditioning_names},
                "STATS": "encode_stats",
                **fed(denoise_inputs),
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


def pipeline_name(config_name: str) -> str:
    """A model yaml's name as a model-name prefix: `sd3.5-medium` stays whole (a dot is no suffix there);
    a path to a .yaml gives its file name without the extension."""
    return Path(config_name).stem if config_name.endswith((".yaml", ".yml")) else Path(config_name).name


def write_repository(out_dir: Path, model_configs_names: list[str], system_config: str) -> list[str]:
    """Write a repository serving each named model yaml; returns the Triton model names written."""
    prefix_names = len(model_configs_names) > 1
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for config_name in model_configs_names:
        entry = PipelineEntry(config_name, f"{pipeline_name(config_name)}_" if prefix_names else "")
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
    for base in (*STAGES, GATE):
        _write_model(out_dir, entry.name(base), base, configs[base], 1)
    for base in ENTRY_MODELS:
        _write_model(out_dir, entry.name(base), base, configs[base], version)
    return Upgrade([entry.name(b) for b in (*STAGES, GATE)], [entry.name(b) for b in ENTRY_MODELS], version)
