"""Tiny pipelines built in code from the real diffusers/transformers classes.

No model hub is reachable, so the default and test models are made here: real classes with tiny
configs, tokenizers built from in-code vocabularies, written with `save_pretrained`. Serving then
loads them with `from_pretrained`, the same path real Flux.1 / Wan2.1 weights take.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

CLIP_SPECIAL = ("<|startoftext|>", "<|endoftext|>")


def _clip_byte_symbols() -> list[str]:
    """The 256 printable stand-ins CLIP's byte-level BPE uses for raw bytes (GPT-2's table)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    symbols = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def build_clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for sym in _clip_byte_symbols():
        vocab[sym] = len(vocab)
    for sym in _clip_byte_symbols():
        vocab[sym + "</w>"] = len(vocab)
    for special in CLIP_SPECIAL:
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def build_t5_tokenizer():
    """A unigram vocabulary over printable ASCII: `▁c` starts a word, `c` continues one."""
    from transformers import T5Tokenizer

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    chars = string.ascii_letters + string.digits + string.punctuation
    pieces += [("▁" + c, -1.0) for c in chars]
    pieces += [(c, -1.5) for c in chars]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def flux_dev_scheduler():
    """FLUX.1-dev's flow-matching scheduler config (resolution-dependent shift), for every Flux we build."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def _tiny_t5_config(tokenizer) -> dict:
    """A 2-layer, 32-wide T5 / UMT5 encoder config over `tokenizer`'s vocabulary."""
    return dict(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )


def _tiny_vae16(scaling_factor: float, shift_factor: float):
    """The tiny 16-channel AutoencoderKL (8x down, no quant convs) Flux and SD3 share; they differ in the
    latent scaling and shift factors."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def build_tiny_flux(out_dir: str | Path, *, seed: int = 0) -> Path:
    """A ~0.4 M-parameter FluxPipeline with random weights (draws noise; fast enough for tests)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    clip_tokenizer = build_clip_tokenizer()
    t5_tokenizer = build_t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=clip_tokenizer.bos_token_id,
            eos_token_id=clip_tokenizer.eos_token_id,
            pad_token_id=clip_tokenizer.pad_token_id,
        )
    )
    t5 = T5EncoderModel(T5Config(**_tiny_t5_config(t5_tokenizer)))
    vae = _tiny_vae16(scaling_factor=0.3611, shift_factor=0.1159)  # Flux's
    scheduler = flux_dev_scheduler()
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tokenizer,
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )
    out = Path(out_dir)
    pipe.save_pretrained(out)
    return out


def build_tiny_flux_kontext(out_dir: str | Path, *, seed: int = 1) -> Path:
    """tiny-flux's architecture as a FluxKontextPipeline directory (image editing with a reference image):
    FLUX.1-Kontext-dev is a Flux transformer of the same shapes, so the components are tiny-flux's (other
    random weights, from `seed`), written by the Kontext pipeline class's own save_pretrained."""
    from diffusers import FluxKontextPipeline, FluxPipeline

    out = Path(out_dir)
    build_tiny_flux(out, seed=seed)
    pipe = FluxKontextPipeline(**FluxPipeline.from_pretrained(out).components)
    pipe.save_pretrained(out)  # model_index.json now names FluxKontextPipeline
    return out


