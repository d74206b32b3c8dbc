"""Models from anywhere: a registered normfree name, any importable factory, timm, torchvision.

A *model spec* is one string, the same in Python, on the command line
(``--model``) and in a run's ``config.json``:

==============================  ===================================================
``nf_resnet50``                 a registered normfree model (:func:`normfree.create_model`)
``package.module:factory``      any importable callable returning an ``nn.Module``
                                (a function or a class; ``module:Class.method`` works too)
``timm:NAME``                   ``timm.create_model(NAME, pretrained=False, ...)`` (timm installed)
``torchvision:NAME``            ``torchvision.models.get_model(NAME, weights=None, ...)``
                                (torchvision installed)
==============================  ===================================================

Factories are called with ``num_classes`` and ``in_chans`` where their
signature accepts them (``in_channels`` is taken as the same thing; a factory
with ``**kwargs`` gets both), plus the user's options (``--opt key=value``).
Nothing is ever downloaded: timm and torchvision models are built without
pretrained weights. torchvision's constructors have no ``in_chans``: for
another number of input channels the first 3-channel convolution is rebuilt
(:func:`adapt_input_conv`).

:func:`find_classifier` finds a model's classifier (``get_classifier()``,
then the attributes ``fc``, ``head``, ``classifier``) so that adaptive
gradient clipping can leave it alone, as the NFNet authors do.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import math
import re
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

#: the libraries with a ``LIBRARY:NAME`` spec, and how to install them
LIBRARIES = {"timm": "pip install timm", "torchvision": "pip install torchvision"}

_IDENT = r"[A-Za-z_]\w*"
_IMPORT_SPEC = re.compile(rf"{_IDENT}(?:\.{_IDENT})*:{_IDENT}(?:\.{_IDENT})*")
_LIBRARY_SPEC = re.compile(rf"({'|'.join(LIBRARIES)}):([\w.\-]+)")

Factory = Union[str, Callable[..., nn.Module]]


def is_spec(name: Any) -> bool:
    """True for a factory spec (``package.module:factory``, ``timm:NAME``,
    ``torchvision:NAME``): anything with a colon; registered names have none."""
    return isinstance(name, str) and ":" in name


def check_spec(spec: str, what: str = "model") -> str:
    """``spec`` if it is a well-formed factory spec (nothing is imported); a
    ValueError saying what the forms are otherwise."""
    if not isinstance(spec, str):
        raise TypeError(f"a {what} spec is a string, got {type(spec).__name__}")
    if (what == "model" and _LIBRARY_SPEC.fullmatch(spec)) or _IMPORT_SPEC.fullmatch(spec):
        return spec
    if what != "model":
        raise ValueError(f"{what} {spec!r} is not a valid spec: use package.module:function (an importable "
                         f"callable)")
    raise ValueError(f"model {spec!r} is not a valid spec: use a registered name (see `normfree models`), "
                     f"package.module:factory (an importable callable returning an nn.Module), timm:NAME "
                     f"or torchvision:NAME")


def _import(module: str, spec: str, what: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (module == e.name or module.startswith(e.name + ".")):
            raise ValueError(f"{what} {spec!r}: cannot import {module!r} (no module named {e.name!r}); "
                             f"is it installed, or on PYTHONPATH?") from None
        raise ValueError(f"{what} {spec!r}: importing {module!r} failed: {e}") from None
    except ImportError as e:
        raise ValueError(f"{what} {spec!r}: importing {module!r} failed: {e}") from None


def _library(name: str, spec: str):
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ValueError(f"model {spec!r} needs {name}, which is not importable here ({e}); install it "
                         f"({LIBRARIES[name]}) or give package.module:factory") from None


def resolve(spec: str, what: str = "model") -> Callable[..., Any]:
    """The callable that ``spec`` names (imported now). ValueError naming what
    is missing: the module, the attribute (with close matches), the library.
    ``what`` names the thing in messages ("model", "data")."""
    check_spec(spec, what)
    m = _LIBRARY_SPEC.fullmatch(spec)
    if m and what == "model":
        lib, name = m.groups()
        if lib == "timm":
            return _timm_factory(_library("timm", spec), name, spec)
        return _torchvision_factory(_library("torchvision", spec), name, spec)
    module_name, attr_path = spec.split(":", 1)
    obj = _import(module_name, spec, what)
    where = module_name
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(f"{what} {spec!r}: {where!r} has no attribute {part!r}{hint}")
        obj = getattr(obj, part)
        where = f"{where}.{part}"
    if not callable(obj):
        raise ValueError(f"{what} {spec!r}: {where} is a {type(obj).__name__}, not a callable")
    return obj


def _timm_factory(timm, name: str, spec: str) -> Callable[..., nn.Module]:
    if not (timm.is_model(name) or timm.is_model(name.split(".")[0])):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(repr('timm:' + c) for c in close)}?)" if close else ""
        raise ValueError(f"model {spec!r}: timm has no model {name!r}{hint}")

    def build(num_classes: Optional[int] = None, in_chans: Optional[int] = None, **options) -> nn.Module:
        kw = {k: v for k, v in (("num_classes", num_classes), ("in_chans", in_chans)) if v is not None}
        return timm.create_model(name, pretrained=False, **kw, **options)

    build.__qualname__ = build.__name__ = f"timm.create_model({name!r})"
    return build


def _torchvision_factory(torchvision, name: str, spec: str) -> Callable[..., nn.Module]:
    available = list(torchvision.models.list_models())
    if name not in available:
        close = difflib.get_close_matches(name, available, n=3)
        hint = f" (did you mean {', '.join(repr('torchvision:' + c) for c in close)}?)" if close else ""
        raise ValueError(f"model {spec!r}: torchvision has no model {name!r}{hint}")

    def build(num_classes: Optional[int] = None, in_chans: Optional[int] = None, **options) -> nn.Module:
        kw = {"num_classes": num_classes} if num_classes is not None else {}
        model = torchvision.models.get_model(name, weights=None, **kw, **options)
        if in_chans is not None and in_chans != 3:
            adapt_input_conv(model, in_chans)
        return model

    build.__qualname__ = build.__name__ = f"torchvision.models.get_model({name!r})"
    return build


def adapt_input_conv(model: nn.Module, in_chans: int) -> str:
    """Rebuild the first 3-channel ``nn.Conv2d`` of ``model`` (module order) for
    ``in_chans`` input channels; returns its name.

    Channel c of the new weight is channel ``c mod 3`` of the old one times
    ``sqrt(3 / in_chans)``, so that for inputs with independent unit-variance
    channels the output variance is the original's: ``in_chans * (3 / in_chans)
    * Var(w) = 3 Var(w)`` per output."""
    for name, conv in model.named_modules():
        if isinstance(conv, nn.Conv2d) and conv.in_channels == 3 and conv.groups == 1:
            new = nn.Conv2d(in_chans, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                            dilation=conv.dilation, bias=conv.bias is not None, padding_mode=conv.padding_mode,
                            device=conv.weight.device, dtype=conv.weight.dtype)
            with torch.no_grad():
                idx = torch.arange(in_chans, device=conv.weight.device) % 3
                new.weight.copy_(conv.weight.index_select(1, idx) * math.sqrt(3.0 / in_chans))
                if conv.bias is not None:
                    new.bias.copy_(conv.bias)
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, new)
            return name
    raise ValueError(f"cannot give {type(model).__name__} {in_chans} input channels: it has no convolution "
                     f"taking 3 channels; give a factory that builds it for {in_chans} channels")


def _parameters(fn: Callable) -> Tuple[Optional[Dict[str, inspect.Parameter]], bool]:
    """(named parameters, takes **kwargs); (None, True) when the signature cannot be read."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None, True
    named = {n: p for n, p in sig.parameters.items()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return named, any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())


