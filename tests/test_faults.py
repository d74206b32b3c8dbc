"""Faults a user can cause, through the real command line: where the output
goes (classes 1-3 of issue 14), signals (6), results that would be silently
meaningless (9) and misleading messages (11). Each ends in one line naming
the path or value, a documented exit status, and no lost work.

Most cases call ``normfree.cli.main`` in-process (the same code as the
installed command); those about processes (locks, SIGTERM, permissions,
file-size limits) run the command in a subprocess."""
import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch

import normfree
from normfree.atomic import atomic_path
from normfree.cli import main
from normfree.train import RunDir, TrainConfig, load_checkpoint, train

TRAIN = ["train", "--model", "skipinit_wrn", "--depth", "10", "--batch-size", "32", "--max-train-examples", "64",
         "--max-test-examples", "32", "--no-progress", "--log-every", "1"]


def run_cli(args, **kw):
    """``normfree ARGS`` in a fresh process (1 thread)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    return subprocess.run([sys.executable, "-m", "normfree.cli", *args], env=env, capture_output=True,
                          text=True, timeout=240, **kw)


def one_error_line(err: str, command: str) -> str:
    """The one error line of a failed command (informational lines may precede it), no traceback."""
    lines = [ln for ln in err.splitlines() if ln.startswith(f"normfree {command}: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def listing(folder):
    return sorted(os.listdir(folder))


def full_disk(monkeypatch, suffix):
    """From now on, writing a temporary file ending in ``suffix`` (the atomic
    writer's ``.NAME.RANDOM.tmp.EXT``) fails half-way as on a full disk;
    returns a function that ends the fault."""
    import builtins

    real_open = builtins.open

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(bytes(data[:100]))
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def open_on_full_disk(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        return FullDisk(f) if "w" in mode and str(path).endswith(suffix) else f

    monkeypatch.setattr(builtins, "open", open_on_full_disk)
    return lambda: monkeypatch.setattr(builtins, "open", real_open)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("finished") / "run")
    assert main(TRAIN + ["--steps", "2", "--out", out]) == 0
    return out


# ------------------------------------------------------------------ class 1: output paths
def test_train_out_is_a_file_or_below_a_file(tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    assert main(TRAIN + ["--steps", "1", "--out", str(f)]) == 2
    line = one_error_line(capsys.readouterr().err, "train")
    assert f"exists and is not a directory: {f}" in line
    assert main(TRAIN + ["--steps", "1", "--out", str(f / "run")]) == 2
    line = one_error_line(capsys.readouterr().err, "train")
    assert f"not a directory (a part of the path is a file): {f / 'run'}" in line
    assert f.read_text() == "mine"


@pytest.mark.parametrize("code, words", [(errno.EACCES, "permission denied"), (errno.EROFS, "read-only file system"),
                                         (errno.ENOSPC, "disk full"), (errno.EDQUOT, "disk quota exceeded")])
def test_train_out_that_cannot_be_created(tmp_path, capsys, monkeypatch, code, words):
    """The directory cannot be made (what a read-only, unwritable or full file
    system answers): one line, status 2, before any data are loaded."""
    real = os.makedirs

    def makedirs(path, *a, **k):
        if str(path).startswith(str(tmp_path)):
            raise OSError(code, os.strerror(code), path)
        return real(path, *a, **k)

    monkeypatch.setattr(os, "makedirs", makedirs)
    monkeypatch.setattr("normfree.data.load_dataset", lambda *a, **k: pytest.fail("data loaded"))
    out = str(tmp_path / "run")
    assert main(TRAIN + ["--steps", "1", "--out", out]) == 2
    assert one_error_line(capsys.readouterr().err, "train").endswith(f"error: {words}: {out}")


def test_train_out_in_an_unwritable_folder_real(tmp_path):
    """A real refusal by the file system, in a subprocess: a folder the user may
    not write into (mode 0o555), or, for root (who may write anywhere), an
    immutable folder (chattr +i)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() != 0:
        locked.chmod(0o555)
        words = "permission denied"
    else:
        if not shutil.which("chattr") or subprocess.run(["chattr", "+i", str(locked)]).returncode != 0:
            pytest.skip("running as root without chattr +i: no folder is unwritable")
        words = "operation not permitted"
    try:
        proc = run_cli(TRAIN + ["--steps", "1", "--out", str(locked / "run")])
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(locked)])
        locked.chmod(0o755)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert one_error_line(proc.stderr, "train").endswith(f"error: {words}: {locked / 'run'}")


