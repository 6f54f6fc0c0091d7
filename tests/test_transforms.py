"""Random transforms: shapes, coverage, RT3 partition, determinism, gradients, numpy twin."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atop import contract
from training.classifier import ClassifierConfig, build_classifier
from training.purifier import DefendedPipeline, PurifierConfig, StochasticPipeline, UNetPurifier
from training.transforms import RTSpec, apply_rt, block_masks, sample_rt


@pytest.mark.parametrize("kind, copies", [("rt1", 1), ("rt2", 1), ("rt3", 4)])
def test_shapes(kind, copies):
    spec = RTSpec(kind=kind)
    s = sample_rt(spec, 5, torch.Generator().manual_seed(0))
    assert s.noise.shape == (5, 3, 32, 32) and s.masks.shape == (5, copies, 1, 32, 32)
    inp = apply_rt(torch.rand(5, 3, 32, 32), s.noise, s.masks, spec.noise_std)
    assert inp.shape == (5, copies, 4, 32, 32)


@pytest.mark.parametrize("missing, block", [(0.25, 4), (0.5, 8), (0.1, 2)])
def test_exact_coverage_fraction_and_block_structure(missing, block):
    spec = RTSpec(kind="rt2", missing=missing, block=block)
    m = block_masks(spec, 16, torch.Generator().manual_seed(1))[:, 0, 0]
    k = round(missing * spec.blocks)
    assert torch.allclose(m.mean((1, 2)), torch.full((16,), k / spec.blocks))
    # constant inside every block
    blocks = m.unfold(1, block, block).unfold(2, block, block)
    assert torch.equal(blocks.amax((-1, -2)), blocks.amin((-1, -2)))


def test_rt3_masks_partition_the_image():
    spec = RTSpec(kind="rt3", num_masks=4)
    m = block_masks(spec, 8, torch.Generator().manual_seed(2))
    assert torch.equal(m.sum(1), torch.ones(8, 1, 32, 32))  # every pixel missing exactly once
    assert torch.allclose(m.mean((2, 3, 4)), torch.full((8, 4), 0.25))


def test_holes_are_zero_and_mask_channel_is_passed():
    spec = RTSpec(kind="rt2", noise_std=0.1)
    x = torch.rand(2, 3, 32, 32)
    s = sample_rt(spec, 2, torch.Generator().manual_seed(3))
    inp = apply_rt(x, s.noise, s.masks, spec.noise_std)[:, 0]
    hole = s.masks[:, 0, 0].bool()
    assert (inp[:, :3].permute(1, 0, 2, 3)[:, hole] == 0).all()
    assert torch.equal(inp[:, 3], s.masks[:, 0, 0])
    kept = ~hole
    expect = (x + 0.1 * s.noise).clamp(0, 1).permute(1, 0, 2, 3)[:, kept]
    assert torch.allclose(inp[:, :3].permute(1, 0, 2, 3)[:, kept], expect)


def test_seeded_sampling_is_deterministic_and_fresh_otherwise():
    spec = RTSpec(kind="rt3")
    a = sample_rt(spec, 3, torch.Generator().manual_seed(7))
    b = sample_rt(spec, 3, torch.Generator().manual_seed(7))
    assert torch.equal(a.noise, b.noise) and torch.equal(a.masks, b.masks)
    g = torch.Generator().manual_seed(7)
    c, d = sample_rt(spec, 3, g), sample_rt(spec, 3, g)
    assert not torch.equal(c.masks, d.masks)


def test_global_rng_is_untouched():
    state = torch.get_rng_state()
    sample_rt(RTSpec(), 4, torch.Generator().manual_seed(0))
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("kind", ["rt1", "rt2", "rt3"])
def test_gradient_flows_through_the_whole_pipeline(kind):
    torch.manual_seed(0)
    purifier = UNetPurifier(PurifierConfig(width=4))
    # The head starts at zero (identity + grey holes); under RT3 an untrained purifier therefore
    # ignores x entirely. Give it weights, as training does.
    torch.nn.init.normal_(purifier.head.weight, std=0.1)
    classifier = build_classifier(ClassifierConfig(depth=1, width=4))
    pipe = DefendedPipeline(purifier, classifier, RTSpec(kind)).eval()
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    StochasticPipeline(pipe, torch.Generator().manual_seed(0))(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("kind", ["rt1", "rt2", "rt3"])
def test_numpy_sampler_follows_the_same_rules(kind):
    spec = RTSpec(kind=kind).to_dict()
    noise, masks = contract.sample_rt(spec, 6, np.random.default_rng(0))
    noise2, masks2 = contract.sample_rt(spec, 6, np.random.default_rng(0))
    assert np.array_equal(noise, noise2) and np.array_equal(masks, masks2)
    assert noise.dtype == masks.dtype == np.float32
    assert masks.shape == (6, contract.rt_copies(spec), 1, 32, 32)
    if kind == "rt3":
        assert np.array_equal(masks.sum(1), np.ones((6, 1, 32, 32), np.float32))
    else:
        assert np.allclose(masks.mean((1, 2, 3, 4)), 0.25)
