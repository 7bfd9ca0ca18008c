"""Train `shapes-flux`: a small FluxPipeline (AutoencoderKL + FluxTransformer2DModel + CLIP/T5) on shapes.

Two phases, both with the real diffusers / transformers classes:
1. the VAE (8x down, 16 latent channels, as Flux's) as a plain autoencoder (MSE + L1 + a tiny KL);
   its scaling / shift factors are then computed from the encoded dataset, as Flux's were;
2. the transformer and both text encoders jointly, with rectified flow matching exactly as
   FluxPipeline samples: x_t = (1 - s) x0 + s noise, target noise - x0, the transformer called with
   timestep = s (FluxPipeline passes t / 1000 = s) and s drawn through the same resolution shift
   (`calculate_shift` mu) the pipeline's FlowMatchEulerDiscreteScheduler applies at sampling.
The EMA weights are saved with `FluxPipeline.save_pretrained`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..tiny_models import build_clip_tokenizer, build_t5_tokenizer, flux_dev_scheduler
from .dataset import DatasetConfig, make_dataset


@dataclass(frozen=True)
class ArchConfig:
    """Sizes of every component; small enough for < 1 s per 20-step 64x64 image on 2 CPU cores."""

    num_layers: int = 2  # double-stream (joint text/image) blocks
    num_single_layers: int = 4
    num_attention_heads: int = 5
    attention_head_dim: int = 32
    axes_dims_rope: tuple[int, int, int] = (8, 12, 12)  # sums to attention_head_dim
    text_width: int = 64  # CLIP hidden (= pooled projection dim) and T5 d_model (= joint attention dim)
    text_layers: int = 2
    text_heads: int = 4
    max_sequence_length: int = 64  # T5 tokens; the char-level tokenizer needs ~60 for the longest caption
    vae_channels: tuple[int, ...] = (32, 64, 64, 64)  # 4 blocks -> 8x down, as Flux's VAE
    latent_channels: int = 16


@dataclass
class TrainConfig:
    seed: int = 0
    device: str = "cuda"
    n_images: int = 50_000
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    arch: ArchConfig = field(default_factory=ArchConfig)
    # phase 1: VAE
    vae_steps: int = 4000
    vae_batch: int = 128
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-7  # per-sample KL sum vs per-pixel MSE: only keeps the posterior tame
    vae_time_budget_s: float = 0.0  # > 0: stop phase 1 early after this many seconds
    vae_from: str | None = None  # a pipeline directory whose trained VAE is reused (phase 1 skipped)
    # phase 2: transformer + text encoders
    steps: int = 12_000
    batch: int = 256
    lr: float = 4e-4
    warmup: int = 300
    ema_decay: float = 0.999
    guidance_range: tuple[float, float] = (1.0, 5.0)  # random embedded guidance: accepted, not distilled
    time_budget_s: float = 0.0  # > 0: stop phase 2 early after this many seconds
    bf16: bool = False  # autocast on CUDA only (the first GPU run diverged to NaN under bf16)
    log_every: int = 200


# ---------------------------------------------------------------------------------------------
# Components
# ---------------------------------------------------------------------------------------------


def build_components(arch: ArchConfig) -> dict[str, Any]:
    """Fresh, randomly initialised pipeline components (same classes as tiny_models.build_tiny_flux)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tokenizer, tokenizer_2 = build_clip_tokenizer(), build_t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * arch.latent_channels,  # 2x2 packed latents
        num_layers=arch.num_layers,
        num_single_layers=arch.num_single_layers,
        attention_head_dim=arch.attention_head_dim,
        num_attention_heads=arch.num_attention_heads,
        joint_attention_dim=arch.text_width,
        pooled_projection_dim=arch.text_width,
        guidance_embeds=True,
        axes_dims_rope=arch.axes_dims_rope,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=arch.text_width,
            intermediate_size=2 * arch.text_width,
            num_hidden_layers=arch.text_layers,
            num_attention_heads=arch.text_heads,
            max_position_embeddings=77,
            projection_dim=arch.text_width,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=arch.text_width,
            d_kv=arch.text_width // arch.text_heads,
            d_ff=2 * arch.text_width,
            num_layers=arch.text_layers,
            num_heads=arch.text_heads,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.0,
            pad_token_id=tokenizer_2.pad_token_id,
            eos_token_id=tokenizer_2.eos_token_id,
            decoder_start_token_id=tokenizer_2.pad_token_id,
        )
    )
    n = len(arch.vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=arch.vae_channels,
        layers_per_block=1,
        latent_channels=arch.latent_channels,
        norm_num_groups=16,
        sample_size=64,
        scaling_factor=1.0,  # replaced by the data's statistics after phase 1
        shift_factor=0.0,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    scheduler = flux_dev_scheduler()
    return dict(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def tokenize(tokenizer, tokenizer_2, captions: list[str], max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids exactly as FluxPipeline._get_clip_prompt_embeds / _get_t5_prompt_embeds make them."""
    clip_ids = tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    t5_ids = tokenizer_2(
        captions, padding="max_length", max_length=max_sequence_length, truncation=True, return_tensors="pt"
    ).input_ids
    return clip_ids, t5_ids


def encode_text(text_encoder, text_encoder_2, clip_ids: torch.Tensor, t5_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds [B, L, D], pooled [B, D]) as FluxPipeline.encode_prompt, but differentiable."""
    pooled = text_encoder(clip_ids, output_hidden_states=False).pooler_output
    prompt_embeds = text_encoder_2(t5_ids, output_hidden_states=False)[0]
    return prompt_embeds, pooled


def sigma_shift_mu(image_seq_len: int, scheduler) -> float:
    """The mu FluxPipeline passes to the scheduler for this many packed image tokens."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    c = scheduler.config
    return calculate_shift(image_seq_len, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)


def sample_sigmas(n: int, mu: float, generator: torch.Generator, device: str) -> torch.Tensor:
    """Half uniform, half logit-normal in (0, 1), then the scheduler's exponential time shift with mu,
    so training sees noise levels distributed like the ones FluxPipeline visits."""
    u = torch.rand(n, generator=generator)
    ln = torch.sigmoid(torch.randn(n, generator=generator))
    u = torch.where(torch.rand(n, generator=generator) < 0.5, u, ln).clamp(1e-4, 1 - 1e-4)
    sigma = math.exp(mu) / (math.exp(mu) + (1 / u - 1))
    return sigma.to(device)


class EMA:
    """Exponential moving average of a set of modules' parameters (the weights that get saved)."""

    def __init__(self, modules: list[torch.nn.Module], decay: float):
        self.decay = decay
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone().float() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))  # warm start: early weights fade fast
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1 - decay)

    @torch.no_grad()
    def copy_to_modules(self) -> None:
        for p, s in zip(self.params, self.shadow):
            p.copy_(s.to(p.dtype))