def factory_name(fn: Callable) -> str:
    """``module:qualname`` of a callable (what a spec for it would be)."""
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', type(fn).__name__)}"


def importable_spec(fn: Callable) -> Optional[str]:
    """The spec under which ``fn`` can be imported again (None for lambdas,
    local functions, objects of ``__main__`` and anything that does not resolve
    back to ``fn`` itself)."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not module or not qualname or module == "__main__" or "<" in qualname:
        return None
    spec = f"{module}:{qualname}"
    try:
        return spec if resolve(spec) is fn else None
    except ValueError:
        return None


def call_factory(fn: Callable[..., nn.Module], *, num_classes: Optional[int] = None,
                 in_chans: Optional[int] = None, options: Optional[Dict[str, Any]] = None,
                 what: Optional[str] = None) -> nn.Module:
    """``fn(**options)`` plus ``num_classes`` / ``in_chans`` where ``fn`` accepts
    them (``in_channels`` counts as ``in_chans``). TypeError naming the option
    ``fn`` does not take, or what it returned instead of an ``nn.Module``."""
    what = what or factory_name(fn)
    options = dict(options or {})
    named, var_kw = _parameters(fn)
    for key in ("num_classes", "in_chans"):
        if key in options:
            raise ValueError(f"{what}: give {key} as the run's {key}, not as a factory option")
    unknown = [k for k in options if named is not None and k not in named and not var_kw]
    if unknown:
        raise TypeError(f"{what} does not take the option(s) {unknown}; it takes {sorted(named)}")
    kw = dict(options)
    for key, aliases, value in (("num_classes", ("num_classes",), num_classes),
                                ("in_chans", ("in_chans", "in_channels"), in_chans)):
        if value is None:
            continue
        name = next((a for a in aliases if named is None or a in named), None)
        if name is None and var_kw:
            name = key
        if name is not None:
            kw[name] = value
    model = fn(**kw)
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what} returned a {type(model).__name__}, not an nn.Module")
    return model


def accepted(fn: Callable, key: str) -> bool:
    """True when ``call_factory`` passes ``key`` ("num_classes" or "in_chans") to ``fn``."""
    named, var_kw = _parameters(fn)
    aliases = ("in_chans", "in_channels") if key == "in_chans" else (key,)
    return named is None or var_kw or any(a in named for a in aliases)


def build_model(spec: Factory, *, num_classes: Optional[int] = None, in_chans: Optional[int] = None,
                convert: Optional[str] = None, options: Optional[Dict[str, Any]] = None,
                depth: Optional[int] = None, width: Optional[float] = None) -> nn.Module:
    """The model of ``spec``: a registered name (``depth``, ``width`` and the
    method ``options`` go to :func:`normfree.create_model`), a factory spec or
    a callable (``options`` are its keyword arguments); then
    ``normfree.convert(model, convert)`` when ``convert`` is given.

    A factory that does not take ``num_classes`` must build a model with
    outputs for the data's classes; one without ``in_chans`` one for its input
    channels (the trainer checks both on one batch).
    """
    if isinstance(spec, str) and not is_spec(spec):
        from .models import create_model

        if convert is not None:
            raise ValueError(f"convert={convert!r} is for foreign models; {spec!r} is a normfree model, "
                             f"choose its method in the name instead (e.g. nf_resnet50)")
        kw = {k: v for k, v in (("num_classes", num_classes), ("in_chans", in_chans)) if v is not None}
        return create_model(spec, depth=depth, width=width, **kw, **(options or {}))
    if depth is not None or width is not None:
        raise ValueError(f"depth and width are for normfree's registered models; pass your factory's own "
                         f"arguments as options (--opt key=value), model {spec!r}")
    fn = resolve(spec) if isinstance(spec, str) else spec
    if not callable(fn):
        raise TypeError(f"a model factory must be a spec string or a callable, got {type(fn).__name__}")
    model = call_factory(fn, num_classes=num_classes, in_chans=in_chans, options=options,
                         what=spec if isinstance(spec, str) else factory_name(fn))
    if convert is not None:
        from .convert import convert as convert_model

        model = convert_model(model, convert)
    return model


def class_name(model: nn.Module) -> str:
    """``module.QualName`` of a model's class."""
    cls = type(model)
    return f"{cls.__module__}.{cls.__qualname__}"


