"""ResNet-18 of the image experiment and its projection head."""

from __future__ import annotations

import math

import pytest
import torch

from declnet.apps.image import (
    PROJECTIONS,
    default_radius,
    parse_projection,
    resnet18,
)

# torchvision's resnet18() (width 64, 1000 classes): the layout the paper's 11.7M refers to.
TORCHVISION_RESNET18_PARAMETERS = 11_689_512


def _has_lp_projection() -> bool:
    try:
        from declnet.layers import LpProjection  # noqa: F401
    except ImportError:
        return False
    return True


needs_projection = pytest.mark.skipif(
    not _has_lp_projection(), reason="declnet.layers.LpProjection is not available"
)
PROJECTED = [name for name in PROJECTIONS if name != "none"]


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_resnet18_has_torchvision_parameter_count():
    assert _count(resnet18()) == TORCHVISION_RESNET18_PARAMETERS


def test_resnet18_uses_torchvision_module_names():
    state = resnet18().state_dict()
    assert len(state) == 122  # 62 parameters + 3 buffers for each of 20 BatchNorms
    for key in (
        "conv1.weight",
        "bn1.running_var",
        "layer1.0.conv1.weight",
        "layer1.1.bn2.bias",
        "layer2.0.downsample.0.weight",
        "layer2.0.downsample.1.running_mean",
        "layer4.1.conv2.weight",
        "fc.weight",
        "fc.bias",
    ):
        assert key in state
    assert tuple(state["layer3.0.downsample.0.weight"].shape) == (256, 128, 1, 1)
    assert tuple(state["fc.weight"].shape) == (1000, 512)


def test_torchvision_state_dict_loads_when_torchvision_is_installed():
    try:
        from torchvision.models import resnet18 as torchvision_resnet18
    except (ImportError, RuntimeError, OSError) as error:  # absent, or built for another torch
        pytest.skip(f"torchvision is not usable here: {error}")
    reference = torchvision_resnet18()
    ours = resnet18()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(ours.eval()(x), reference.eval()(x))


@needs_projection
@pytest.mark.parametrize("projection", PROJECTED)
def test_projection_adds_no_parameters(projection):
    assert _count(resnet18(projection=projection)) == TORCHVISION_RESNET18_PARAMETERS


def test_small_input_stem_shapes():
    model = resnet18(10, width=4, in_channels=1, small_input=True)
    assert model.maxpool.__class__.__name__ == "Identity"
    assert tuple(model.conv1.weight.shape) == (4, 1, 3, 3)
    for side in (8, 28):
        assert model(torch.randn(3, 1, side, side)).shape == (3, 10)
    assert model.features(torch.randn(2, 1, 28, 28)).shape == (2, 32)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        model(torch.randn(1, 28, 28))


def test_default_radius_is_the_papers_at_width_512_and_scales():
    assert default_radius("l1_sphere", 512) == pytest.approx(250)
    assert default_radius("l2_ball", 512) == pytest.approx(15)
    assert default_radius("linf_ball", 512) == pytest.approx(3)
    assert default_radius("l1_ball", 64) == pytest.approx(250 / 8)
    assert default_radius("l2_sphere", 128) == pytest.approx(7.5)
    assert default_radius("linf_sphere", 64) == pytest.approx(3 * math.sqrt(0.5 + 1 / 6))
    assert default_radius("none", 64) is None


def test_parse_projection():
    assert parse_projection("none") is None
    assert parse_projection("l1_ball") == (1.0, "ball")
    assert parse_projection("linf_sphere") == (math.inf, "sphere")
    with pytest.raises(ValueError, match="unknown projection 'l3_ball'"):
        parse_projection("l3_ball")
    with pytest.raises(ValueError, match="unknown projection"):
        resnet18(projection="L2")


@needs_projection
@pytest.mark.parametrize("projection", PROJECTED)
def test_head_outputs_obey_the_constraint(projection):
    torch.manual_seed(0)
    model = resnet18(10, width=8, in_channels=1, small_input=True, projection=projection)
    p, kind = parse_projection(projection)
    radius = default_radius(projection, 64)
    # Standardised 64-d features at three scales: inside, around and outside the radius.
    features = torch.randn(12, 64) * torch.tensor([0.05, 1.0, 20.0]).repeat(4).unsqueeze(1)
    model.train()
    normalised = model.feature_norm(features * 3 + 1)
    projected = model.projection(normalised)
    norms = torch.linalg.vector_norm(projected, ord=p, dim=1)
    input_norms = torch.linalg.vector_norm(normalised, ord=p, dim=1)
    if kind == "sphere":
        torch.testing.assert_close(norms, torch.full_like(norms, radius), rtol=1e-4, atol=1e-4)
    else:
        assert bool((norms <= radius * (1 + 1e-4)).all())
        inside = input_norms <= radius
        torch.testing.assert_close(projected[inside], normalised[inside])
        outside = ~inside
        torch.testing.assert_close(
            norms[outside], torch.full_like(norms[outside], radius), rtol=1e-4, atol=1e-4
        )
    # The whole head is differentiable through the projection.
    logits = model.head(features)
    logits.square().sum().backward()
    assert model.fc.weight.grad is not None and torch.isfinite(model.fc.weight.grad).all()
