"""Parallel tiled VAE decode over 2 gloo ranks equals diffusers' single-device tiled decode."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from smart_diffusion_backend.families import load_stage
from smart_diffusion_backend.parallel.vae_decode import PooledDecoder, tile_grid
from smart_diffusion_backend.params import SystemParams

pytestmark = pytest.mark.pool  # every test here starts worker processes


@pytest.fixture(scope="module")
def system():
    return dataclasses.replace(SystemParams.load("cpu-sp2"), vae_tiling=True)


@pytest.fixture(scope="module")
def pooled(tiny_flux, system):
    decoder = PooledDecoder(tiny_flux, system, step_timeout_s=120)
    try:
        yield decoder
    finally:
        decoder.close()


def test_parallel_decode_equals_single_device_tiled_decode(tiny_flux, system, pooled):
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 20, 28, generator=generator)  # spans 3 x 4 tiles of the tiny VAE
    single = load_stage("decoder", tiny_flux, system)  # vae_tiling: the VAE's own tiled decode
    assert len([t for row in tile_grid(single.vae, latents) for t in row]) > 2
    expected = single.decode(latents)
    got = pooled.decode(latents)
    assert got.shape == expected.shape == (1, 160, 224, 3)
    np.testing.assert_array_equal(got, expected)


def test_small_latents_skip_tiling(tiny_flux, system, pooled):
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    expected = load_stage("decoder", tiny_flux, dataclasses.replace(system, vae_tiling=False)).decode(latents)
    np.testing.assert_array_equal(pooled.decode(latents), expected)
