"""Hot-upgrade a running Smart-Diffusion tritonserver (explicit model control) to a new pipeline.

    # the server: started with --model-control-mode=explicit --load-model=* on REPO
    .venv/bin/python scripts/hot_upgrade.py --url 127.0.0.1:8000 --repository REPO --server-pid PID \\
        --model tiny-flux --system cpu --tag v2_

New weights: point --model at a model yaml whose `weights:` is the new directory. New code: the
current model.py adapters (and the installed library, imported by the new stub processes) are used.
Procedure and guarantees: smart_diffusion_backend/upgrade.py and docs/operations.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from smart_diffusion_backend.upgrade import UpgradeError, hot_upgrade  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="127.0.0.1:8000", help="the server's HTTP host:port")
    parser.add_argument("--repository", required=True, help="the model repository the server was started on")
    parser.add_argument("--server-pid", type=int, required=True, help="tritonserver's pid (RSS and stub exits)")
    parser.add_argument("--model", default="tiny-flux", help="model yaml of the new pipeline")
    parser.add_argument("--system", default="cpu", help="system yaml of the new pipeline")
    parser.add_argument("--tag", required=True, help="name tag of the new stage models, e.g. v2_")
    parser.add_argument("--prefix", default="", help="model-name prefix of the pipeline (several pipelines served)")
    parser.add_argument("--timeout-s", type=float, default=600)
    args = parser.parse_args()
    try:
        report = hot_upgrade(args.url, Path(args.repository), args.server_pid, args.model, args.system, args.tag,
                             args.prefix, args.timeout_s)
    except UpgradeError as exc:
        print(f"upgrade failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(asdict(report), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