# ---------------------------------------------------------------------------- classifier
_CLASSIFIER_ATTRS = ("fc", "head", "classifier")


def _module_name(model: nn.Module, target: nn.Module) -> Optional[str]:
    for name, m in model.named_modules():
        if m is target:
            return name
    return None


def _last_linear(m: nn.Module) -> Optional[Tuple[str, nn.Module]]:
    found = None
    for name, sub in m.named_modules():
        if isinstance(sub, (nn.Linear, nn.Conv2d)) and sub.weight is not None:
            found = (name, sub)
    return found


def find_classifier(model: nn.Module, name: Optional[str] = None) -> Tuple[Optional[str], Optional[nn.Module]]:
    """(name, module) of ``model``'s final classifier, or (None, None).

    ``name`` (a module name such as ``"head.fc"``) is looked up and must exist.
    Otherwise, in this order: ``model.get_classifier()`` (timm's interface,
    normfree models too), then the first of the attributes ``fc``, ``head``,
    ``classifier`` that is a module with parameters; a container there stands
    for its last ``Linear`` / ``Conv2d`` (the final layer, which the NFNet
    authors exclude from clipping)."""
    if name is not None:
        modules = dict(model.named_modules())
        if name not in modules or name == "":
            layers = [n for n, m in modules.items() if isinstance(m, (nn.Linear, nn.Conv2d))]
            close = difflib.get_close_matches(name, list(modules), n=3)
            hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
            raise ValueError(f"classifier {name!r} is not a module of {type(model).__name__}{hint}; its last "
                             f"layers are {layers[-4:]}")
        return name, modules[name]
    candidates: List[Tuple[Optional[str], Any]] = []
    get = getattr(model, "get_classifier", None)
    if callable(get):
        try:
            candidates.append((None, get()))
        except Exception:  # noqa: BLE001 - a foreign method; fall back to the attributes
            pass
    candidates += [(a, getattr(model, a, None)) for a in _CLASSIFIER_ATTRS]
    for attr, m in candidates:
        if not isinstance(m, nn.Module) or not any(True for _ in m.parameters()):
            continue
        found_name = attr if attr is not None else _module_name(model, m)
        if found_name is None:
            continue
        if next(m.children(), None) is None:
            return found_name, m
        last = _last_linear(m)
        if last is not None:
            return f"{found_name}.{last[0]}", last[1]
    return None, None


