"""SkipGain / BranchGain on transformer blocks, and the LayerNorm-free example in examples/."""
import importlib.util
import math
import os

import pytest
import torch
import torch.nn as nn

import normfree

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                       "ln_free_transformer.py")


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("ln_free_transformer", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("post_norm", [False, True])
def test_skip_gain_is_the_identity_at_init_and_x_plus_g_f_after(example, post_norm):
    torch.manual_seed(0)
    block = example.Block(16, 4, post_norm=post_norm)
    x = torch.randn(3, 5, 16)
    wrapped = normfree.SkipGain(block)
    with torch.no_grad():
        assert torch.equal(wrapped(x), x)  # with its LayerNorms even: g = 0 leaves only the skip path
        wrapped.gain.gain.fill_(0.3)
        assert torch.allclose(wrapped(x), x + 0.3 * (block(x) - x), atol=1e-6)
    # converted: LayerNorms gone, each block x + g f(x)
    model = example.Transformer(dim=16, heads=4, depth=3, post_norm=post_norm)
    conv = normfree.convert(model, "skipinit", blocks=list(model.blocks))
    assert not any(isinstance(m, nn.LayerNorm) for m in conv.modules())
    assert all(isinstance(b, normfree.SkipGain) for b in conv.blocks)
    h = torch.randn(3, 12, 16)
    with torch.no_grad():
        assert torch.equal(conv.blocks(h), h)
        b = conv.blocks[0]
        b.gain.gain.fill_(0.5)
        inner = b.module
        f = inner.attn(h)
        expected = h + 0.5 * (f + inner.mlp(h + f))  # x + attn(x), then + mlp(.): both norms are gone
        assert torch.allclose(b(h), expected, atol=1e-5)


def test_skip_gain_refuses_a_block_that_changes_shape():
    with pytest.raises(ValueError, match=r"SkipGain needs a module whose forward is x \+ f\(x\).*returned \(2, 3\)"):
        normfree.SkipGain(nn.Linear(4, 3))(torch.randn(2, 4))


def test_branch_gain_scales_the_first_output_of_attention():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    gained = normfree.BranchGain(mha, init=0.25)
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        out, weights = gained(x, x, x)
        ref_out, ref_weights = mha(x, x, x)
    assert torch.allclose(out, 0.25 * ref_out) and torch.equal(weights, ref_weights)


def test_measure_signal_on_skip_gain_blocks(example):
    torch.manual_seed(0)
    model = example.build("block", depth=3, dim=16)
    stats = normfree.measure_signal(model.blocks, torch.randn(16, 12, 16), channel_dim=-1)
    assert len(stats) == 3 and all(r.res_var > 0 and r.branch_scale == 0.0 and r.ratio == 0.0 for r in stats)
    assert all(r.var == pytest.approx(stats[0].var) for r in stats)  # every block passes its input through


def test_ln_free_transformer_trains(example):
    """The example's LayerNorm-free transformer with a zero-initialized gain per block learns to
    reverse sequences: the loss falls from ~ln(10) to near 0 and held-out accuracy is high."""
    torch.manual_seed(0)
    model = example.build("block", depth=2, dim=32)
    assert not any(isinstance(m, nn.LayerNorm) for m in model.modules())
    losses, acc = example.train(model, steps=120, batch_size=64, lr=3e-3, seed=0)
    assert len(losses) == 120 and all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert first > 2.0 and last < 0.1, (first, last)
    assert acc > 0.95
    assert all(b.gain.gain.item() != 0.0 for b in model.blocks)


def test_example_command_line_rejects_ln_with_block_gain(example, capsys):
    with pytest.raises(SystemExit):
        example.main(["--keep-ln", "--gain", "block"])
    assert "SkipGain needs blocks of the form x + f(x)" in capsys.readouterr().err