def _to_pixels(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _autocast(cfg: TrainConfig):
    enabled = cfg.bf16 and cfg.device.startswith("cuda")
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled)


def _lr_lambda(warmup: int) -> Callable[[int], float]:
    return lambda step: min(1.0, (step + 1) / max(warmup, 1))


# ---------------------------------------------------------------------------------------------
# Phase 1: VAE
# ---------------------------------------------------------------------------------------------


def train_vae(vae, images: torch.Tensor, cfg: TrainConfig, log: Callable[[str], None]) -> dict[str, Any]:
    """Autoencoder training on uint8 images [N, H, W, 3] already on the device."""
    gen = torch.Generator("cpu").manual_seed(cfg.seed + 1)
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(200))
    start, step, loss_val = time.perf_counter(), 0, float("nan")
    for step in range(cfg.vae_steps):
        idx = torch.randint(0, images.shape[0], (cfg.vae_batch,), generator=gen).to(images.device)
        x = _to_pixels(images[idx])
        with _autocast(cfg):
            posterior = vae.encode(x).latent_dist
            z = posterior.sample(generator=None)
            rec = vae.decode(z).sample.float()
        kl = posterior.kl().mean()
        loss = F.mse_loss(rec, x) + 0.1 * F.l1_loss(rec, x) + cfg.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % cfg.log_every == 0 or step == cfg.vae_steps - 1:
            loss_val = loss.item()
            log(f"vae step {step} loss {loss_val:.5f} kl {kl.item():.1f} {time.perf_counter() - start:.0f}s")
        if cfg.vae_time_budget_s and time.perf_counter() - start > cfg.vae_time_budget_s:
            log(f"vae: time budget reached at step {step}")
            break
    vae.eval()
    return {"vae_steps_done": step + 1, "vae_seconds": time.perf_counter() - start, "vae_final_loss": loss.item()}


