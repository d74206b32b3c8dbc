"""Mutation testing of the modules where a wrong line changes results (``make mutate``).

Runs mutmut 3 once per module, each in its own copy of the working tree under
``runs/mutate/<module>`` (so the runs are independent and resumable: mutmut
keeps its results in that copy's ``mutants/`` and re-tests only what changed),
with a narrow test selection per module so that one mutant takes seconds, and
prints the score per module:

    killed / (killed + survived + timeout + no tests + suspicious)

The -k expressions of a module are joined with "or" and apply to all its files
(pytest's -k also matches a test file's name). Lines that raise or warn are not
mutated (their wording is not a result). A mutant "survives" when every selected test still passes with it; tests/README.md
lists the survivors that are equivalent (no behaviour can tell them apart).

    python tests/mutate.py                 # every module below
    python tests/mutate.py agc layers      # some of them
    python tests/mutate.py --list          # the modules and their tests
    python tests/mutate.py --survivors agc # re-print the survivors of a finished run
    python tests/mutate.py --recheck agc   # test what changed, then re-test the survivors against the current tests

Not part of CI (all modules: ~70 minutes on 2 idle cores with two mutants at a time,
measured 2026-12-02). ``make mutate`` runs it under ``nice -n 15`` with ``--max-children 2``;
the default here is one mutant at a time (for a shared machine).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# module -> (source file, pytest arguments selecting the tests that exercise it[, functions left out])
MODULES = {
    "agc": ("src/normfree/agc.py", [
        "tests/test_agc.py", "tests/test_properties.py", "-k", "(agc or AGC) and not scheduler_and_checkpoint"]),
    "schemes": ("src/normfree/schemes.py", [
        "tests/test_models.py", "-k", "bad_input or numeric or unknown_option or skipinit_gain or docs "
        "or step_by_step or method_options or bounds_include or aliases_regularized",
        "tests/test_methods.py", "-k", "options_are_validated or scaling_factors"]),
    "optim": ("src/normfree/train/optim.py", [
        "tests/test_train.py", "-k", "lr_schedules or param_groups or fixup_scalars or agc_option or amp_channels "
        "or schedule_ends or options_reach or make_optimizer"]),
    "blocks": ("src/normfree/blocks.py", [
        "tests/test_models.py", "-k", "step_by_step or fixup_initialization or skipinit_blocks or groupnorm "
        "or stochastic_depth or fixup_shortcut or stem_is or nf_has or rescale_coefficients or drop_path_drops "
        "or folded_fixup or norm_order or variants_ln_and_in or pool_pad_keeps or group_count_examples "
        "or nf_beta or he_init or second_moment or make_conv or norm_act_units or documented_defaults "
        "or combined_methods or construction_details or odd_input",
        "tests/test_fold.py", "-k", "reference_path or folded_scalars or bias_folding",
        "tests/test_methods.py", "-k", "arpit_initialization or scaling_factors or start_at_the_he_gain",
        # the NFNet / NF-RegNet layouts (group widths, squeeze-excite, pooled shortcut), ~7 s
        "tests/test_nfnet.py", "-k", "configured or formula or squeeze_excite or inplace_activations_after "
        "or width_multiplier or counterpart or parameter_count"]),
    "layers": ("src/normfree/layers.py", [
        "tests/test_layers.py", "tests/test_properties.py", "tests/test_fold.py", "tests/test_models.py", "-k",
        "test_layers or scaled_ws or fused_ws or conv_in_bias or pool_pad or folded_scalars or cache "
        "or drop_path_drops or step_by_step or he_gain or nf_uses_standardized"]),
    "checkpoint": ("src/normfree/train/checkpoint.py", [
        "tests/test_resume.py", "tests/test_train.py", "tests/test_export.py", "tests/test_user_training.py",
        "tests/test_faults.py", "tests/test_factory.py", "-k", "test_resume or (test_train and (divergence or "
        "checkpoint)) or load_model or export_and_load or registered_model_weights or disk_full_while_checkpointing "
        "or without_checkpoint or did_not_finish or run_diverged or converted_factory_model"]),
    # the statistics (not the plumbing around them: file writers, tables, block discovery)
    "signal_stats": ("src/normfree/signal.py", [
        # all of test_signal.py but its two slow end-to-end tests (~3 s in all)
        "tests/test_signal.py", "-k", "test_signal and not compare_export_plot and not nf_resnet50_matches",
        "tests/test_properties.py", "-k", "measure_signal",
        "tests/test_methods.py", "-k", "predict_variance_is"],
        ["find_blocks", "_default_branch", "_skip_module", "_validate_blocks", "_measurement_mode",
         "_model_device_dtype", "_input_shape", "_check_input", "_chunks", "_auto_chunk", "_first_conv_channels",
         "_forward", "_stages", "_warn_bn_chunks", "measure_gradients", "path_length_distribution",
         "effective_depth", "_rows", "write_csv", "write_json", "compare_models", "format_table",
         "_is_torchvision_block", "_is_preactivation", "to_dicts", "column"]),
}
# the study's verdict rules, once normfree/study/verdicts.py exists
if (ROOT / "src/normfree/study/verdicts.py").exists():
    MODULES["verdicts"] = ("src/normfree/study/verdicts.py", [
        "tests/test_study.py", "-k", "(rule and not claims_are_computed) or bootstrap or bits or never_says or combine or over_seeds or pools_seeds or linear_r2 "
        "or needs_bn or budget_rules"])
# not mutated anywhere: the wording of error messages and warnings (their tests match parts of
# the text), which would only add string mutants that no result depends on
SKIP_ALWAYS = [r"^\s*raise \w+\(", r"^\s*warnings\.warn\("]
SKIP_FUNCTIONS_ALWAYS = ("extra_repr", "__repr__")

# surviving mutants that no test can tell apart from the original, with the reason (mutmut's
# names number the mutants of a function: a changed function gets new numbers, recheck then)
EQUIVALENT = {
    "normfree.schemes.x__closest__mutmut_7": "get_close_matches lists the best match first; only close[0] is used",
    "normfree.schemes.x__closest__mutmut_9": "get_close_matches lists the best match first; only close[0] is used",
    "normfree.train.optim.x_make_optimizer__mutmut_23": "SGD's default lr is never used: every group sets its own lr",
    "normfree.train.optim.x_make_optimizer__mutmut_34": "AdamW's default lr is never used: every group sets its own lr",
    "normfree.train.optim.x_make_optimizer__mutmut_49": "AGC needs model= only to resolve names; exclude is a list of tensors here",
    "normfree.train.optim.x_make_optimizer__mutmut_54": "AGC needs model= only to resolve names; exclude is a list of tensors here",
    "normfree.blocks.xǁPoolPadShortcutǁforward__mutmut_4": "F.pad by 0 channels returns the same values",
    "normfree.blocks.xǁResidualBlockǁ_unit__mutmut_12": "no unit is a lone ScalarBias: len(layers) is never 1 there",
    **{f"normfree.blocks.xǁResidualBlockǁ_unit__mutmut_{i}": "in place or not, an activation gives the same values "
       "(in place only saves memory; no scheme's unit has an identity activation before another)"
       for i in (25, 26, 27)},
    **{f"normfree.blocks.xǁResidualBlockǁ__init____mutmut_{i}": "inplace_acts off: the same values out of place"
       for i in (14, 15)},
    "normfree.blocks.xǁResidualBlockǁ__init____mutmut_6": "only extra_repr reads scheme_name",
    **{f"normfree.blocks.xǁResidualBlockǁ__init____mutmut_{i}": "every layout has a kernel > 1: next()'s default "
       "is never used" for i in (40, 42, 46)},
    **{f"normfree.blocks.xǁResidualBlockǁ__init____mutmut_{i}": "no layout has 2x2 kernels: k > 2 picks the same "
       "convs" for i in (45, 62)},
    **{f"normfree.blocks.xǁResidualBlockǁ__init____mutmut_{i}": "without a squeeze-excite se_index never equals a "
       "conv index, and se is read only then" for i in (88, 89)},
    "normfree.blocks.xǁResidualBlockǁ__init____mutmut_110": "shortcut_uses_preact None is falsy like False",
    **{f"normfree.blocks.xǁResidualBlockǁ__init____mutmut_{i}": "AvgPool2d's stride defaults to its kernel size "
       "(= stride here), and count_include_pad only matters with padding (none)" for i in (131, 134, 135, 137, 139)},
    **{f"normfree.blocks.xǁResidualBlockǁ__init____mutmut_{i}": "make_conv's stride defaults to 1"
       for i in (149, 150)},
    "normfree.blocks.xǁResidualBlockǁ__init____mutmut_191": "const is still 1.0 there: = and *= agree",
    **{f"normfree.blocks.xǁResidualBlockǁ_forward_folded__mutmut_{i}": "with a squeeze-excite last there is no "
       "Fixup bias: b is None" for i in (73, 76)},
    **{f"normfree.blocks.x_make_conv__mutmut_{i}": "torch lower-cases the mode, and fan_in is its default"
       for i in (29, 32, 81, 84)},
    "normfree.blocks.x_make_conv__mutmut_1": "every caller passes stride",
    "normfree.blocks.x_make_conv__mutmut_109": "every filter of a conv has the same number of weights",
    "normfree.blocks.xǁLayoutǁmid_channels__mutmut_1": "every caller passes first",
    "normfree.blocks.xǁLayoutǁmid_channels__mutmut_24": "mid == group_width gives groups 1 and the same mid either way",
    **{f"normfree.train.optim.x_param_groups__mutmut_{i}": "ScalarGain/ScalarBias hold 0-dim parameters: "
       "p.dim() == 0 already puts them in the scalar group" for i in (3, 4, 5, 6)},
    "normfree.train.optim.x_param_groups__mutmut_28": "rsplit('.')[-1] is the last name part whatever maxsplit",
    "normfree.train.optim.x_param_groups__mutmut_31": "rsplit('.')[-1] is the last name part whatever maxsplit",
    "normfree.blocks.xǁPoolPadShortcutǁ__init____mutmut_6": "stride 1 through the pool branch slices by 1: the same tensor",
    "normfree.blocks.xǁPoolPadShortcutǁ__init____mutmut_7": "forward slices by the pool's stride; its kernel size is never used",
    "normfree.blocks.xǁPoolPadShortcutǁ__init____mutmut_11": "forward slices by the pool's stride; its kernel size is never used",
    "normfree.blocks.xǁPoolPadShortcutǁ__init____mutmut_12": "stride 1 through the pool branch slices by 1: the same tensor",
    **{f"normfree.study.verdicts.x_fmt__mutmut_{i}": "the branch sees only inf, -inf and nan: comparing them with "
       "0 or 1, strictly or not, gives the same words" for i in (20, 21, 26, 27)},
    "normfree.study.verdicts.x_grid_note__mutmut_21": "a 1-point grid takes the 'top of the grid' branch first",
    "normfree.study.verdicts.x_linear_r2__mutmut_14": "float('NAN') is nan",
    "normfree.study.verdicts.x_unpack_bits__mutmut_9": "astype(None) is float64, the same as astype(np.float64)",
    **{f"normfree.study.verdicts.x_paired_bootstrap__mutmut_{i}": "the chunk size only bounds memory (and which "
       "draws go to which resample), not the distribution of the interval" for i in (38, 44, 50)},
    "normfree.study.verdicts.x_paired_bootstrap__mutmut_30": "the buffer's fill value is read only if the loop "
    "misses a resample, which it does not (the NaN fill makes such a bug fail the tests)",
    **{f"normfree.study.verdicts.x_paired_bootstrap__mutmut_{i}": "with the other array float64, a - b is float64 "
       "anyway" for i in (6, 8, 10, 12)},
    **{f"normfree.study.verdicts.x_paired_bootstrap__mutmut_{i}": "with one seed, drawing its index gives 0 like "
       "np.zeros (it only consumes random numbers)" for i in (66, 74)},
    "normfree.study.verdicts.x_paired_bootstrap__mutmut_85": "rng.integers(n) draws from [0, n) like rng.integers(0, n)",
    "normfree.study.verdicts.x_linear_r2__mutmut_17": "float('NAN') is nan",
    "normfree.study.verdicts.x_linear_r2__mutmut_19": "a spread exactly at the flatness bound: a set of measure zero",
    **{f"normfree.study.verdicts.x_linear_r2__mutmut_{i}": "polyfit gives the same fit for integer or float x"
       for i in (34, 37)},
    "normfree.study.verdicts.x_paired_bootstrap__mutmut_70": "rng.integers(n) draws from [0, n) like rng.integers(0, n)",
    "normfree.study.verdicts.x_paired_bootstrap__mutmut_80": "with one seed a duplicated seed index 0 averages the "
    "same row twice: the same mean",
    **{f"normfree.train.checkpoint.x_load_checkpoint__mutmut_{i}": "torch >= 2.6 (pinned 2.13) loads with "
       "weights_only=True by default; the explicit True keeps older torch (pyproject admits >= 2.3) safe"
       for i in (14, 17)},
    **{f"normfree.train.checkpoint.x_{f}__mutmut_{i}": "these take dicts from load_checkpoint / load_weights, which "
       "always set 'path': the default is never used" for f in ("_check_layout", "model_from_checkpoint",
                                                             "_registered_model") for i in (3, 5, 8)},
    **{f"normfree.train.checkpoint.x_model_from_checkpoint__mutmut_{i}": "train writes model_info['class'] for "
       "every module passed as an object: the default is never used" for i in (32, 34, 37, 38)},
    "normfree.train.checkpoint.x_model_from_checkpoint__mutmut_63": "a registered run's convert is None: passing "
    "it is passing None",
    "normfree.train.checkpoint.x_load_model__mutmut_28": "model.to(None) leaves the model where it is",
    "normfree.layers.x__normal_moments__mutmut_1": "the default number of grid points sets the accuracy, not the value",
    **{f"normfree.layers.x__normal_moments__mutmut_{i}": "the grid's dtype sets the accuracy: a float32 grid gives "
       "the tested constants to 1e-8" for i in (6, 11)},
    **{f"normfree.layers.x__normal_moments__mutmut_{i}": "the normal density beyond |z| = 12 is below 1e-31"
       for i in (14, 15)},
    "normfree.layers.x__normal_moments__mutmut_29": "fn of a float64 grid is float64 already",
    "normfree.layers.x__as_factor__mutmut_11": "a 0-d tensor reshaped to (1, 1, 1, 1) broadcasts like the 0-d one",
    **{f"normfree.layers.xǁConv2dǁforward__mutmut_{i}": "conv(x + d) equals the conv(ones) form under zero "
       "padding: only the memory differs" for i in (16, 17)},
    **{f"normfree.layers.x__{f}__mutmut_1": "when both predicates hold (1x1 kernels, one input channel) both "
       "layouts give the same rows" for f in ("rows", "unrows")},
    "normfree.layers.xǁ_ScaledStdWeightǁforward__mutmut_32": "q == eps exactly: a set of measure zero",
    **{f"normfree.layers.xǁScaledStdConv2dǁfolded_weight_bias__mutmut_{i}": "the autograd and no-grad paths share "
       "_ws_forward: the same bits, whichever runs (and a bias passed unscaled is the bias)" for i in (16, 21, 22, 25)},
    "normfree.layers.x_drop_path__mutmut_2": "p = 0 in training: a mask of ones (keep = 1) gives the same values",
    **{f"normfree.signal.x__partial__mutmut_{i}": "for a 1-D tensor cdim % 1 is 0 anyway" for i in (4, 6)},
    "normfree.signal.x__partial__mutmut_19": "float64 sums of float32 values: the same statistics up to rounding",
    "normfree.signal.x__partial__mutmut_34": "s1 is converted to float64 two lines below",
    "normfree.signal.x__partial__mutmut_43": "a float count divides like the int one",
    **{f"normfree.signal.xǁ_Momentsǁ__init____mutmut_{i}": "every caller passes cdim; s2 and shape are set "
       "together with s1 on the first add, before anything reads them" for i in (1, 6, 7)},
    "normfree.signal.x__as_float__mutmut_2": "float() of a 0-d tensor is its value, detached or not (it warns)",
    "normfree.signal.x_measure_signal__mutmut_8": "the model's forward runs the same check_input on the first chunk: "
    "the same error (the meta-tensor check only avoids allocating that chunk)",
    **{f"normfree.signal.x_measure_signal__mutmut_{i}": "device None is the CPU, the only device of the test "
       "machine" for i in (40, 156)},
    "normfree.signal.x_measure_signal__mutmut_63": "add_partial does not read cdim: the sums come from the hooks",
    **{f"normfree.signal.x_measure_signal__mutmut_{i}": "the previous block's sums are only reused to save work: "
       "without them the same sums are computed again" for i in (67, 68, 75, 76, 89, 170, 171, 172, 173, 174)},
    **{f"normfree.signal.x_measure_signal__mutmut_{i}": "the skip kind is only compared with 'input' and "
       "'module'" for i in (118, 119)},
    "normfree.signal.x_measure_signal__mutmut_139": "the reference (unfolded) path computes the same block outputs, "
    "up to rounding",
    **{f"normfree.signal.x_measure_signal__mutmut_{i}": "only a ResidualBlock has a skip_scale attribute"
       for i in (201, 206)},
    **{f"normfree.signal.x_measure_signal__mutmut_{i}": "a block output's shape always holds its channel dim"
       for i in (250, 252)},
    **{f"normfree.signal.x_measure_signal__mutmut_{i}": "unreachable: when the first block never ran, the loop "
       "above has raised" for i in (255, 257, 258, 259, 260, 261, 262)},
    **{f"normfree.signal.x_predict_variance__mutmut_{i}": "for ReLU the general branch gives r -> 2 (r / 2) = r: "
       "the same" for i in (129, 130)},
    **{f"normfree.signal.x_predict_variance__mutmut_{i}": "centered=None is falsy like False" for i in (139, 148)},
    "normfree.signal.x_predict_variance__mutmut_28": "every ResidualBlock has a shortcut_pool attribute",
    **{f"normfree.signal.x__act_moment__mutmut_{i}": "ReLU's closed form and the integration agree to ~1e-6"
       for i in (2, 3)},
    "normfree.signal.x__act_moment__mutmut_15": "at u = 0 the integration gives 0 as well; u < 0 never occurs",
    **{f"normfree.signal.x__act_moment__mutmut_{i}": "the number of grid points sets the accuracy (~1e-6 or "
       "better), not the value" for i in (24, 29)},
}

WORK = ROOT / "runs" / "mutate"
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped",
          36: "timeout", 24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout"}


def _selection(args):
    """pytest arguments -> the list mutmut passes to pytest (the -k expressions joined)."""
    files, ks = [], []
    i = 0
    while i < len(args):
        if args[i] == "-k":
            ks.append(args[i + 1])
            i += 2
        else:
            files.append(args[i])
            i += 1
    return files, ks


def _config(source: str, tests) -> str:
    files, ks = _selection(tests)
    sel = list(files)
    if ks:
        sel += ["-k", " or ".join(f"({k})" for k in ks)]
    return ("\n[tool.mutmut]\n"
            f"source_paths = [\"src/\"]\n"
            f"only_mutate = [{json.dumps(source)}]\n"
            f"pytest_add_cli_args_test_selection = {json.dumps(sel)}\n"
            "pytest_add_cli_args = [\"-q\", \"-x\", \"-p\", \"no:cacheprovider\"]\n"
            f"do_not_mutate_patterns = {json.dumps(SKIP_ALWAYS)}\n"
            "process_isolation = \"forkserver\"\n"
            "use_git_change_detection = false\n"
            "timeout_multiplier = 20.0\n"
            "timeout_constant = 15.0\n")


def _skip_functions(path: Path, names) -> None:
    """Wrap the functions called ``names`` in the copy at ``path`` in mutmut's
    ``# pragma: no mutate start`` / ``end`` comment lines (mutmut's own patterns match
    single lines only). Only the copy is changed, never the project's source."""
    import ast

    text = path.read_text()
    lines = text.splitlines(keepends=True)
    spans = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in names:
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            spans.append((first, node.end_lineno, node.col_offset))
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    at_end = any(last >= len(lines) for _, last, _ in spans)
    for first, last, col in sorted(spans, reverse=True):  # bottom-up: earlier line numbers stay valid
        pad = " " * col
        lines.insert(last, f"{pad}# pragma: no mutate end\n")
        lines.insert(first - 1, f"{pad}# pragma: no mutate start\n")
    if at_end:  # mutmut does not see a comment after the module's last statement: give it one
        lines.append("pass\n")
    path.write_text("".join(lines))


