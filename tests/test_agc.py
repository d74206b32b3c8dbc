"""Adaptive gradient clipping against a direct computation of REFERENCE.md section 5."""
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

import normfree
from normfree.agc import AGC, adaptive_clip_grad_, unitwise_norm


def reference_clip(w: torch.Tensor, g: torch.Tensor, lam: float, eps: float):
    """The formula, one unit at a time, in float64: returns (clipped grad, units clipped)."""
    w, g = w.double(), g.double()
    units_w = [w] if w.dim() <= 1 else list(w)
    units_g = [g] if g.dim() <= 1 else list(g)
    out, n = [], 0
    for wi, gi in zip(units_w, units_g):
        wn, gn = wi.norm().item(), gi.norm().item()
        bound = lam * max(wn, eps)
        if gn > bound:
            gi = gi * bound / max(gn, 1e-6)
            n += 1
        out.append(gi)
    return (out[0] if g.dim() <= 1 else torch.stack(out)), n


def make_params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(6, 3, 3, 3), (5, 7), (5,), ()]
    params = []
    for s in shapes:
        p = nn.Parameter(torch.randn(s, generator=gen))
        p.grad = torch.randn(s, generator=gen) * 0.02
        params.append(p)
    with torch.no_grad():
        params[0][1].zero_()          # a zero filter: the eps floor decides
        params[0].grad[2].mul_(1e-4)  # a tiny gradient: left alone
        params[1].grad[3].mul_(1e-4)
    return params


def test_unitwise_norm_dims():
    conv = torch.randn(4, 3, 3, 3)
    lin = torch.randn(5, 7)
    vec = torch.randn(5)
    assert torch.allclose(unitwise_norm(conv).flatten(), torch.stack([c.norm() for c in conv]))
    assert unitwise_norm(conv).shape == (4, 1, 1, 1)
    assert torch.allclose(unitwise_norm(lin).flatten(), lin.norm(dim=1))   # rows, not columns
    assert unitwise_norm(lin).shape == (5, 1)
    assert torch.allclose(unitwise_norm(vec), vec.norm())
    assert torch.allclose(unitwise_norm(torch.tensor(-3.0)), torch.tensor(3.0))


def official_unitwise_norm(x: np.ndarray) -> np.ndarray:
    """DeepMind nfnets/agc_optax.py's rule, on the official (JAX) layouts:
    squeezed rank <= 1 -> one norm; IO Linear kernels -> axis 0; HWIO conv
    kernels -> axes (0, 1, 2); keepdims where it is per unit."""
    if np.squeeze(x).ndim <= 1:
        return np.sqrt(np.sum(x ** 2))
    if x.ndim in (2, 3):
        return np.sqrt(np.sum(x ** 2, axis=0, keepdims=True))
    return np.sqrt(np.sum(x ** 2, axis=(0, 1, 2), keepdims=True))


def official_clip(w: np.ndarray, g: np.ndarray, lam: float, eps: float) -> np.ndarray:
    max_norm = lam * np.maximum(official_unitwise_norm(w), eps)
    g_norm = official_unitwise_norm(g)
    return np.where(g_norm < max_norm, g, g * (max_norm / np.maximum(g_norm, 1e-6)))


def to_official(t: torch.Tensor) -> np.ndarray:
    """PyTorch layout -> the official one: conv (O, I, H, W) -> HWIO, Linear (O, I) -> IO;
    a Scaled-WS gain (C, 1, 1, 1) is the official (C,) vector."""
    a = t.detach().double().numpy()
    if t.dim() == 4 and any(n != 1 for n in t.shape[1:]):
        return a.transpose(2, 3, 1, 0)
    if t.dim() == 4:
        return a.reshape(-1)
    return a.T if t.dim() == 2 else a


