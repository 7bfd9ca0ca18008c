"""Parallel tiled VAE decode: the tiles of diffusers' `AutoencoderKL.tiled_decode`, spread over ranks.

Same tiles, same overlap, same blending as the single-device tiled decode, so the result is that decode
exactly (up to the order-independent float math of each tile); tile k is decoded by rank k % P, the
decoded tiles are all-gathered (zero-padded to one shape, so one collective serves all), and every rank
blends them. Used by the vae_decoder model when the system has several ranks and `vae_tiling` is on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from ..families import load_stage
from ..params import ModelParams, SystemParams
from . import parallel_state as ps
from .parallel_state import ParallelConfig
from .worker_pool import WorkerContext, WorkerPool, WorkerPoolError


@dataclass(frozen=True)
class Tile:
    row: int
    col: int
    top: int  # latent coordinates
    left: int
    height: int
    width: int


def tile_grid(vae, z: torch.Tensor) -> list[list[Tile]]:
    """The tiles AutoencoderKL.tiled_decode uses for latents `z` [B, C, H, W], row by row."""
    step = int(vae.tile_latent_min_size * (1 - vae.tile_overlap_factor))
    size = vae.tile_latent_min_size
    rows = []
    for r, top in enumerate(range(0, z.shape[2], step)):
        rows.append(
            [
                Tile(r, c, top, left, min(size, z.shape[2] - top), min(size, z.shape[3] - left))
                for c, left in enumerate(range(0, z.shape[3], step))
            ]
        )
    return rows


def _decode_tile(vae, z: torch.Tensor, tile: Tile) -> torch.Tensor:
    latent = z[:, :, tile.top : tile.top + tile.height, tile.left : tile.left + tile.width]
    if vae.config.use_post_quant_conv:
        latent = vae.post_quant_conv(latent)
    return vae.decoder(latent)


@torch.inference_mode()
def parallel_tiled_decode(vae, z: torch.Tensor, group: ps.GroupInfo) -> torch.Tensor:
    """`vae.tiled_decode(z)` with the tiles decoded across `group`; the full image on every rank."""
    grid = tile_grid(vae, z)
    tiles = [t for row in grid for t in row]
    world, rank = group.world_size, group.rank_in_group
    per_rank = math.ceil(len(tiles) / world)
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    full = vae.tile_latent_min_size * scale

    # 1. Decode this rank's tiles into a zero-padded buffer [per_rank, B, C, full, full]
    mine = tiles[rank::world]
    buffer = None
    for k, tile in enumerate(mine):
        decoded = _decode_tile(vae, z, tile)
        if buffer is None:
            buffer = decoded.new_zeros((per_rank, *decoded.shape[:2], full, full))
        buffer[k, :, :, : decoded.shape[2], : decoded.shape[3]] = decoded
    if buffer is None:  # more ranks than tiles: this rank only joins the collective
        channels = vae.config.out_channels
        buffer = z.new_zeros((per_rank, z.shape[0], channels, full, full), dtype=vae.dtype)

    # 2. Gather: parts[r][k] is tile r + k*world
    parts = [torch.empty_like(buffer) for _ in range(world)]
    dist.all_gather(parts, buffer.contiguous(), group=group.group)
    decoded_tiles = {}
    for index, tile in enumerate(tiles):
        padded = parts[index % world][index // world]
        decoded_tiles[(tile.row, tile.col)] = padded[:, :, : tile.height * scale, : tile.width * scale].clone()

    # 3. Blend exactly as AutoencoderKL.tiled_decode
    blend_extent = int(vae.tile_sample_min_size * vae.tile_overlap_factor)
    row_limit = vae.tile_sample_min_size - blend_extent
    result_rows = []
    for row in grid:
        result_row = []
        for tile in row:
            current = decoded_tiles[(tile.row, tile.col)]
            if tile.row > 0:
                current = vae.blend_v(decoded_tiles[(tile.row - 1, tile.col)], current, blend_extent)
            if tile.col > 0:
                current = vae.blend_h(decoded_tiles[(tile.row, tile.col - 1)], current, blend_extent)
            decoded_tiles[(tile.row, tile.col)] = current  # later tiles blend against the blended one
            result_row.append(current[:, :, :row_limit, :row_limit])
        result_rows.append(torch.cat(result_row, dim=3))
    return torch.cat(result_rows, dim=2)


class DecodeWorker:
    """One rank of the vae_decoder's pool: the family's decoder stage, tiles decoded in parallel."""

    def __init__(self, ctx: WorkerContext, model: ModelParams, system: SystemParams) -> None:
        self.ctx = ctx
        self.stage = load_stage("decoder", model, system)
        if not hasattr(self.stage, "decode_with"):
            raise ValueError(f"family {model.family!r} has no parallel VAE decode")

    def decode(self, latents: np.ndarray) -> np.ndarray:
        group = ps.get_world_group()
        return self.stage.decode_with(
            torch.from_numpy(latents), lambda vae, z: parallel_tiled_decode(vae, z, group)
        )


def init_decode_worker(ctx: WorkerContext, model: ModelParams, system: SystemParams) -> DecodeWorker:
    return DecodeWorker(ctx, model, system)


class PooledDecoder:
    """The vae_decoder model's pool (same ranks as the denoiser's): spawned at load, one job per request."""

    def __init__(self, model: ModelParams, system: SystemParams, *, step_timeout_s: float = 600.0):
        self.pool = WorkerPool(
            system.world_size,
            init_decode_worker,
            init_args=(model, system),
            parallel=ParallelConfig(ulysses_degree=system.world_size),
            device=system.device,
            step_timeout_s=step_timeout_s,
        )
        self.pool.start()

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        try:
            return self.pool.run("decode", latents.numpy())
        except WorkerPoolError as exc:
            raise RuntimeError(f"VAE decode pool failed this request (it restarts for the next one): {exc}") from None

    def close(self) -> None:
        self.pool.shutdown()