# ---------------------------------------------------------------------------- signal propagation of specs
def check_model_names(names: List[str], *, depth: Optional[int] = None, width: Optional[float] = None,
                      convert: Optional[Dict[int, Optional[str]]] = None) -> None:
    """Check every name before any model is built: registered names (and a
    depth / width that would contradict one), factory specs (imported now),
    and ``convert`` methods ({position in names: method}) for foreign models."""
    from .models import parse_model_name

    for i, name in enumerate(names):
        method = (convert or {}).get(i)
        if not is_spec(name):
            _, _, size = parse_model_name(name)
            for key, given in (("depth", depth), ("width", width)):
                if key in size and given is not None and given != size[key]:
                    raise ValueError(f"model {name!r} says {key} {size[key]}, but --{key} {given:g} was also "
                                     f"given: give the {key} once")
            if method is not None:
                raise ValueError(f"--convert is for foreign models; {name!r} is a normfree model: choose its "
                                 f"method in the name (e.g. nf_resnet50)")
            continue
        if depth is not None or width is not None:
            raise ValueError(f"--depth and --width are for normfree's registered models, not {name!r}")
        resolve(name)
        if method is not None:
            from .convert import METHODS

            if method not in METHODS:
                close = difflib.get_close_matches(method, METHODS, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"--convert must be one of {list(METHODS)}, got {method!r}{hint}")


def spec_label(spec: str, convert: Optional[str] = None) -> str:
    """How a (possibly converted) model is named in tables and figures."""
    return f"{spec}+{convert}" if convert else spec


