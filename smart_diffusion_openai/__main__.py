"""python -m smart_diffusion_openai --triton-grpc 127.0.0.1:8001 --host 127.0.0.1 --port 8080"""

from __future__ import annotations

import argparse
import logging

from .app import FacadeConfig, run


def main(argv: list[str] | None = None) -> None:
    defaults = FacadeConfig()
    parser = argparse.ArgumentParser(description="OpenAI-compatible images API in front of tritonserver (gRPC).")
    parser.add_argument("--triton-grpc", default=defaults.triton_grpc, help="tritonserver's gRPC host:port")
    parser.add_argument("--host", default=defaults.host)
    parser.add_argument("--port", type=int, default=defaults.port)
    parser.add_argument("--max-n", type=int, default=defaults.max_n, help="most images per request")
    parser.add_argument(
        "--timeout-s",
        type=float,
        default=defaults.timeout_s,
        help="each Triton request's timeout: the server refuses or stops work past it",
    )
    parser.add_argument(
        "--shutdown-timeout-s",
        type=float,
        default=defaults.shutdown_timeout_s,
        help="on SIGTERM, how long requests in flight may still finish",
    )
    parser.add_argument(
        "--max-upload-bytes",
        type=int,
        default=defaults.max_upload_bytes,
        help="the largest /v1/images/edits body (multipart, images included); larger: 413",
    )
    parser.add_argument(
        "--max-input-pixels",
        type=int,
        default=defaults.max_input_pixels,
        help="the most pixels an uploaded image or mask may have; checked before it is decoded",
    )
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    if args.max_n < 1 or args.timeout_s <= 0 or args.max_upload_bytes < 1 or args.max_input_pixels < 1:
        parser.error("--max-n, --max-upload-bytes and --max-input-pixels must be >= 1 and --timeout-s > 0")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(
        FacadeConfig(
            triton_grpc=args.triton_grpc,
            host=args.host,
            port=args.port,
            max_n=args.max_n,
            timeout_s=args.timeout_s,
            shutdown_timeout_s=args.shutdown_timeout_s,
            max_upload_bytes=args.max_upload_bytes,
            max_input_pixels=args.max_input_pixels,
        )
    )


if __name__ == "__main__":
    main()
