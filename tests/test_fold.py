"""Every performance shortcut is exact: the fused Scaled-WS backward, scalar
folding, the no-grad weight cache and fold_model / torch.export."""
import copy
import io
import os
import pickle

import pytest
import torch
import torch.nn.functional as F

import normfree
from normfree.blocks import unfolded
from normfree.fold import fold_model
from normfree.layers import Conv2d, ScaledStdConv2d, _ScaledStdWeight

FOLDABLE = ["nf", "nf_he", "skipinit", "fixup", "rescale", "none"]


def reference_ws(w, gain, eps=1e-4):
    """The definition, written with plain autograd ops."""
    n = w[0].numel()
    mean = w.mean(dim=(1, 2, 3), keepdim=True)
    var = ((w - mean) ** 2).mean(dim=(1, 2, 3), keepdim=True)
    return gain * (w - mean) / torch.sqrt(torch.clamp(n * var, min=eps))


def perturbed(name, **kw):
    """A small model whose zero-initialized gains / layers are made non-zero."""
    torch.manual_seed(0)
    model = normfree.create_model(name, depth=10, width=1, **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def reference_fold(w, gain, scale, bias, in_const, out_const):
    """reference_ws with the folded scales and the scaled bias, in plain autograd ops."""
    m = gain * in_const * out_const
    if scale is not None:
        m = m * (scale.reshape(-1, 1, 1, 1) if scale.dim() else scale)
    b = None
    if bias is not None:
        b = bias * out_const * (1.0 if scale is None else scale.reshape(-1))
    return reference_ws(w, m), b


@pytest.mark.parametrize("scale_kind", [None, "scalar", "per_channel"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_ws_fold_matches_autograd_reference_and_gradcheck(scale_kind, with_bias):
    torch.manual_seed(0)
    f64 = dict(dtype=torch.float64)
    w = torch.randn(6, 3, 3, 3, **f64)
    w[1] = 0.3  # constant filter: the eps guard is active
    w[2] *= 1e-4  # tiny filter: guard active, gradient differs from the unguarded one
    w.requires_grad_(True)
    gain = torch.rand(6, 1, 1, 1, **f64, requires_grad=True)
    scale = {None: None, "scalar": torch.tensor(0.7, **f64),
             "per_channel": torch.rand(6, **f64)}[scale_kind]
    if scale is not None:
        scale.requires_grad_(True)
    bias = torch.randn(6, **f64, requires_grad=True) if with_bias else None
    inputs = [t for t in (w, gain, scale, bias) if t is not None]

    def unpack(ts):
        it = iter(ts)
        return next(it), next(it), next(it) if scale is not None else None, next(it) if bias is not None else None

    def fused(*ts):
        return tuple(o for o in _ScaledStdWeight.apply(*unpack(ts), 1.3, 0.2, 1e-4) if o is not None)

    def ref(*ts):
        return tuple(o for o in reference_fold(*unpack(ts), 1.3, 0.2) if o is not None)

    got, want = fused(*inputs), ref(*inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    gs = [torch.randn_like(o) for o in got]
    for a, b in zip(torch.autograd.grad(got, inputs, gs), torch.autograd.grad(want, inputs, gs)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(fused, inputs)


def test_fused_ws_keeps_channels_last_and_matches_contiguous():
    torch.manual_seed(0)
    conv = ScaledStdConv2d(4, 6, 3, padding=1)
    conv_cl = copy.deepcopy(conv).to(memory_format=torch.channels_last)
    x = torch.randn(2, 4, 5, 5)
    outs, grads = [], []
    for c, xi in ((conv, x), (conv_cl, x.to(memory_format=torch.channels_last))):
        w_hat, _ = c.folded_weight_bias(out_scale=0.5)
        assert w_hat.is_contiguous(memory_format=torch.channels_last) == (c is conv_cl)
        out = c(xi, out_scale=0.5)
        out.square().sum().backward()
        outs.append(out)
        grads.append((c.weight.grad.contiguous(), c.gain.grad, c.bias.grad))
    torch.testing.assert_close(outs[0], outs[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_scaled_std_conv_training_grads_equal_reference():
    torch.manual_seed(0)
    conv = ScaledStdConv2d(4, 5, 3, padding=1)
    with torch.no_grad():
        conv.gain.uniform_(0.5, 2.0)
        conv.bias.normal_()
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    s = torch.tensor(0.7, requires_grad=True)  # a learnable folded scale (SkipInit gain)
    out = conv(x, in_scale=1.3, out_scale=s)
    ref = s * F.conv2d(1.3 * x, reference_ws(conv.weight, conv.gain), conv.bias, padding=1)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    params = (x, s, conv.weight, conv.gain, conv.bias)
    for a, b in zip(torch.autograd.grad((out * g).sum(), params), torch.autograd.grad((ref * g).sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def perturbed_resnet(name, **kw):
    torch.manual_seed(0)
    model = normfree.create_model(name, width=0.0625, **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


CASES = [f"{n}_wrn" for n in FOLDABLE] + ["fixup_resnet50", "nf_resnet50"]


def make_case(name):
    return perturbed(name) if name.endswith("_wrn") else perturbed_resnet(name)


@pytest.mark.parametrize("name", CASES)
def test_reference_path_is_the_formula(name):
    """With fold_scalars off a block computes, step by step, its docstring's
    y = s_skip * skip(x, h) + s_branch * f(h) [+ b], h = preact(x), f = branch(h)."""
    model = make_case(name).eval()
    x = torch.randn(2, 3, 16, 16)
    h_in = model.stem(x)
    with torch.no_grad(), unfolded(model):
        for block in model.blocks:
            h = block.preact(h_in)
            want = block.branch(h)
            s = block.branch_scale()
            want = want * s if s is not None else want
            if block.branch_bias() is not None:
                want = want + block.branch_bias()
            skip = block.skip(h_in, h)
            want = want + (skip if block.skip_scale is None else block.skip_scale * skip)
            got = block(h_in)
            assert torch.equal(got, want)
            h_in = got


@pytest.mark.parametrize("name", CASES)
def test_folded_scalars_give_same_outputs_and_gradients(name):
    model = make_case(name)
    x = torch.randn(3, 3, 8, 8) if name.endswith("_wrn") else torch.randn(3, 3, 32, 32)
    y = torch.tensor([1, 2, 3])

    def run():
        model.zero_grad()
        out = model(x)
        F.cross_entropy(out, y).backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    out_f, grads_f = run()
    with unfolded(model):
        out_u, grads_u = run()
    torch.testing.assert_close(out_f, out_u, rtol=1e-5, atol=1e-6)
    assert grads_f.keys() == grads_u.keys()
    for n in grads_f:
        torch.testing.assert_close(grads_f[n], grads_u[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", ["fixup_wrn", "fixup_resnet50"])
def test_fixup_bias_folding_switch_gives_same_outputs_and_gradients(name):
    """fold_biases (Fixup's biases in the convs) against its other branch (the
    ScalarBias modules applied), scalars folded in both."""
    model = make_case(name)
    x = torch.randn(3, 3, 16, 16)
    y = torch.tensor([1, 2, 3])

    def run(fold_biases):
        for b in model.blocks:
            b.fold_biases = fold_biases
        model.zero_grad()
        out = model(x)
        F.cross_entropy(out, y).backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    out_f, grads_f = run(True)
    out_u, grads_u = run(False)
    torch.testing.assert_close(out_f, out_u, rtol=1e-5, atol=1e-6)
    for n in grads_f:
        torch.testing.assert_close(grads_f[n], grads_u[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", ["nf_wrn", "skipinit_wrn", "fixup_resnet50"])
def test_weight_cache_switch_gives_the_same_bits(name):
    """Conv2d.cache_weights against its other branch (the folded weight computed on every call)."""
    model = cache_on(make_case(name)).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        cached = model(x)
        assert any("_fold_cache" in m.__dict__ for m in model.modules())
        for m in model.modules():
            if isinstance(m, Conv2d):
                m.clear_cache()
                m.cache_weights = False
        plain = model(x)
        assert not any("_fold_cache" in m.__dict__ for m in model.modules())
    assert torch.equal(cached, plain)


@pytest.mark.parametrize("arch", ["wrn", "resnet50"])
def test_folded_fixup_runs_only_the_unfoldable_scalar_biases(arch):
    """Folded, a Fixup block adds only the bias on its input (shared with the
    skip path) as a separate op; the others ride in conv biases or conv(ones)."""
    from normfree.layers import ScalarBias
    kw = dict(depth=10, width=1) if arch == "wrn" else dict(width=0.125, num_classes=10)
    model = normfree.create_model(f"fixup_{arch}", **kw)
    calls = []
    blocks = [m for m in model.modules() if isinstance(m, normfree.ResidualBlock)]
    for m in (m for b in blocks for m in b.modules()):
        if isinstance(m, ScalarBias):
            m.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(2, 3, 16, 16)
    model(x)
    assert len(calls) == len(blocks)
    calls.clear()
    with unfolded(model):
        model(x)
    per_block = 1 + 2 * len(blocks[0].mids) + 1 + 1  # pre: 2, mids: 2 each, out bias: 1
    assert len(calls) == per_block * len(blocks)


def _eval_out(model, x, grad: bool):
    with torch.set_grad_enabled(grad):
        return model(x).detach()


def cache_on(model):
    """Every conv's weight cache on (plain convs have it off by default)."""
    for m in model.modules():
        if isinstance(m, Conv2d):
            m.cache_weights = True
    return model


def test_weight_cache_is_on_only_for_standardized_convs_by_default():
    nf, si = perturbed("nf_wrn").eval(), perturbed("skipinit_wrn").eval()
    with torch.no_grad():
        nf(torch.randn(2, 3, 8, 8)), si(torch.randn(2, 3, 8, 8))
    ws = [m for m in nf.modules() if isinstance(m, ScaledStdConv2d)]
    assert ws and all("_fold_cache" in m.__dict__ for m in ws)
    assert not any("_fold_cache" in m.__dict__ for m in si.modules())


@pytest.mark.parametrize("name", ["nf_wrn", "skipinit_wrn"])
def test_no_grad_cache_is_invalidated_by_optimizer_step_and_load_state_dict(name):
    model = cache_on(perturbed(name)).eval()
    x = torch.randn(2, 3, 8, 8)
    convs = [m for m in model.modules() if isinstance(m, Conv2d)]
    with torch.no_grad():
        first = model(x)
    assert all("_fold_cache" in c.__dict__ for c in convs)
    for c in convs:
        (w, b), = [entry[-1] for entry in c.__dict__["_fold_cache"].values()]
        assert w.grad_fn is None and (w is c.weight or not w.requires_grad)  # no autograd graph held
    torch.testing.assert_close(first, _eval_out(model, x, grad=True), rtol=0, atol=0)

    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    F.cross_entropy(model(x), torch.tensor([0, 1])).backward()
    opt.step()
    model.eval()
    after = _eval_out(model, x, grad=False)
    assert not torch.allclose(after, first)  # a stale cache would give `first`
    torch.testing.assert_close(after, _eval_out(model, x, grad=True), rtol=0, atol=0)

    other = perturbed(name)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    model.load_state_dict(other.state_dict())
    torch.testing.assert_close(_eval_out(model, x, grad=False), _eval_out(other.eval(), x, grad=True),
                               rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.trace: still what many users call
@pytest.mark.parametrize("grad", [False, True])
def test_traced_graph_computes_the_weight_instead_of_baking_in_the_cache(grad):
    """A trace taken after the no-grad cache was filled must still record the
    standardization: updated weights change the traced model's output."""
    torch.manual_seed(0)
    conv = ScaledStdConv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        conv(x)  # fills the cache
    with torch.set_grad_enabled(grad):
        traced = torch.jit.trace(conv, x, check_trace=False)
    with torch.no_grad():
        conv.weight.mul_(2.0).add_(0.1)
        conv.gain.mul_(1.5)
        torch.testing.assert_close(traced(x), conv(x))


def test_cache_with_parameters_created_in_inference_mode():
    with torch.inference_mode():  # inference tensors have no version counter: never cached
        conv = ScaledStdConv2d(3, 4, 3, padding=1)
        x = torch.randn(1, 3, 5, 5)
        a = conv(x)
        conv.weight.mul_(2.0)
        conv.gain.mul_(3.0)
        torch.testing.assert_close(conv(x), 3.0 * a)


def test_cache_not_in_state_dict_and_survives_deepcopy_pickle_and_dtype_change():
    model = perturbed("nf_wrn").eval()
    x = torch.randn(2, 3, 8, 8)
    keys = list(model.state_dict())
    with torch.no_grad():
        ref = model(x)
    assert list(model.state_dict()) == keys
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert not any("_fold_cache" in m.__dict__ for m in clone.modules())
        with torch.no_grad():
            torch.testing.assert_close(clone(x), ref, rtol=0, atol=0)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    model.double()  # new storages and dtype: the cache must not serve the float32 weights
    with torch.no_grad():
        out = model(x.double())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.float(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["nf", "nf_he", "skipinit", "fixup", "rescale"])
def test_fold_model_is_plain_convs_with_same_outputs_and_input_grads(name):
    model = perturbed(f"{name}_wrn", drop_path=0.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_model(model)
    convs = [m for m in folded.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(type(c) is Conv2d for c in convs)  # plain convolutions
    for block in folded.blocks:
        assert block.in_scale is None and block.mid_scale is None and block.branch_scale() is None
        assert block.out_bias is None
    assert getattr(folded, "head_scale", None) is None
    for mode in ("train", "eval"):
        model.train(mode == "train")
        folded.train(mode == "train")
        x = torch.randn(3, 3, 8, 8, requires_grad=True)
        a, b = model(x), folded(x)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        g = torch.randn_like(a)
        ga, = torch.autograd.grad((a * g).sum(), x)
        gb, = torch.autograd.grad((b * g).sum(), x)
        torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-6)
    for k, v in model.state_dict().items():  # the original is untouched
        assert torch.equal(v, before[k]), k


def test_fold_model_refuses_models_with_normalization():
    with pytest.raises(ValueError, match=r"BatchNorm2d.*nothing to fold"):
        fold_model(normfree.create_model("bn_wrn", depth=10, width=1))
    with pytest.raises(TypeError, match="nn.Module"):
        fold_model("nf_wrn")


def test_torch_export_of_nf_model_and_its_folded_copy():
    model = perturbed("nf_wrn").eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
    for m in (model, fold_model(model)):
        exported = torch.export.export(m, (x,))
        with torch.no_grad():
            torch.testing.assert_close(exported.module()(x), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stride,padding,kernel", [(1, 1, 3), (2, 1, 3), (2, 0, 1), (1, 3, 7)])
def test_conv_in_bias_equals_conv_of_biased_input(stride, padding, kernel):
    torch.manual_seed(0)
    conv = Conv2d(3, 4, kernel, stride=stride, padding=padding, bias=True)
    x = torch.randn(2, 3, 9, 9, requires_grad=True)
    c = torch.tensor(0.3, requires_grad=True)
    s = torch.tensor(1.7, requires_grad=True)
    out = conv(x, in_scale=0.5, out_scale=s, in_bias=c)
    ref = s * conv(0.5 * (x + c))
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    leaves = (x, c, s, conv.weight, conv.bias)
    for a, b in zip(torch.autograd.grad((out * g).sum(), leaves), torch.autograd.grad((ref * g).sum(), leaves)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_pool_pad_shortcut_slice_equals_average_pool():
    from normfree.blocks import PoolPadShortcut
    x = torch.randn(2, 3, 7, 7, requires_grad=True)
    sc = PoolPadShortcut(3, 5, 2)
    ref = F.pad(F.avg_pool2d(x, 1, stride=2), (0, 0, 0, 0, 0, 2))
    out = sc(x)
    assert torch.equal(out, ref)
    g = torch.randn_like(out)
    assert torch.equal(torch.autograd.grad((out * g).sum(), x)[0], torch.autograd.grad((ref * g).sum(), x)[0])


def test_bn_free_methods_save_less_for_backward_than_bn():
    """Memory: bytes of the tensors autograd keeps for backward (what the benchmark reports on CPU)."""
    def saved_bytes(name):
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        torch.manual_seed(0)
        model = normfree.create_model(name, depth=10, width=1)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(torch.randn(16, 3, 32, 32)).sum()
        return sum(seen.values())

    bn = saved_bytes("bn_wrn")
    for name in ("none", "skipinit", "fixup", "nf", "nf_he", "rescale"):
        assert saved_bytes(f"{name}_wrn") < 0.8 * bn, name


def test_cache_keeps_the_folded_and_the_reference_weights_of_a_block():
    """measure_signal runs the reference path, a forward the folded one: alternating
    them under no_grad reuses both cached weights instead of re-standardizing."""
    model = perturbed("nf_wrn").eval()
    x = torch.randn(2, 3, 8, 8)
    conv = model.blocks[1].convs[0]
    with torch.no_grad():
        folded = model(x)
        with unfolded(model):
            ref = model(x)
        entries = list(conv.__dict__["_fold_cache"].values())
        assert len(entries) == 2
        calls = []
        conv.folded_weight_bias = lambda *a, **k: calls.append(1)  # a rebuild would call this
        assert torch.equal(model(x), folded)
        with unfolded(model):
            assert torch.equal(model(x), ref)
        assert not calls
    torch.testing.assert_close(ref, folded, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_switch_benchmark_runs_every_switch_both_ways(capsys):
    """benchmarks/bench_switches.py (smoke run): one row per switch and method."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).parent.parent / "benchmarks" / "bench_switches.py"
    spec = importlib.util.spec_from_file_location("bench_switches", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--arch", "quick", "--reps", "1", "--memory", "--only", "fold_biases,cache_weights"]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [r[:3] for r in rows] == [["fold_biases", "fixup", "train"], ["cache_weights", "nf", "eval"],
                                     ["cache_weights", "skipinit", "eval"]]
    assert all(float(r[3]) > 0 and float(r[4]) > 0 for r in rows)
    assert "saved for backward" in " ".join(rows[0])


def test_switch_benchmark_times_inplace_activations_with_step_peaks(capsys):
    """bench_switches.py --only inplace_acts --methods nf: its row, with saved bytes and
    the step's peak memory, switch on and off (fresh processes)."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).parent.parent / "benchmarks" / "bench_switches.py"
    spec = importlib.util.spec_from_file_location("bench_switches", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--arch", "quick", "--reps", "1", "--memory", "--only", "inplace_acts",
                           "--methods", "nf"]) == 0
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.splitlines()[2:]
    assert [line.split()[:3] for line in lines] == [["inplace_acts", "nf", "train"]]
    if os.path.exists("/proc/self/clear_refs"):
        assert all("step peak" in line for line in lines)


ALL_METHODS = sorted(normfree.SCHEMES)


class _CountInplaceActivations(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the in-place activation kernels that run (relu_, ...)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.relu_.default, torch.ops.aten.tanh_.default, torch.ops.aten.sigmoid_.default):
            self.calls += 1
        return func(*args, **(kwargs or {}))


def _set_blocks(model, **switches):
    for b in model.modules():
        if isinstance(b, normfree.ResidualBlock):
            for k, v in switches.items():
                setattr(b, k, v)


INPLACE_CASES = ([(f"{m}_wrn", True) for m in ALL_METHODS] + [(n, True) for n in ("nf_resnet50", "bn_resnet50")]
                 + [(n, fb) for n in ("fixup_wrn", "fixup_resnet50") for fb in (True, False)][1:])


@pytest.mark.parametrize("name, fold_biases", INPLACE_CASES)
def test_inplace_activations_give_the_same_bits_outputs_and_gradients(name, fold_biases):
    """ResidualBlock.inplace_acts against its other branch (every activation out of
    place): the same kernels on the same values, so bit-identical outputs and
    gradients; and the switch does run activations in place."""
    model = make_case(name)
    x = torch.randn(3, 3, 16, 16) if name.endswith("_wrn") else torch.randn(3, 3, 32, 32)
    y = torch.tensor([1, 2, 3])

    def run(inplace):
        _set_blocks(model, inplace_acts=inplace, fold_biases=fold_biases)
        model.zero_grad()
        with _CountInplaceActivations() as counter:
            out = model(x)
            F.cross_entropy(out, y).backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, counter.calls

    out_i, grads_i, calls_i = run(True)
    out_o, grads_o, calls_o = run(False)
    from normfree.layers import INPLACE_ACTIVATIONS, Activation
    exact = [m for b in model.modules() if isinstance(b, normfree.ResidualBlock) for unit in b.mids for m in unit
             if isinstance(m, Activation) and m.name in INPLACE_ACTIVATIONS and m.name != "identity"]
    assert calls_o == 0 and calls_i >= len(exact)  # every mid activation with an exact in-place form, at least
    assert torch.equal(out_i, out_o)
    for n in grads_i:
        assert torch.equal(grads_i[n], grads_o[n]), n


@pytest.mark.parametrize("name", [f"{m}_wrn" for m in ALL_METHODS] + ["nf_resnet50", "fixup_resnet50"])
def test_inplace_activations_never_overwrite_a_block_input(name):
    """The silent bug an in-place activation can cause: the block input x is also
    the skip path (and what the caller, forward_intermediates or a hook holds).
    Every block's input, and the model's, must come out of the forward unchanged."""
    model = make_case(name).train()
    _set_blocks(model, inplace_acts=True)
    seen = []

    def keep(_m, inp):
        seen.append((inp[0], inp[0].detach().clone()))

    handles = [b.register_forward_pre_hook(keep) for b in model.modules() if isinstance(b, normfree.ResidualBlock)]
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    x0 = x.detach().clone()
    model(x).sum().backward()
    for h in handles:
        h.remove()
    assert seen and all(torch.equal(t, copy_) for t, copy_ in seen)
    assert torch.equal(x.detach(), x0)


@pytest.mark.parametrize("act", sorted(normfree.ACTIVATIONS))
def test_activation_inplace_form_is_exact_or_not_taken(act):
    """Activation(name)(t, inplace=True): overwrites t only for the activations whose
    backward reads their output (then same bits and same input gradient as out of
    place); GELU, SiLU and ELU (whose in-place backward rounds differently) leave t as it was."""
    from normfree.layers import INPLACE_ACTIVATIONS, Activation
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, 5, dtype=torch.float64)
    ref = Activation(act)(x * 1.0)
    (gx_ref,) = torch.autograd.grad(ref, x, g)
    t = x * 1.0  # a tensor of our own, as a conv output in the block
    before = t.detach().clone()
    out = Activation(act)(t, inplace=True)
    (gx,) = torch.autograd.grad(out, x, g)
    assert torch.equal(out, ref) and torch.equal(gx, gx_ref)
    overwritten = act in INPLACE_ACTIVATIONS and act != "identity"
    assert (out.data_ptr() == t.data_ptr()) == (overwritten or act == "identity")
    assert torch.equal(t.detach(), ref.detach() if overwritten else before)


# --------------------------------------------------------------------------
# issue 17's layouts: a skip scale with a branch constant (balduzzi), b^l
# (hanin), beta on a BN branch (szegedy), weight-normalized convs (wn, cwn,
# arpit), SELU, LSUV's plain block
# --------------------------------------------------------------------------
NEW_BN_FREE = ["balduzzi", "hanin", "arpit", "wn", "cwn", "selu", "lsuv"]
NEW_CASES = [f"{n}_wrn" for n in NEW_BN_FREE] + ["szegedy_wrn", "balduzzi_resnet50", "arpit_resnet50"]


@pytest.mark.parametrize("name", NEW_CASES)
def test_new_layouts_reference_path_is_the_formula(name):
    test_reference_path_is_the_formula(name)


@pytest.mark.parametrize("name", NEW_CASES)
def test_new_layouts_folded_scalars_give_same_outputs_and_gradients(name):
    test_folded_scalars_give_same_outputs_and_gradients(name)


@pytest.mark.parametrize("name", NEW_BN_FREE)
def test_new_layouts_fold_to_plain_convs(name):
    test_fold_model_is_plain_convs_with_same_outputs_and_input_grads(name)


@pytest.mark.parametrize("name", ["wn_wrn", "cwn_wrn"])
def test_weight_cache_gives_the_same_bits_for_weight_normalized_convs(name):
    test_weight_cache_switch_gives_the_same_bits(name)


def test_torch_export_of_a_weight_normalized_model_and_its_folded_copy():
    model = perturbed("cwn_wrn").eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
    for m in (model, fold_model(model)):
        exported = torch.export.export(m, (x,))
        with torch.no_grad():
            torch.testing.assert_close(exported.module()(x), ref, rtol=1e-5, atol=1e-6)