def compare_specs(specs: List[Tuple[str, Optional[str]]], *, batch: Optional[int] = None,
                  resolution: Optional[int] = None, in_chans: int = 3, chunk_size: Optional[int] = None,
                  seed: int = 0, depth: Optional[int] = None, width: Optional[float] = None,
                  grads: bool = False, nf_gain: Optional[float] = 1.0,
                  options: Optional[Dict[str, Any]] = None):
    """Signal propagation of several models at initialization (the engine of
    :func:`normfree.signal.compare_models` and ``normfree spp``): each
    ``(spec, convert)`` is built with weights seeded by ``seed`` (registered
    names with ``depth`` / ``width`` and the method ``options``; foreign models
    with 10 classes and ``in_chans``, converted when ``convert`` is given) and
    measured on N(0, 1) noise drawn from ``seed``.

    Registered NF models (``nf``, ``nf_he``) are built with their SkipInit gain
    at ``nf_gain`` (default 1, as the SPPs of Brock et al. 2021 are drawn; the
    registered init is 0, as for training in DeepMind's nf_resnet.py); their
    label says so: ``"nf_wrn (gain 1)"``. ``nf_gain=None``, or a ``gain_init=``
    option, builds them as registered. Models whose method is initialized on
    data (``lsuv``) are first initialized by :func:`normfree.lsuv_init` on
    another draw of the same noise (seed + 1).

    Defaults: batch 256 at 32x32 for normfree's CIFAR-style models, batch 8 at
    128x128 for ImageNet-style ones and every foreign model (stride 32: at 32x32
    the last stages would be 1x1 and 2x2, where zero padding hides most of a
    3x3 conv). Returns ({label: stats}, {label: predicted variances}); a model
    the prediction does not know gets no prediction. The prediction starts from
    v0 = the measured variance of the first block's input, or 1 for registered
    NF models (the NF design: the stem gives unit variance, ``expected_std = 1``
    in nf_resnet.py; the max-pool of the resnetNN stem leaves channel means that
    its measured variance, ~0.36, does not show but the ReLU pre-activation
    passes on). Each stats carries ``input_shape``, ``nf_gain`` (the gain an NF
    model was drawn with, else None) and, with ``grads=True``, ``grads``: the
    :func:`measure_gradients` of the cross-entropy for random labels."""
    from .signal import measure_gradients, measure_signal, predict_variance

    if not specs:
        raise ValueError("give at least one model name (see `normfree models`)")
    for k, v in (("batch", batch), ("resolution", resolution), ("in_chans", in_chans)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"{k} must be a positive integer, got {v!r}")
    if nf_gain is not None and not (isinstance(nf_gain, (int, float)) and math.isfinite(nf_gain)):
        raise ValueError(f"nf_gain must be a finite number or None, got {nf_gain!r}")
    results, predictions = {}, {}
    for spec, method in specs:
        registered = not is_spec(spec)
        opts = dict(options or {}) if registered else None
        label, gain = spec_label(spec, method), None
        if registered and nf_gain is not None and not {"gain_init", "gain"} & set(opts) and _is_nf(spec):
            gain = opts["gain_init"] = float(nf_gain)
            label = f"{label} (gain {nf_gain:g})"
        torch.manual_seed(seed)
        model = build_model(spec, num_classes=10, in_chans=in_chans, convert=method, options=opts,
                            depth=depth if registered else None, width=width if registered else None)
        small = registered and getattr(getattr(model, "arch", None), "stem", "cifar") == "cifar"
        side = resolution or (32 if small else 128)
        shape = (batch or (256 if small else 8), in_chans, side, side)
        if getattr(getattr(model, "scheme", None), "data_init", None) == "lsuv":
            from .lsuv import lsuv_init  # data-dependent: initialized on another draw of the same noise
            lsuv_init(model, torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1)))
        stats = measure_signal(model, shape, chunk_size=chunk_size, seed=seed)
        stats.input_shape = shape
        stats.nf_gain = gain
        if grads:
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(shape, generator=g)
            with torch.no_grad():
                classes = model.eval()(x[:1]).shape[1]
            model.train()
            y = torch.randint(0, classes, (shape[0],), generator=g)
            stats.grads = measure_gradients(model, x, y, chunk_size=chunk_size)
        label = label if label not in results else f"{label}#{len(results)}"
        results[label] = stats
        nf = getattr(getattr(model, "scheme", None), "nf_alpha", None) is not None
        try:
            predictions[label] = predict_variance(model, v0=1.0 if nf else stats.input_var)
        except ValueError:  # a model the analytic prediction does not cover
            pass
    return results, predictions


def _is_nf(name: str) -> bool:
    from .models import parse_model_name
    from .schemes import SCHEMES

    return SCHEMES[parse_model_name(name)[0]].nf_alpha is not None
