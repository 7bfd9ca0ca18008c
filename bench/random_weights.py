"""A real-architecture FLUX.1-dev pipeline with random weights, written like a downloaded one.

No hub is reachable from the GPU machines, so served GPU benchmarks load this instead of the real
checkpoint: the same classes and sizes (FluxTransformer2DModel 19+38 blocks, CLIP-L text, T5-v1.1-XXL
encoder, the 16-channel Flux VAE), tokenizers built in code (smart_diffusion_backend.tiny_models), saved
with `save_pretrained` and loaded by the server through `from_pretrained`, the production path. Speed is
what it measures; the pictures are noise.

    python -m bench.random_weights --out /tmp/flux1-dev-random [--device cuda]
    ln -s /tmp/flux1-dev-random weights/FLUX.1-dev     # where configs/models/flux1-dev.yaml looks
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from smart_diffusion_backend.tiny_models import build_clip_tokenizer, build_t5_tokenizer, flux_dev_scheduler


def build_flux_dev(out_dir: Path, device: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    clip_tokenizer = build_clip_tokenizer()
    t5_tokenizer = build_t5_tokenizer()
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the serving dtype: the 12 B transformer in fp32 would need 48 GB
    try:
        with torch.device(device):
            transformer = FluxTransformer2DModel(guidance_embeds=True)  # the defaults are FLUX.1-dev's sizes
            clip = CLIPTextModel(CLIPTextConfig(  # CLIP ViT-L/14 text tower
                vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
                bos_token_id=clip_tokenizer.bos_token_id, eos_token_id=clip_tokenizer.eos_token_id,
                pad_token_id=clip_tokenizer.pad_token_id,
            ))
            t5 = T5EncoderModel(T5Config(  # T5 v1.1 XXL encoder
                vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                pad_token_id=t5_tokenizer.pad_token_id, eos_token_id=t5_tokenizer.eos_token_id,
                decoder_start_token_id=t5_tokenizer.pad_token_id,
            ))
            vae = AutoencoderKL(
                in_channels=3, out_channels=3,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
                norm_num_groups=32, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False,
            )
    finally:
        torch.set_default_dtype(previous_dtype)
    pipe = FluxPipeline(scheduler=flux_dev_scheduler(), vae=vae, text_encoder=clip, tokenizer=clip_tokenizer,
                        text_encoder_2=t5, tokenizer_2=t5_tokenizer, transformer=transformer)
    pipe.save_pretrained(out_dir)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    started = time.perf_counter()
    build_flux_dev(args.out, args.device)
    size_gb = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file()) / 1e9
    print(f"wrote {args.out} ({size_gb:.1f} GB) in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