def _copy_tree(dest: Path) -> None:
    """The working tree's files that git knows of (tracked + untracked, not ignored)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                            capture_output=True).stdout.split(b"\0")
    for name in listed:
        if not name:
            continue
        rel = Path(os.fsdecode(name))
        src = ROOT / rel
        if not src.is_file() or rel.parts[0] in ("runs", "mutants"):
            continue
        out = dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        if not out.exists() or out.read_bytes() != src.read_bytes():
            shutil.copy2(src, out)


def _codes(where: Path, source: str) -> dict:
    return json.loads((where / "mutants" / (source + ".meta")).read_text())["exit_code_by_key"]


def _stats(where: Path, source: str):
    meta = where / "mutants" / (source + ".meta")
    if not meta.exists():
        return None
    codes = _codes(where, source)
    counts = {}
    survivors = []
    for key, code in codes.items():
        status = "not checked" if code is None else STATUS.get(code, "suspicious")
        counts[status] = counts.get(status, 0) + 1
        if status in ("survived", "no tests"):
            survivors.append(key)
    return counts, sorted(survivors)


def run(name: str, max_children: int, recheck: bool = False) -> dict:
    source, tests, *skip = MODULES[name]
    where = WORK / name
    where.mkdir(parents=True, exist_ok=True)
    _copy_tree(where)
    _skip_functions(where / source, set(SKIP_FUNCTIONS_ALWAYS) | set(*skip))
    with open(where / "pyproject.toml", "a") as f:
        f.write(_config(source, tests))
    # which tests run which function: collected anew each time (the tests may have changed;
    # mutmut would otherwise keep the map of the first run). Results of unchanged mutants stay.
    stats = where / "mutants" / "mutmut-stats.json"
    if stats.exists():
        stats.unlink()
    t0 = time.time()
    cmd = [sys.executable, "-m", "mutmut", "run", "--max-children", str(max_children)]
    log = where / "mutmut.log"
    env = dict(os.environ, HYPOTHESIS_PROFILE="mutate")  # 10 examples per property test
    survivors = []
    if recheck:  # the survivors of the last run, against the current tests
        got = _stats(where, source)
        survivors = [] if got is None else [k for k, v in _codes(where, source).items()
                                            if STATUS.get(v, "suspicious") in ("survived", "no tests")]
    with open(log, "w") as f:
        # mutmut tests the mutants without a result: all of them the first time, afterwards those of
        # the functions whose source changed since (their old results are dropped); then a recheck
        # re-tests the survivors (of unchanged functions too) against the current tests
        rc = subprocess.run(cmd, cwd=where, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
        if survivors and rc == 0:
            rc = subprocess.run(cmd + survivors, cwd=where, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    return {"module": name, "source": source, "rc": rc, "seconds": round(time.time() - t0), "log": str(log)}


def report(name: str) -> None:
    source = MODULES[name][0]
    got = _stats(WORK / name, source)
    if got is None:
        print(f"{name:14s} not measured (no results in {WORK / name})")
        return
    counts, survivors = got
    killed = counts.get("killed", 0)
    tested = sum(v for k, v in counts.items() if k not in ("skipped", "not checked"))
    equivalent = [m for m in survivors if m in EQUIVALENT]
    score = 100.0 * killed / tested if tested else float("nan")
    adjusted = 100.0 * killed / (tested - len(equivalent)) if tested > len(equivalent) else float("nan")
    rest = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if k != "killed")
    print(f"{name:14s} {source:36s} {killed:4d}/{tested:<4d} killed = {score:5.1f}%   "
          f"({len(equivalent)} listed equivalent: {adjusted:5.1f}% of the rest)   ({rest})")
    return [m for m in survivors if m not in EQUIVALENT]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("modules", nargs="*", help=f"default: all of {list(MODULES)}")
    p.add_argument("--list", action="store_true", help="print the modules and their test selections")
    p.add_argument("--survivors", action="store_true", help="only report (and list survivors of) finished runs")
    p.add_argument("--recheck", action="store_true",
                   help="after adding tests: test the mutants of changed functions, then re-test the survivors of "
                        "the last run (the tree is copied anew)")
    p.add_argument("--max-children", type=int, default=1, help="mutants tested at once (default 1)")
    a = p.parse_args(argv)
    bad = [m for m in a.modules if m not in MODULES]
    if bad:
        p.error(f"unknown module(s) {bad}; allowed: {list(MODULES)}")
    names = a.modules or list(MODULES)
    if a.list:
        for n in names:
            print(f"{n:14s} {MODULES[n][0]:36s} pytest {' '.join(MODULES[n][1])}")
        return 0
    if not a.survivors:
        for n in names:
            r = run(n, a.max_children, a.recheck)
            print(f"# {n}: mutmut exited {r['rc']} after {r['seconds']} s (log: {r['log']})", flush=True)
    print(f"\nmutation score per module ({time.strftime('%Y-%m-%d')}):")
    for n in names:
        survivors = report(n)
        if a.survivors and survivors:
            for s in survivors:
                print(f"    survived: {s}")
        elif a.survivors:
            print("    (no survivors but the listed equivalent ones)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