@torch.no_grad()
def encode_dataset(vae, images: torch.Tensor, cfg: TrainConfig, batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image (sampled afresh each training step)."""
    means, stds = [], []
    for i in range(0, images.shape[0], batch):
        with _autocast(cfg):
            dist = vae.encode(_to_pixels(images[i : i + batch])).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    return torch.cat(means), torch.cat(stds)


def latent_factors(means: torch.Tensor) -> tuple[float, float]:
    """Flux-style (scaling_factor, shift_factor): latents become ~zero-mean, unit-variance."""
    shift = float(means.mean())
    scale = 1.0 / float((means - shift).std())
    return scale, shift


@torch.no_grad()
def vae_reconstruction_error(vae, images: torch.Tensor, cfg: TrainConfig, n: int = 512) -> float:
    """Mean absolute error in 0..255 units through the posterior mean."""
    x = _to_pixels(images[:n])
    with _autocast(cfg):
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.float()
    return float((rec.clamp(-1, 1) - x).abs().mean() * 127.5)


# ---------------------------------------------------------------------------------------------
# Phase 2: transformer + text encoders
# ---------------------------------------------------------------------------------------------


def train_transformer(
    comps: dict[str, Any],
    latent_mean: torch.Tensor,
    latent_std: torch.Tensor,
    caption_index: torch.Tensor,
    clip_ids: torch.Tensor,
    t5_ids: torch.Tensor,
    cfg: TrainConfig,
    log: Callable[[str], None],
) -> dict[str, Any]:
    from diffusers import FluxPipeline

    transformer, clip, t5 = comps["transformer"], comps["text_encoder"], comps["text_encoder_2"]
    vae_cfg = comps["vae"].config
    device = cfg.device
    modules = [transformer, clip, t5]
    for m in modules:
        m.train()
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup))
    ema = EMA(modules, cfg.ema_decay)
    gen = torch.Generator("cpu").manual_seed(cfg.seed + 2)

    c, h, w = latent_mean.shape[1:]
    img_ids = FluxPipeline._prepare_latent_image_ids(cfg.batch, h // 2, w // 2, device, torch.float32)
    txt_ids = torch.zeros(cfg.arch.max_sequence_length, 3, device=device)
    mu = sigma_shift_mu((h // 2) * (w // 2), comps["scheduler"])
    log(f"transformer: latent {c}x{h}x{w}, {(h // 2) * (w // 2)} image tokens, shift mu {mu:.4f}")

    start, step, losses, skipped = time.perf_counter(), 0, [], 0
    for step in range(cfg.steps):
        idx = torch.randint(0, latent_mean.shape[0], (cfg.batch,), generator=gen)
        noise_lat = torch.randn(cfg.batch, c, h, w, generator=gen).to(device)
        noise = torch.randn(cfg.batch, c, h, w, generator=gen).to(device)
        sigma = sample_sigmas(cfg.batch, mu, gen, device)
        lo, hi = cfg.guidance_range
        guidance = (lo + (hi - lo) * torch.rand(cfg.batch, generator=gen)).to(device)
        idx_d = idx.to(device)
        # A fresh posterior sample each step, then Flux's latent normalisation.
        x0 = latent_mean[idx_d] + latent_std[idx_d] * noise_lat
        x0 = (x0 - vae_cfg.shift_factor) * vae_cfg.scaling_factor
        s = sigma.view(-1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        target = FluxPipeline._pack_latents(noise - x0, cfg.batch, c, h, w)
        cap = caption_index[idx_d]
        with _autocast(cfg):
            prompt_embeds, pooled = encode_text(clip, t5, clip_ids[cap], t5_ids[cap])
            pred = transformer(
                hidden_states=FluxPipeline._pack_latents(xt, cfg.batch, c, h, w),
                timestep=sigma,  # FluxPipeline passes t / 1000, i.e. sigma
                guidance=guidance,
                pooled_projections=pooled,
                encoder_hidden_states=prompt_embeds,
                txt_ids=txt_ids,
                img_ids=img_ids,
                return_dict=False,
            )[0]
        loss = F.mse_loss(pred.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        # A non-finite loss or gradient must never reach the weights: skip that batch instead.
        if not bool(torch.isfinite(loss) & torch.isfinite(grad_norm)):
            skipped += 1
            if skipped > 100 + step // 10:  # persistent: stop and keep the EMA of the good steps
                log(f"training diverged: {skipped} non-finite steps by step {step}; stopping")
                break
            continue
        opt.step()
        sched.step()
        ema.update(step)
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            losses.append((step, loss.item()))
            log(f"step {step} loss {losses[-1][1]:.4f} grad {float(grad_norm):.3f} skipped {skipped} "
                f"{time.perf_counter() - start:.0f}s")
        if cfg.time_budget_s and time.perf_counter() - start > cfg.time_budget_s:
            log(f"transformer: time budget reached at step {step}")
            break
    ema.copy_to_modules()
    for m in modules:
        m.eval()
    return {"steps_done": step + 1, "steps_skipped": skipped, "transformer_seconds": time.perf_counter() - start,
            "loss_curve": losses}


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def param_counts(comps: dict[str, Any]) -> dict[str, int]:
    return {
        k: sum(p.numel() for p in v.parameters())
        for k, v in comps.items()
        if isinstance(v, torch.nn.Module)
    }


def train(cfg: TrainConfig, out_dir: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build, train and save the whole pipeline to `out_dir`; returns a JSON-able record."""
    from diffusers import FluxPipeline

    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    if cfg.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    data = make_dataset(cfg.n_images, cfg.seed, cfg.dataset)
    captions = sorted(set(data.captions))
    lookup = {c: i for i, c in enumerate(captions)}
    caption_index = torch.tensor([lookup[c] for c in data.captions], device=cfg.device)
    log(f"dataset: {len(data)} images, {len(captions)} captions, {time.perf_counter() - t0:.1f}s")

    comps = build_components(cfg.arch)
    counts = param_counts(comps)
    log(f"params: {counts}")
    for k in ("vae", "text_encoder", "text_encoder_2", "transformer"):
        comps[k].to(cfg.device)
    images = torch.from_numpy(data.images).to(cfg.device)

    record: dict[str, Any] = {"config": asdict(cfg), "params": counts, "device": cfg.device}
    if cfg.device.startswith("cuda"):
        record["device_name"] = torch.cuda.get_device_name()
    if cfg.vae_from:
        from diffusers import AutoencoderKL

        trained = AutoencoderKL.from_pretrained(cfg.vae_from, subfolder="vae")
        comps["vae"].load_state_dict(trained.state_dict())
        record["vae_from"] = cfg.vae_from
        log(f"vae: reusing {cfg.vae_from}")
    else:
        record.update(train_vae(comps["vae"], images, cfg, log))
    record["vae_mae_255"] = vae_reconstruction_error(comps["vae"], images, cfg)
    means, stds = encode_dataset(comps["vae"], images, cfg)
    scale, shift = latent_factors(means)
    comps["vae"].register_to_config(scaling_factor=scale, shift_factor=shift)
    record.update(scaling_factor=scale, shift_factor=shift)
    log(f"vae: MAE {record['vae_mae_255']:.2f}/255, scaling {scale:.4f} shift {shift:.4f}")
    for p in comps["vae"].parameters():
        p.requires_grad_(False)

    clip_ids, t5_ids = tokenize(comps["tokenizer"], comps["tokenizer_2"], captions, cfg.arch.max_sequence_length)
    record.update(
        train_transformer(comps, means, stds, caption_index, clip_ids.to(cfg.device), t5_ids.to(cfg.device), cfg, log)
    )

    pipe = FluxPipeline(**{k: (v.to("cpu").float() if isinstance(v, torch.nn.Module) else v) for k, v in comps.items()})
    out_dir = Path(out_dir)
    pipe.save_pretrained(out_dir)
    record["total_seconds"] = time.perf_counter() - t0
    record["size_bytes"] = sum(f.stat().st_size for f in out_dir.rglob("*") if f.is_file())
    log(f"saved {out_dir} ({record['size_bytes'] / 1e6:.1f} MB) in {record['total_seconds']:.0f}s total")
    return record


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    d = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="models/shapes-flux", help="pipeline directory to write")
    p.add_argument("--record", default=None, help="also write the training record (JSON) here")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--n-images", type=int, default=d.n_images)
    p.add_argument("--vae-steps", type=int, default=d.vae_steps)
    p.add_argument("--vae-batch", type=int, default=d.vae_batch)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--vae-time-budget", type=float, default=0.0, help="seconds; 0 = run all VAE steps")
    p.add_argument("--time-budget", type=float, default=0.0, help="seconds; 0 = run all transformer steps")
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on CUDA (diverged once; off by default)")
    p.add_argument("--vae-from", default=None, help="reuse the VAE of this pipeline directory, skip phase 1")
    a = p.parse_args(argv)
    cfg = TrainConfig(
        seed=a.seed,
        device=a.device,
        n_images=a.n_images,
        vae_steps=a.vae_steps,
        vae_batch=a.vae_batch,
        steps=a.steps,
        batch=a.batch,
        lr=a.lr,
        vae_time_budget_s=a.vae_time_budget,
        time_budget_s=a.time_budget,
        log_every=a.log_every,
        bf16=a.bf16,
        vae_from=a.vae_from,
    )
    return cfg, a


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg, args = parse_args(argv)
    record = train(cfg, Path(args.out), log=lambda s: print(s, flush=True))
    if args.record:
        Path(args.record).write_text(json.dumps(record, indent=2, default=str))
    return record
