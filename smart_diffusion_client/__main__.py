"""Command line: python -m smart_diffusion_client generate (or python -m client ...) --prompt "a red circle" --out outputs/circle.png"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .api import GenerationError, Request, SmartDiffusionClient

VIDEO_SUFFIXES = (".mp4", ".gif")


def _save(pixels, out: Path, fps: int) -> Path:
    """Write an image [H, W, 3] (any PIL format) or a video [F, H, W, 3] (.mp4 or .gif); returns the path."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if pixels.ndim == 3:
        from PIL import Image

        Image.fromarray(pixels).save(out)
        return out
    if out.suffix.lower() not in VIDEO_SUFFIXES:
        out = out.with_suffix(".mp4")  # a video model answered: keep the frames rather than fail after the work
        print(f"the model returned a video; writing {out}", file=sys.stderr)
    import imageio.v2 as imageio  # video [F, H, W, 3]: .mp4 via the ffmpeg binary of imageio-ffmpeg, or .gif

    if out.suffix.lower() == ".gif":
        imageio.mimsave(out, list(pixels), duration=1000 / fps, loop=0)
    else:
        imageio.mimsave(out, list(pixels), fps=fps, codec="libx264", macro_block_size=1)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate an image (or a video with --num-frames)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt")
    gen.add_argument("--height", type=int)
    gen.add_argument("--width", type=int)
    gen.add_argument("--num-frames", type=int, help="video models only")
    gen.add_argument("--steps", type=int)
    gen.add_argument("--guidance-scale", type=float)
    gen.add_argument("--cache-ratio", type=float)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--num-images", type=int, help="images of the prompt in one request (models that accept it); "
                     "written as OUT, OUT_1, OUT_2, ...")
    gen.add_argument("--image", type=Path, help="input image (image-to-image, inpainting, editing, image-to-video)")
    gen.add_argument("--mask", type=Path, help="inpainting mask: white = repaint (with --image)")
    gen.add_argument("--strength", type=float, help="image-to-image: how much of the schedule re-noises --image")
    gen.add_argument("--lora", action="append", default=[], metavar="NAME[:SCALE]",
                     help="a LoRA adapter the model serves, with its scale (default 1); repeat for several")
    gen.add_argument("--url", help="host:port (default 127.0.0.1:8000 for http, :8001 for grpc)")
    gen.add_argument("--protocol", choices=("http", "grpc"), default="http")
    gen.add_argument("--model-prefix", default="", help="pipeline prefix when a server serves several")
    gen.add_argument("--stream", action="store_true", help="stream per-step progress")
    gen.add_argument("--fps", type=int, default=16, help="video frame rate (Wan2.1 is trained at 16)")
    gen.add_argument("--out", type=Path, required=True, help=".png for images; .mp4 or .gif for videos")
    args = parser.parse_args(argv)

    url = args.url or ("127.0.0.1:8000" if args.protocol == "http" else "127.0.0.1:8001")
    request = Request(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        height=args.height,
        width=args.width,
        num_frames=args.num_frames,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        cache_ratio=args.cache_ratio,
        seed=args.seed,
        num_images=args.num_images,
        input_image=_load_image(args.image, "RGB") if args.image else None,
        mask_image=_load_image(args.mask, "L") if args.mask else None,
        strength=args.strength,
        lora=tuple(name for name, _ in map(_lora, args.lora)) or None,
        lora_scale=tuple(scale for _, scale in map(_lora, args.lora)) or None,
    )
    with SmartDiffusionClient(url, args.protocol, model_prefix=args.model_prefix) as client:
        try:
            if args.stream:
                from tqdm import tqdm

                bar = None

                def on_progress(step: int, total: int) -> None:
                    nonlocal bar
                    bar = bar or tqdm(total=total, desc="denoising", unit="step")
                    bar.update(step - bar.n)

                result = client.stream(request, on_progress)
                if bar is not None:
                    bar.close()
            else:
                result = client.infer(request)
        except GenerationError as exc:
            print(f"error ({exc.status}): {exc}", file=sys.stderr)
            return 1
    if result.output == "IMAGE":
        outs = [_save(image, _numbered(args.out, i), args.fps) for i, image in enumerate(result.images)]
    else:
        outs = [_save(result.pixels, args.out, args.fps)]
    print(json.dumps({"out": [str(o) for o in outs], "shape": list(result.pixels.shape), **result.stats}))
    return 0


def _numbered(out: Path, index: int) -> Path:
    """OUT for the first image, OUT_1, OUT_2, ... for the others."""
    return out if index == 0 else out.with_name(f"{out.stem}_{index}{out.suffix}")


def _load_image(path: Path, mode: str):
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert(mode))


def _lora(spec: str) -> tuple[str, float]:
    name, _, scale = spec.partition(":")
    return name, float(scale) if scale else 1.0


if __name__ == "__main__":
    sys.exit(main())
