"""The library's layers import one way (docs/architecture.md): a module may import its own layer and the
layers below it, never one above. Each layer is imported on its own in a fresh interpreter, every module of
it, and the modules that came along are checked against the table. The description of a family (its spec)
and everything that generates the repository stay importable without torch.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import smart_diffusion_backend

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "smart_diffusion_backend"

# Lowest first. Each entry: the layer's name and the top-level modules / packages of smart_diffusion_backend in it.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("params, wire, errors", ("params", "wire", "errors", "progress", "admission", "metrics", "stage_guard")),
    ("kernels", ("kernels",)),
    ("attention, quant, cache", ("attention", "quant", "cache", "lora")),
    ("families", ("families", "stage_shapes")),
    ("parallel", ("parallel",)),
    ("service", ("service",)),
    ("triton adapter, orchestrator", ("triton_adapter", "orchestrator", "repository", "serving", "upgrade")),
    ("tools", ("tiny_models", "training", "quality")),
)
LAYER_OF = {top: index for index, (_, tops) in enumerate(LAYERS) for top in tops}

# Imported by processes that never touch a tensor (the repository generator, the BLS orchestrators, the
# request gate), and what they read about a family: none of it may import torch.
TORCH_FREE = (
    "params", "wire", "errors", "progress", "admission", "metrics", "stage_guard",
    "families", "stage_shapes", "repository", "orchestrator", "triton_adapter", "serving", "upgrade",
)

_PROBE = r"""
import importlib, json, pkgutil, sys
names = json.loads(sys.argv[1])
for name in names:
    module = importlib.import_module(name)
    if hasattr(module, "__path__") and sys.argv[2] == "walk":
        for info in pkgutil.walk_packages(module.__path__, name + "."):
            importlib.import_module(info.name)
print(json.dumps({"modules": sorted(m for m in sys.modules if m == "smart_diffusion_backend" or m.startswith("smart_diffusion_backend.")),
                  "torch": "torch" in sys.modules}))
"""


def _probe(names: list[str], walk: bool) -> dict:
    """Import `names` in a fresh interpreter (with `walk`, every module of a package too): our modules
    loaded then, and whether torch was."""
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(names), "walk" if walk else "top"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _top(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_every_module_has_a_layer():
    tops = {info.name for info in pkgutil.iter_modules(smart_diffusion_backend.__path__)}
    assert tops - set(LAYER_OF) == set(), "add new modules to LAYERS here and to docs/architecture.md"
    assert set(LAYER_OF) - tops == set(), "LAYERS names a module that no longer exists"


@pytest.mark.parametrize("index", range(len(LAYERS)), ids=[name for name, _ in LAYERS])
def test_a_layer_imports_nothing_above_it(index):
    name, tops = LAYERS[index]
    loaded = _probe([f"{PACKAGE}.{top}" for top in tops], walk=True)["modules"]
    above = sorted(m for m in loaded if _top(m) is not None and LAYER_OF.get(_top(m), -1) > index)
    assert above == [], f"importing layer {name!r} imported modules of higher layers: {above}"


def test_the_cache_does_not_import_the_parallel_package():
    loaded = _probe([f"{PACKAGE}.cache"], walk=False)["modules"]
    assert not any(m.startswith(f"{PACKAGE}.parallel") for m in loaded), loaded


def test_the_parallel_package_imports_nothing_up_front():
    loaded = _probe([f"{PACKAGE}.parallel"], walk=False)["modules"]
    assert loaded == [PACKAGE, f"{PACKAGE}.parallel"], loaded


def test_torch_free_modules_do_not_import_torch():
    probe = _probe([f"{PACKAGE}.{top}" for top in TORCH_FREE], walk=False)
    assert probe["torch"] is False, "a torch-free module imported torch"


def test_family_specs_and_their_wire_shapes_need_no_torch(tiny_flux):
    from .conftest import ensure_tiny_model

    models = [tiny_flux.name, ensure_tiny_model("tiny-wan").name]
    code = (
        "import sys\n"
        "from smart_diffusion_backend.families import FOLDERS, family\n"
        "from smart_diffusion_backend.params import ModelParams\n"
        "from smart_diffusion_backend.stage_shapes import StageShapes\n"
        "for name in FOLDERS:\n"
        "    family(name)\n"
        f"for name in {models!r}:\n"
        "    StageShapes.load(ModelParams.load(name))\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
