"""The fused C kernel for Scaled WS (normfree.fused) computes what the torch
path and the definition compute, and is used only where it may be."""
import shutil
import sys

import pytest
import torch

import normfree
from normfree import fused
from normfree.layers import ScaledStdConv2d, _ScaledStdWeight
from test_fold import reference_fold

needs_kernel = pytest.mark.skipif(not fused.available(), reason="fused kernel not built")


@pytest.mark.skipif(not (sys.platform.startswith("linux") and shutil.which("gcc")),
                    reason="the kernel is built where a C compiler is")
def test_kernel_is_built_where_a_compiler_is():
    assert fused.available(), "pip install should have built normfree._ws_kernel (see setup.py)"


def count_kernel_calls(monkeypatch) -> dict:
    """Counts calls of the kernel's two entry points (a dict filled as they run)."""
    calls = {}
    for name in ("ws_forward", "ws_backward"):
        def counted(*args, _name=name, _fn=getattr(fused, name)):
            calls[_name] = calls.get(_name, 0) + 1
            return _fn(*args)
        monkeypatch.setattr(fused, name, counted)
    return calls


def make_weight(shape, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    w[1] = 0.3  # constant filter: the eps guard holds
    w[2] *= 1e-4  # tiny filter: guard holds, its gradient is not the unguarded one
    w[3] += 0.5  # a mean far from zero
    return w


@needs_kernel
@pytest.mark.parametrize("use_kernel", [True, False])
@pytest.mark.parametrize("shape", [(6, 3, 3, 3), (8, 5, 1, 1), (5, 100, 3, 3), (4, 1200, 1, 1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_float32_paths_match_float64_definition(use_kernel, shape, channels_last, monkeypatch):
    """Outputs and every gradient (weight, gain, per-channel scale, bias) of the
    float32 kernel and of the float32 torch ops against the float64 definition;
    fan-ins cross the kernel's 512-element summation blocks."""
    torch.manual_seed(sum(shape))
    w64 = make_weight(shape, seed=sum(shape))
    gain64 = torch.rand(shape[0], 1, 1, 1, dtype=torch.float64) + 0.5
    scale64 = torch.rand(shape[0], dtype=torch.float64) + 0.5
    bias64 = torch.randn(shape[0], dtype=torch.float64)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    leaves64 = [t.clone().requires_grad_(True) for t in (w64, gain64, scale64, bias64)]
    leaves32 = [t.float().contiguous(memory_format=fmt if t.dim() == 4 else torch.contiguous_format)
                .requires_grad_(True) for t in (w64, gain64, scale64, bias64)]
    calls = count_kernel_calls(monkeypatch)
    want = reference_fold(*leaves64, 1.3, 0.2)
    ctx = fused.disabled() if not use_kernel else torch.enable_grad()
    with ctx:
        got = _ScaledStdWeight.apply(*leaves32, 1.3, 0.2, 1e-4)
        assert got[0].is_contiguous(memory_format=fmt)
        gw = torch.randn(shape, dtype=torch.float64)
        gb = torch.randn(shape[0], dtype=torch.float64)
        grads32 = torch.autograd.grad(got, leaves32, (gw.float(), gb.float()))
    grads64 = torch.autograd.grad(want, leaves64, (gw, gb))
    # the kernel centres with a corrected two-pass mean; torch's float mean of the
    # constant row leaves ~1e-8 in w - mean, which r = 1/sqrt(eps) magnifies
    tol = 1e-6 if use_kernel else 2e-4
    assert calls == ({"ws_forward": 1, "ws_backward": 1} if use_kernel else {})
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=2e-6)
    for name, a, b in zip(("weight", "gain", "scale", "bias"), grads32, grads64):
        scale = b.abs().max().item()
        err = (a.double() - b).abs().max().item()
        assert err <= tol * scale + 1e-7, (name, err / scale)


@needs_kernel
def test_kernel_and_torch_path_agree_on_a_model_step():
    """A whole nf model: same loss, the same gradients to float rounding, and
    the no-grad (cached) weight is bit-identical to the training path's."""
    torch.manual_seed(0)
    model = normfree.create_model("nf_wrn_10_1", num_classes=10)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    results = []
    for ctx in (torch.enable_grad(), fused.disabled()):
        with ctx:
            model.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            results.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)

    conv = next(m for m in model.modules() if isinstance(m, ScaledStdConv2d))
    train_w, _ = conv.folded_weight_bias(out_scale=0.5)
    with torch.no_grad():
        cached_w, _ = conv.folded_weight_bias(out_scale=0.5)
    assert torch.equal(train_w, cached_w)


def test_kernel_is_not_used_for_other_dtypes_devices_or_when_disabled():
    w = torch.randn(4, 9)
    assert fused.usable(w) == fused.available()
    assert not fused.usable(w.double())
    assert not fused.usable(w.t())  # rows not contiguous
    with fused.disabled():
        assert not fused.usable(w)
    assert fused.usable(w) == fused.available()  # restored on exit
    if torch.cuda.is_available():
        assert not fused.usable(w.cuda())


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.trace: still what users call
@pytest.mark.parametrize("grad", [False, True])
def test_traced_and_exported_graphs_use_torch_ops(grad):
    """Tracing must record torch ops, never a call into C (or a cached weight)
    that the graph would not see: the weight would be baked in as a constant."""
    torch.manual_seed(0)
    conv = ScaledStdConv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        conv(x)  # fills the no-grad weight cache
    with torch.set_grad_enabled(grad):
        traced = torch.jit.trace(conv, x, check_trace=False)
    with torch.no_grad():
        conv.weight.mul_(2.0).add_(0.1)  # a trace that baked in the old weight now differs
        conv.gain.mul_(1.5)
        torch.testing.assert_close(traced(x), conv(x))
    exported = torch.export.export(conv, (x,))
    with torch.no_grad():
        conv.gain.mul_(0.5)
    params = dict(conv.named_parameters())
    module = exported.module()
    module.load_state_dict(params, strict=False)
    torch.testing.assert_close(module(x), conv(x))