def test_disk_full_while_checkpointing_keeps_the_old_checkpoint(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "run")
    assert main(TRAIN + ["--steps", "4", "--stop-after-steps", "2", "--out", out]) == 0
    ckpt = os.path.join(out, "checkpoint.pt")
    before = open(ckpt, "rb").read()
    disk_has_room = full_disk(monkeypatch, ".tmp.pt")
    assert main(["train", "--out", out, "--resume", "--no-progress"]) == 2
    disk_has_room()
    line = one_error_line(capsys.readouterr().err, "train")
    assert line.endswith(f"error: disk full: {ckpt} (the previous version of that file is kept)")
    assert open(ckpt, "rb").read() == before and load_checkpoint(out)["step"] == 2
    assert not [f for f in os.listdir(out) if ".tmp" in f]  # no temporary left behind
    assert main(["train", "--out", out, "--resume", "--no-progress"]) == 0  # and the run continues
    assert load_checkpoint(out)["step"] == 4


def test_file_size_limit_real(tmp_path):
    """A real failing write in a subprocess (RLIMIT_FSIZE: the kernel refuses
    to grow a file past 64 KiB, as a full disk refuses any growth): the
    checkpoint write fails with one line naming it, status 2."""
    out = str(tmp_path / "run")

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    proc = run_cli(TRAIN + ["--steps", "2", "--out", out], preexec_fn=limit)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_error_line(proc.stderr, "train")
    assert f"file too large for this file system or limit: {os.path.join(out, 'checkpoint.pt')}" in line
    assert "checkpoint.pt" not in os.listdir(out) and not [f for f in os.listdir(out) if ".tmp" in f]


def test_export_creates_missing_folders(finished_run, tmp_path, capsys):
    dest = tmp_path / "missing" / "dir" / "model.pt2"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the temporary file keeps .pt2: torch does not warn
        assert main(["export", finished_run, "--out", str(dest)]) == 0
    assert dest.is_file() and (tmp_path / "missing" / "dir" / "model.json").is_file()
    assert listing(dest.parent) == ["model.json", "model.pt2", "model.safetensors"]


@pytest.mark.parametrize("where, words", [("dir", "is a directory: give a file name inside it"),
                                          ("below_file", "not a directory (a part of the path is a file)")])
def test_export_to_an_impossible_path(finished_run, tmp_path, capsys, where, words):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    dest = {"dir": tmp_path / "dir", "below_file": tmp_path / "file" / "model.pt2"}[where]
    assert main(["export", finished_run, "--out", str(dest)]) == 2
    assert f"{words}: " in one_error_line(capsys.readouterr().err, "export")


def test_export_disk_full(finished_run, tmp_path, capsys, monkeypatch):
    """The export's file write fails half-way (full disk): one line naming the
    file, the older export kept, no temporary left."""
    dest = tmp_path / "model.pt2"
    dest.write_bytes(b"an older export")
    disk_has_room = full_disk(monkeypatch, ".tmp.pt2")
    assert main(["export", finished_run, "--out", str(dest)]) == 2
    disk_has_room()
    line = one_error_line(capsys.readouterr().err, "export")
    assert line.endswith(f"disk full: {dest} (the previous version of that file is kept)")
    assert dest.read_bytes() == b"an older export" and listing(tmp_path) == ["model.pt2"]


