"""Write the tiny random-weight pipelines (real diffusers classes) where their model yamls point.

    python scripts/build_tiny_models.py            # every tiny model whose weights are missing
    python scripts/build_tiny_models.py --force    # rebuild them
"""

from __future__ import annotations

import argparse
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from smart_diffusion_backend.params import ModelParams  # noqa: E402
from smart_diffusion_backend.tiny_models import TINY_BUILDERS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--force", action="store_true", help="rebuild even if the directory exists")
    parser.add_argument("models", nargs="*", default=sorted(TINY_BUILDERS), help="model yaml names")
    args = parser.parse_args()
    for name in args.models:
        target = ModelParams.load(name).weights
        if (target / "model_index.json").is_file() and not args.force:
            print(f"{name}: {target} exists")
            continue
        shutil.rmtree(target, ignore_errors=True)
        TINY_BUILDERS[name](target)
        print(f"{name}: wrote {target}")


if __name__ == "__main__":
    main()
