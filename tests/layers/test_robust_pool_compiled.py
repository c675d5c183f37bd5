"""The compiled kernels give the eager kernels' answers (slow: compiles with torch.compile)."""

from __future__ import annotations

import sys

import pytest
import torch

from declnet import DeclarativeWarning
from declnet.layers import (
    Huber,
    PseudoHuber,
    TruncatedQuadratic,
    Welsch,
    compile_mode,
    robust_pool,
    robust_vector_pool,
    set_compile_mode,
)


def eager_then_compiled(run):
    """``[run(), run()]`` with the kernels eager, then compiled (the mode restored after)."""
    previous = compile_mode()
    try:
        results = []
        for mode in ("never", "always"):
            set_compile_mode(mode)
            results.append(run())
        return results
    finally:
        set_compile_mode(previous)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # from torch's own compile stack
def test_compiled_equals_eager():
    x = torch.randn(4, 6, 33, generator=torch.Generator().manual_seed(0))
    v = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))

    def run():
        xg = x.clone().requires_grad_()
        y = robust_pool(xg, PseudoHuber(0.7))
        y.backward(v)
        return y.detach(), xg.grad

    (y_eager, g_eager), (y_comp, g_comp) = eager_then_compiled(run)
    # Same formulas; only the summation order may differ.
    torch.testing.assert_close(y_comp, y_eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_comp, g_eager, rtol=1e-5, atol=1e-6)


def test_compile_mode_validation():
    with pytest.raises(ValueError, match="compile mode must be one of"):
        set_compile_mode("sometimes")


def test_failed_compilation_falls_back_to_eager(monkeypatch):
    kernels = sys.modules["declnet.layers._kernels"]

    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler here")

        return run

    monkeypatch.setattr(kernels.torch, "compile", broken_compile)
    monkeypatch.setattr(kernels, "_compiled", {})
    monkeypatch.setitem(kernels._state, "broken", False)
    x = torch.randn(3, 4, 17, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    previous = compile_mode()
    try:
        set_compile_mode("never")
        expected = robust_pool(x, PseudoHuber(0.7))
        set_compile_mode("always")
        with pytest.warns(DeclarativeWarning, match="using eager PyTorch from now on"):
            got = robust_pool(x, PseudoHuber(0.7))
    finally:
        set_compile_mode(previous)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert kernels._state["broken"] is True


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # from torch's own compile stack
@pytest.mark.parametrize("cls", [PseudoHuber, Huber, Welsch, TruncatedQuadratic])
def test_compiled_vector_kernels_equal_eager(cls):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 5, 64, generator=gen)
    x[..., :8] += 4.0
    v = torch.randn(4, 5, generator=gen)

    def run():
        xg = x.clone().requires_grad_()
        alpha = torch.tensor(0.8, requires_grad=True)
        y = robust_vector_pool(xg, cls(alpha))
        y.backward(v)
        return y.detach(), xg.grad, alpha.grad

    (y_e, g_e, a_e), (y_c, g_c, a_c) = eager_then_compiled(run)
    torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_c, g_e, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a_c, a_e, rtol=1e-4, atol=1e-5)
