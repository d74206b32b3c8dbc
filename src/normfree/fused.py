"""Fused CPU kernel for Scaled Weight Standardization (``_ws_kernel.c``).

Standardizing a weight in torch ops takes four to six memory-bound passes over
it in each direction (mean, centre, norm, scale; two sums and two
multiply-adds back). The C kernel reads each output channel's row once and
does the other passes in cache: forward one read and one write, backward two
reads and one write; on ResNet-50 (23.5M weights) that is about half the time
(``benchmarks/bench_methods.py`` prints both). It is built at install time by
``setup.py`` when a C compiler is there, loaded with ctypes, and used for
float32 CPU tensors outside tracing and compilation; everything else, or a
missing kernel, takes the torch path, whose results agree to float rounding
(tested). ``with normfree.fused.disabled():`` forces the torch path.
"""
from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import importlib.util
from typing import Iterator, Optional, Tuple

import torch

_ENABLED = contextvars.ContextVar("normfree_fused_ws", default=True)


@functools.lru_cache(maxsize=None)
def _library() -> Optional[ctypes.CDLL]:
    spec = importlib.util.find_spec("normfree._ws_kernel")
    if spec is None or not spec.origin:
        return None
    try:
        lib = ctypes.CDLL(spec.origin)
    except OSError:
        return None
    ptr, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    lib.ws_forward.argtypes = [ptr, ptr, i64, i64, f32, ptr, ptr, ptr, ptr]
    lib.ws_backward.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, ptr, ptr]
    lib.ws_forward.restype = lib.ws_backward.restype = None
    return lib


def available() -> bool:
    """Whether the compiled kernel was built and loads."""
    return _library() is not None


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Use the torch implementation inside this block (for comparisons)."""
    token = _ENABLED.set(False)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def _wrapped(t: torch.Tensor) -> bool:
    """A torch.func (vmap, grad) wrapper: it has no data of its own."""
    check = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(check is not None and check(t))


def usable(*tensors: torch.Tensor) -> bool:
    """True when the kernel may run on these tensors: enabled and built, all
    plain contiguous float32 CPU tensors, and nothing is tracing or compiling
    (a traced graph must see torch ops, and fake tensors have no data)."""
    if not _ENABLED.get() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    if not all(type(t) in (torch.Tensor, torch.nn.Parameter) and not _wrapped(t) for t in tensors):
        return False
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors):
        return False
    return available()


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def ws_forward(w: torch.Tensor, m: torch.Tensor, eps: float
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For ``w`` (rows, n) and a per-row multiplier ``m`` (rows numbers): the
    standardized weight (w - mu) r m, mu, r = 1/sqrt(max(q, eps)), q = sum((w - mu)^2);
    the last three shaped (rows, 1). Call only when :func:`usable`."""
    rows, n = w.shape
    m = m.reshape(-1).expand(rows).contiguous()
    out = torch.empty_like(w)
    mu, r, q = (w.new_empty(rows, 1) for _ in range(3))
    _library().ws_forward(w.data_ptr(), m.data_ptr(), rows, n, eps, out.data_ptr(),
                          mu.data_ptr(), r.data_ptr(), q.data_ptr())
    return out, mu, r, q


def ws_backward(g: torch.Tensor, w: torch.Tensor, mu: torch.Tensor, r: torch.Tensor,
                m: torch.Tensor, free: torch.Tensor, need_weight_grad: bool
                ) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
    """Gradients of :func:`ws_forward` for ``g`` = dL/d(out): (dL/dw or None,
    d = dL/dm shaped (rows, 1)); ``free`` is 1 where q >= eps, else 0. Call only
    when :func:`usable`."""
    rows, n = w.shape
    m = m.reshape(-1).expand(rows).contiguous()
    free = free.reshape(rows).to(torch.float32).contiguous()
    grad_w = torch.empty_like(w) if need_weight_grad else None
    d = w.new_empty(rows, 1)
    _library().ws_backward(g.data_ptr(), w.data_ptr(), mu.data_ptr(), r.data_ptr(), m.data_ptr(),
                           free.data_ptr(), rows, n, _ptr(grad_w), d.data_ptr())
    return grad_w, d
