#!/usr/bin/env python3
"""Train the embedded default model `shapes-flux` (see docs/trained-model.md).

  python scripts/train_shapes_model.py --out models/shapes-flux            # GPU if present
  python scripts/train_shapes_model.py --device cpu --steps 200 --vae-steps 100   # short CPU run
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from smart_diffusion_backend.training.train import main  # noqa: E402

if __name__ == "__main__":
    main()