def test_spp_output_below_a_file_fails_before_measuring(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr("normfree.signal.compare_models", lambda *a, **k: pytest.fail("measured first"))
    assert main(["spp", "--model", "nf_wrn", "--out", str(tmp_path / "file" / "spp.png")]) == 2
    assert "not a directory" in one_error_line(capsys.readouterr().err, "spp")


# ------------------------------------------------------------------ class 2: existing work
@pytest.mark.parametrize("content", ["lookalike_files", "user_files", "cwd"])
def test_train_refuses_a_non_empty_foreign_out(tmp_path, capsys, monkeypatch, content):
    out = tmp_path / "mine"
    out.mkdir()
    files = {"lookalike_files": {"config.json": "{\"my\": 1}", "metrics.csv": "a,b\n", "summary.json": "{}"},
             "user_files": {"thesis.tex": "...", "data.npy": "..."},
             "cwd": {"notes.txt": "keep"}}[content]
    for name, text in files.items():
        (out / name).write_text(text)
    target = str(out)
    if content == "cwd":
        monkeypatch.chdir(out)
        target = "."
    assert main(TRAIN + ["--steps", "1", "--out", target]) == 2
    line = one_error_line(capsys.readouterr().err, "train")
    assert "is not empty" in line and "holds no normfree run" in line
    assert sorted(p for p in os.listdir(out) if p != ".lock") == sorted(files)
    for name, text in files.items():
        assert (out / name).read_text() == text  # untouched


def test_run_without_checkpoint_needs_resume_to_restart(tmp_path, capsys):
    """A run that diverged before its first checkpoint: not overwritten by
    accident, restarted from scratch with --resume."""
    out = str(tmp_path / "div")
    args = TRAIN[:2] + ["none_wrn"] + TRAIN[3:] + ["--lr", "1e6", "--steps", "20"]
    assert main(args + ["--out", out]) == 3
    assert "checkpoint.pt" not in os.listdir(out)
    capsys.readouterr()
    assert main(args + ["--out", out]) == 2
    assert "holds a normfree run without a checkpoint" in one_error_line(capsys.readouterr().err, "train")
    assert main(TRAIN + ["--steps", "1", "--out", out, "--resume", "--model", "skipinit_wrn", "--lr", "0.1"]) == 0


def test_train_writes_only_inside_out(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(TRAIN + ["--steps", "1", "--out", "run"]) == 0
    assert listing(tmp_path) == ["run"]
    assert set(listing(tmp_path / "run")) == {".lock", "checkpoint.pt", "config.json", "metrics.csv",
                                              "metrics.jsonl", "model.safetensors", "summary.json"} | (
        {"tb"} if os.path.isdir(tmp_path / "run" / "tb") else set())


# ------------------------------------------------------------------ class 3: two runs, one directory
def test_locked_run_directory_is_refused(tmp_path, capsys):
    out = str(tmp_path / "run")
    with RunDir.open(out, resume=False):  # another run holds it
        assert main(TRAIN + ["--steps", "1", "--out", out]) == 2
        line = one_error_line(capsys.readouterr().err, "train")
        assert f"another normfree process (pid {os.getpid()}) is using {out}" in line
        assert listing(out) == [".lock"]
    assert main(TRAIN + ["--steps", "1", "--out", out]) == 0  # free again


def test_two_processes_same_out_and_sigterm(tmp_path):
    """Two real `normfree train` processes with one --out: the second stops at
    once with one line naming the first, which trains on undisturbed. Then
    SIGTERM (what kill, SLURM and containers send) stops the first like
    Ctrl-C: it finishes the step, writes the checkpoint and exits with 143
    (class 6)."""
    out = str(tmp_path / "run")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.Popen([sys.executable, "-m", "normfree.cli", *TRAIN, "--steps", "100000", "--out", out],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(out, "metrics.jsonl")
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
            assert first.poll() is None, first.communicate()
            time.sleep(0.1)
        second = run_cli(TRAIN + ["--steps", "2", "--out", out])
        assert second.returncode == 2
        assert f"another normfree process (pid {first.pid}) is using {out}" in one_error_line(second.stderr, "train")
        assert first.poll() is None  # still training
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "interrupted (SIGTERM) at step" in err and "continue with --resume" in err
    assert err.rstrip().endswith("normfree train: interrupted (SIGTERM)")
    ck = load_checkpoint(out)
    assert 1 <= ck["step"] < 100000 and ck["config"]["steps"] == 100000
    events = [json.loads(line) for line in open(metrics)]
    assert events[-1]["status"] == "interrupted" and "SIGTERM" in events[-1]["message"]
    assert events[-1]["step"] == ck["step"]


# ------------------------------------------------------------------ class 9: silently meaningless results
def test_export_says_when_the_run_did_not_finish(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(TRAIN + ["--steps", "6", "--stop-after-steps", "2", "--out", out]) == 0
    capsys.readouterr()
    assert main(["export", out]) == 0
    assert "did not finish: the checkpoint is from step 2 of 6 (it was stopped early)" in capsys.readouterr().err
    os.remove(os.path.join(out, "summary.json"))  # as after a kill
    assert main(["export", out]) == 0
    assert "it was interrupted or is still running" in capsys.readouterr().err


def test_export_says_when_the_run_diverged(tmp_path, capsys):
    out = str(tmp_path / "run")

    def poison(step, model, rec):
        if step == 3:
            with torch.no_grad():
                model.fc.weight.fill_(float("nan"))

    res = train(TrainConfig(model="skipinit_wrn", depth=10, batch_size=32, max_train_examples=64,
                            max_test_examples=32, epochs=3, log_every=1, progress=False, out=out), callback=poison)
    assert res.status == "diverged" and res.diverged_step == 4 and res.steps == 4
    assert main(["export", out]) == 0
    assert "diverged; this is its last good checkpoint (step 2 of 6)" in capsys.readouterr().err


def test_finished_run_exports_without_a_note(finished_run, tmp_path, capsys):
    assert main(["export", finished_run, "--out", str(tmp_path / "m.pt2")]) == 0
    assert "note" not in capsys.readouterr().err


def test_measure_signal_refuses_nan_and_inf_input():
    model = normfree.create_model("nf_wrn", depth=10, in_chans=1)
    for bad in (float("nan"), float("inf")):
        x = torch.randn(6, 1, 8, 8)
        x[3, 0, 2, 2] = bad
        with pytest.raises(ValueError, match=r"input holds 1 NaN/Inf value\(s\) \(of 384, shape \(6, 1, 8, 8\)\)"):
            normfree.measure_signal(model, x)
        with pytest.raises(ValueError, match="NaN/Inf"):
            normfree.measure_gradients(model, x, torch.zeros(6, dtype=torch.long))
    assert len(normfree.measure_signal(model, torch.randn(6, 1, 8, 8))) == 3  # finite input still works


# ------------------------------------------------------------------ class 11: messages that mislead
def test_measure_signal_wrong_shape_names_the_shape_given():
    model = normfree.create_model("nf_wrn", depth=10, in_chans=1)
    with pytest.raises(ValueError, match=r"got \(7, 3, 8, 8\)"):
        normfree.measure_signal(model, torch.randn(7, 3, 8, 8))
    with pytest.raises(ValueError, match=r"got \(5, 3, 16, 16\)"):
        normfree.measure_signal(model, (5, 3, 16, 16))


def test_atomic_temporary_keeps_the_suffix(tmp_path):
    with atomic_path(str(tmp_path / "model.pt2")) as tmp:
        assert tmp.endswith(".tmp.pt2") and os.path.basename(tmp).startswith(".model.")
        open(tmp, "w").write("x")


def test_a_second_signal_inside_a_step_aborts_at_once():
    from normfree.train.interrupt import Interrupted, StopRequests

    said, before = [], signal.getsignal(signal.SIGTERM)
    with StopRequests(said.append) as stop:
        stop.in_step = True
        os.kill(os.getpid(), signal.SIGTERM)  # first: noted, the step goes on
        assert stop.requested and stop.signum == signal.SIGTERM and "SIGTERM" in said[0]
        with pytest.raises(Interrupted) as e:
            os.kill(os.getpid(), signal.SIGINT)  # second: at once
        assert e.value.signum == signal.SIGINT
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is back


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError(
    "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
    "allocate 400000000000000 bytes.")])
def test_out_of_memory_is_one_line(error, tmp_path, capsys, monkeypatch):
    def oom(*a, **k):
        raise error

    monkeypatch.setattr("normfree.signal.measure_signal", oom)
    assert main(["spp", "--model", "nf_wrn", "--out", str(tmp_path / "spp.png")]) == 2
    assert "out of memory" in one_error_line(capsys.readouterr().err, "spp")