def build_tiny_wan(out_dir: str | Path, *, seed: int = 0) -> Path:
    """A tiny WanPipeline (text-to-video) with random weights: UMT5 text encoder, WanTransformer3D,
    causal 3-D VAE (8x spatial, 4x temporal) and the UniPC flow scheduler Wan2.1 ships with."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    tokenizer = build_t5_tokenizer()
    text_encoder = UMT5EncoderModel(UMT5Config(**_tiny_t5_config(tokenizer)))
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=256,
    )
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=16, dim_mult=[1, 1, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    # Wan2.1-T2V's own scheduler config (flow-matching UniPC, shift 3.0 as for 480p).
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, num_train_timesteps=1000,
        solver_order=2, solver_type="bh2", lower_order_final=True, final_sigmas_type="zero",
    )
    pipe = WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer
    )
    out = Path(out_dir)
    pipe.save_pretrained(out)
    return out


def build_tiny_wan_i2v(out_dir: str | Path, *, seed: int = 2) -> Path:
    """A tiny WanImageToVideoPipeline (Wan2.1-I2V layout) with random weights: tiny-wan's UMT5, VAE and
    scheduler, a CLIPVisionModel image encoder (32 px, 8 px patches: 17 tokens, 32 wide) with its
    CLIPImageProcessor (Wan2.1-I2V's OpenAI-CLIP normalisation, at 32 px), and a WanTransformer3D taking
    36 channels (16 noise + 4 first-frame mask + 16 condition latents) whose cross-attention also attends
    to the image embeddings (image_dim = CLIP's width, added_kv_proj_dim = the transformer's)."""
    import json

    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanTransformer3DModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    tokenizer = build_t5_tokenizer()
    text_encoder = UMT5EncoderModel(UMT5Config(**_tiny_t5_config(tokenizer)))
    image_encoder = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
            patch_size=8, projection_dim=32,
        )
    )
    image_processor = CLIPImageProcessor(  # Wan2.1-I2V's processor (bicubic, centre crop), at 32 px
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, resample=3,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=36,  # noise (16) + mask (4) + condition latents (16)
        out_channels=16,
        text_dim=32,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        image_dim=32,  # the CLIP's hidden size
        added_kv_proj_dim=32,  # the transformer's width (heads x head dim), as Wan2.1-I2V's 5120
        rope_max_seq_len=256,
    )
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=16, dim_mult=[1, 1, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    scheduler = UniPCMultistepScheduler(  # Wan2.1-I2V-480P's (flow-matching UniPC, shift 3.0)
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, num_train_timesteps=1000,
        solver_order=2, solver_type="bh2", lower_order_final=True, final_sigmas_type="zero",
    )
    pipe = WanImageToVideoPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, image_processor=image_processor,
        image_encoder=image_encoder, transformer=transformer,
    )
    out = Path(out_dir)
    pipe.save_pretrained(out)
    # Without torchvision transformers builds CLIPImageProcessor as CLIPImageProcessorPil, and save_pretrained
    # names that class; name CLIPImageProcessor as Wan2.1-I2V's directories do (loading it gives the same).
    index_path = out / "model_index.json"
    index = json.loads(index_path.read_text())
    index["image_processor"] = ["transformers", "CLIPImageProcessor"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return out


def build_tiny_sd3(out_dir: str | Path, *, seed: int = 0) -> Path:
    """A tiny StableDiffusion3Pipeline with random weights, laid out as SD3.5-medium: CLIP-L and CLIP-G with
    projections (pooled 16 + 32), T5 (64 wide: the CLIPs' 48 are zero-padded to it), an SD3Transformer2DModel
    whose first block has SD3.5's dual attention and RMS QK-norm (the last block is context_pre_only), the
    16-channel AutoencoderKL with SD3's scaling and shift factors, and SD3.5's flow-matching scheduler."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    clip_tokenizer = build_clip_tokenizer()
    t5_tokenizer = build_t5_tokenizer()

    def clip(width: int, heads: int) -> CLIPTextModelWithProjection:
        return CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=len(clip_tokenizer),
                hidden_size=width,
                intermediate_size=2 * width,
                num_hidden_layers=2,
                num_attention_heads=heads,
                max_position_embeddings=77,
                projection_dim=width,
                bos_token_id=clip_tokenizer.bos_token_id,
                eos_token_id=clip_tokenizer.eos_token_id,
                pad_token_id=clip_tokenizer.pad_token_id,
            )
        )

    clip_l, clip_g = clip(16, 2), clip(32, 4)
    t5 = T5EncoderModel(T5Config(**{**_tiny_t5_config(t5_tokenizer), "d_model": 64, "d_kv": 16, "d_ff": 128}))
    transformer = SD3Transformer2DModel(
        sample_size=8,  # 64 px by default
        patch_size=2,
        in_channels=16,
        num_layers=3,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=64,  # T5's width
        caption_projection_dim=32,
        pooled_projection_dim=48,  # CLIP-L's 16 + CLIP-G's 32
        out_channels=16,
        pos_embed_max_size=64,  # sides up to 64 patches = 1024 px
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    vae = _tiny_vae16(scaling_factor=1.5305, shift_factor=0.0609)  # SD3's
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)  # SD3.5's
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip_l,
        tokenizer=clip_tokenizer,
        text_encoder_2=clip_g,
        tokenizer_2=build_clip_tokenizer(),
        text_encoder_3=t5,
        tokenizer_3=t5_tokenizer,
    )
    out = Path(out_dir)
    pipe.save_pretrained(out)
    return out


# model yaml name -> builder writing that model's weights directory
TINY_BUILDERS = {"tiny-flux": build_tiny_flux, "tiny-wan": build_tiny_wan}
TINY_BUILDERS["tiny-flux-kontext"] = build_tiny_flux_kontext
TINY_BUILDERS["tiny-sd3"] = build_tiny_sd3
TINY_BUILDERS["tiny-wan-i2v"] = build_tiny_wan_i2v
