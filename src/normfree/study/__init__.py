"""The study: the experiments behind the papers' claims, run with one command
(``normfree study``), written up as ``report.md``, a self-contained
``report.html`` and ``claims.json``.

Layout (adding an experiment is adding one module to ``experiments/``):

* ``experiments/<name>.py`` -- one experiment each: its size knobs, the runs
  it needs (``plan``), how it judges and draws them (``report``):
  ``spp`` (signal propagation at >= 1,000 layers), ``depth`` (trainability
  against depth; the 1,000-layer claim), ``batch`` (BN against SkipInit over
  batch sizes and learning rates), ``budget`` (BN, SkipInit, regularized
  SkipInit, Fixup, NF at an equal budget), ``paths`` (residual/skip ratios
  and the lesion test), ``agc`` (adaptive gradient clipping).
* ``experiment.py`` -- what an experiment is and what it is handed.
* ``sizes.py`` -- presets and the validation of every size.
* ``verdicts.py`` -- the three verdicts, seed agreement, the paired bootstrap.
* ``runner.py`` -- runs, the worker processes that execute them.
* ``store.py`` -- finished runs on disk, checked before reuse.
* ``report.py`` -- the report files.
* ``main.py`` -- :func:`run_study`.

Every verdict is computed from the runs by the rule printed next to it.
"""
from .experiment import Context, DataInfo, Experiment, Section
from .main import EXPERIMENTS, KNOBS, QUICK_WARNING, resolve_preset, run_study, study_size
from .runner import RunSpec, Runner, execute
from .sizes import PRESET_NAMES, PRESET_TEXT, StudySize, knob_table
from .sizes import parse_size_overrides as _parse
from .store import RunStore
from .verdicts import FAILS, HOLDS, UNSURE, VERDICTS, Claim, paired_bootstrap


def parse_size_overrides(items):
    """``["depths=10,34", "depth_steps=300"]`` -> ``{"depths": (10, 34), "depth_steps": 300}``,
    typed and validated (NaN, Inf, bounds, list lengths); a clear error naming the bad key or value."""
    return _parse(items, KNOBS)


__all__ = ["run_study", "study_size", "parse_size_overrides", "EXPERIMENTS", "KNOBS", "PRESET_NAMES", "PRESET_TEXT",
           "HOLDS", "FAILS", "UNSURE", "VERDICTS", "Claim", "RunSpec", "RunStore", "Runner", "execute",
           "Experiment", "Context", "DataInfo", "Section", "StudySize", "paired_bootstrap", "knob_table",
           "QUICK_WARNING", "resolve_preset"]
