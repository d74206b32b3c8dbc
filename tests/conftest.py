"""Test-wide settings and the shared tiny-model fixtures.

The tests use tiny models, for which one intra-op thread is faster than
several, and which otherwise slow down sharply (spinning threads) when the
machine is shared. NORMFREE_TEST_THREADS overrides.

The ``normfree`` command changes the process's allocator settings
(:mod:`normfree.allocator`); tests that call it in-process keep the C
library's defaults, and ``tests/test_allocator.py`` checks the setting in
fresh processes.

Fixtures (and the plain functions behind them, for module-level helpers):

* ``digits`` (session): the packaged 8x8 digits, loaded once.
* ``tiny_model``: :func:`tiny_model` -- a registered model at a size that keeps a
  test fast (WRN depth 10 width 1, ResNets at width 1/16), built under a seed,
  optionally moved off its initialization (``perturb=0.05``: zero classifiers,
  zero gains and zero last convs would otherwise hide wrong formulas).
* ``perturb``: :func:`perturb_`, the same for any module.

Marks: ``slow`` (distributed runs, benchmarks, depth 1000): ``pytest -m "not slow"``
is the fast loop; ``make test`` and CI run everything.

Hypothesis: the "default" profile (40 examples, no deadline: the CPU is shared);
HYPOTHESIS_PROFILE=mutate (10 examples) is what ``make mutate`` uses.
"""
import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("NORMFREE_TEST_THREADS", "1")))
os.environ["NORMFREE_SYSTEM_MALLOC"] = "1"

try:
    from hypothesis import settings

    settings.register_profile("default", max_examples=40, deadline=None, derandomize=True)
    settings.register_profile("mutate", max_examples=10, deadline=None, derandomize=True)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
except ImportError:  # tests/test_properties.py is skipped then
    pass


def perturb_(module, scale=0.05, seed=None):
    """Add ``scale`` x N(0, 1) noise to every parameter of ``module`` in place (from
    the global RNG, or a generator seeded with ``seed``); returns it."""
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


def tiny_model(name, seed=0, perturb=0.0, **kw):
    """``normfree.create_model(name, **kw)`` under ``torch.manual_seed(seed)``, with small
    defaults (WRN: depth 10, width 1; ResNets: width 1/16), then ``perturb_`` by ``perturb``."""
    import normfree

    torch.manual_seed(seed)
    if name.endswith("_wrn"):
        kw.setdefault("depth", 10)
        kw.setdefault("width", 1)
    else:
        kw.setdefault("width", 0.0625)
    model = normfree.create_model(name, **kw)
    return perturb_(model, perturb) if perturb else model


def blocks_of(model):
    """The normfree residual blocks of ``model``, in order."""
    from normfree.blocks import ResidualBlock

    return [m for m in model.modules() if isinstance(m, ResidualBlock)]


@pytest.fixture(name="tiny_model")
def tiny_model_fixture():
    return tiny_model


@pytest.fixture(name="perturb")
def perturb_fixture():
    return perturb_


@pytest.fixture(scope="session")
def digits():
    from normfree.data import load_dataset

    return load_dataset("digits")