def from_official(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    if like.dim() == 4 and any(n != 1 for n in like.shape[1:]):
        a = a.transpose(3, 2, 0, 1)
    elif like.dim() == 2:
        a = a.T
    return torch.from_numpy(np.ascontiguousarray(a)).reshape(like.shape)


@pytest.mark.parametrize("shape", [(6, 3, 3, 3), (6, 1, 1, 1), (6,), (), (5, 7), (5, 1), (1, 4, 3, 3)])
def test_matches_the_official_agc_on_each_kind_of_parameter(shape):
    """Conv weight, Scaled-WS gain (C,1,1,1) -- one unit, like the official (C,) gain --,
    bias, scalar, Linear weights (also with a single input)."""
    gen = torch.Generator().manual_seed(1)
    w = nn.Parameter(torch.randn(shape, generator=gen).abs() + 0.5)
    g = torch.randn(shape, generator=gen) * 0.05
    w.grad = g.clone()
    want = from_official(official_clip(to_official(w), to_official(g), 0.01, 1e-3), w)
    adaptive_clip_grad_([w], clipping=0.01, eps=1e-3)
    torch.testing.assert_close(w.grad.double(), want, rtol=1e-6, atol=1e-12)
    assert not torch.equal(w.grad, g)  # something was clipped: the comparison is not vacuous
    norm = unitwise_norm(w.detach())
    assert norm.numel() == (1 if all(n == 1 for n in w.shape[1:]) else w.shape[0])


@pytest.mark.parametrize("lam,eps", [(0.01, 1e-3), (0.1, 1e-3), (0.005, 0.5)])
def test_matches_formula(lam, eps):
    params = make_params()
    expected = [reference_clip(p.detach(), p.grad, lam, eps) for p in params]
    skipped = nn.Parameter(torch.randn(3, 3))  # grad None: skipped, no error
    n = adaptive_clip_grad_(params + [skipped], clipping=lam, eps=eps)
    assert skipped.grad is None
    total = 0
    for p, (g_ref, k) in zip(params, expected):
        assert torch.allclose(p.grad.double(), g_ref, rtol=1e-5, atol=1e-9)
        total += k
    assert int(n) == total
    assert 0 < total < sum(1 if p.dim() <= 1 else p.shape[0] for p in params)  # some clipped, some not


def test_unclipped_units_are_untouched_exactly():
    params = make_params()
    before = [p.grad.clone() for p in params]
    adaptive_clip_grad_(params, clipping=0.01)
    assert torch.equal(params[0].grad[2], before[0][2])
    assert torch.equal(params[1].grad[3], before[1][3])
    # a clipped unit ends exactly on the bound lambda * max(||W||, eps)
    bound = 0.01 * max(params[0][0].norm().item(), 1e-3)
    assert params[0].grad[0].norm().item() == pytest.approx(bound, rel=1e-5)
    assert params[0].grad[1].norm().item() == pytest.approx(0.01 * 1e-3, rel=1e-5)  # zero filter -> eps


def _loss(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def small_model(seed=0):
    torch.manual_seed(seed)
    return normfree.create_model("nf_wrn", depth=10, width=1, num_classes=3, in_chans=1)


def test_classifier_excluded_for_normfree_resnet():
    model = small_model()
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    _loss(model, x, y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    opt = AGC(torch.optim.SGD(model.parameters(), lr=0.0), model=model, clipping=1e-4)
    opt.step()
    assert torch.equal(model.fc.weight.grad, grads["fc.weight"])
    changed = [n for n, p in model.named_parameters() if p.grad is not None and not torch.equal(p.grad, grads[n])]
    # the official rule (experiment_nfnets.py): the final layer's weight is not clipped, its bias is
    assert changed and "fc.weight" not in changed and "fc.bias" in changed
    name = next(n for n in changed if n.endswith("weight") and model.get_parameter(n).dim() == 4)
    ref, _ = reference_clip(model.get_parameter(name).detach(), grads[name], 1e-4, 1e-3)
    assert torch.allclose(model.get_parameter(name).grad.double(), ref, rtol=1e-5, atol=1e-10)

    # exclude=() clips the classifier too
    model.zero_grad()
    _loss(model, x, y).backward()
    fc_before = model.fc.weight.grad.clone()
    AGC(torch.optim.SGD(model.parameters(), lr=0.0), model=model, clipping=1e-4, exclude=()).step()
    assert not torch.equal(model.fc.weight.grad, fc_before)


def _two_layers(last: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("body", nn.Linear(4, 8))
    model.add_module(last, nn.Linear(8, 2))
    return model


def _clipped(model: nn.Module, layer: str, **agc) -> bool:
    """Whether AGC (clipping 1e-4) changed ``layer``'s weight gradient."""
    model.zero_grad()
    model(torch.randn(16, 4, generator=torch.Generator().manual_seed(1))).pow(2).sum().backward()
    before = model.get_submodule(layer).weight.grad.clone()
    AGC(torch.optim.SGD(model.parameters(), lr=0.0), model=model, clipping=1e-4, **agc).step()
    return not torch.equal(model.get_submodule(layer).weight.grad, before)


def test_other_models_exclude_the_classifier_the_trainer_finds():
    """A foreign model's classifier (``head``, ``fc``, ``classifier`` or
    ``get_classifier()``) is left alone by default, as the trainer does; a
    model without one is clipped everywhere; ``exclude=`` overrides both."""
    head = _two_layers("head")
    assert not _clipped(head, "head") and _clipped(head, "body")
    assert _clipped(head, "head", exclude=())
    tail = _two_layers("tail")
    assert AGC(torch.optim.SGD(tail.parameters(), lr=0.0), model=tail).excluded == []
    assert _clipped(tail, "tail")
    assert not _clipped(tail, "tail", exclude=["tail"])
    with pytest.raises(ValueError, match="'tail2'"):
        AGC(torch.optim.SGD(tail.parameters(), lr=0.1), model=tail, exclude=["tail2"])


def train(model, opt, sched, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(8, 1, 8, 8, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()
        sched.step()


def test_scheduler_and_checkpoint_resume_exactly():
    def fresh():
        model = small_model()
        inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
        opt = AGC(inner, model=model)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        return model, inner, opt, sched

    model, inner, opt, sched = fresh()
    assert opt.param_groups is inner.param_groups
    train(model, opt, sched, 3, seed=1)
    assert inner.param_groups[0]["lr"] == pytest.approx(0.05)   # the scheduler drove the wrapped optimizer
    ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})
    assert ckpt["opt"].keys() == inner.state_dict().keys()
    assert len(ckpt["opt"]["state"]) > 0                             # momentum buffers are in it
    train(model, opt, sched, 3, seed=2)

    model2, inner2, opt2, sched2 = fresh()
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    assert opt2.state is inner2.state and len(opt2.state) > 0
    train(model2, opt2, sched2, 3, seed=2)
    for (n, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), n


def test_step_is_clip_then_inner_step():
    model_a, model_b = small_model(), small_model()
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    for m in (model_a, model_b):
        _loss(m, x, y).backward()
    AGC(torch.optim.SGD(model_a.parameters(), lr=0.5), model=model_a).step()
    params_b = [p for n, p in model_b.named_parameters() if n != "fc.weight"]
    adaptive_clip_grad_(params_b, 0.01, 1e-3)
    torch.optim.SGD(model_b.parameters(), lr=0.5).step()
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)


def test_grad_scaler_clips_unscaled_gradients():
    model_a, model_b = small_model(), small_model()
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    opt_a = AGC(torch.optim.SGD(model_a.parameters(), lr=0.5), model=model_a)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    scaler.scale(_loss(model_a, x, y)).backward()
    scaler.step(opt_a)
    scaler.update()
    opt_b = AGC(torch.optim.SGD(model_b.parameters(), lr=0.5), model=model_b)
    _loss(model_b, x, y).backward()
    opt_b.step()
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bad_arguments():
    p = nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="clipping"):
        adaptive_clip_grad_([p], clipping=0.0)
    with pytest.raises(ValueError, match="eps"):
        adaptive_clip_grad_([p], eps=-1.0)
    with pytest.raises(TypeError, match="Optimizer"):
        AGC([p])
    with pytest.raises(ValueError, match="model="):
        AGC(torch.optim.SGD([p], lr=0.1), exclude=["fc"])
