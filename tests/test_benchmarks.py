"""The benchmark script runs and reports what it promises (never its timings)."""
import importlib.util
import json
import os

import pytest

pytestmark = pytest.mark.slow  # `pytest -m "not slow"` skips these in the fast loop

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_methods", os.path.join(ROOT, "benchmarks", "bench_methods.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_methods_quick_prints_table_ratios_ws_share_and_goal_lines(tmp_path, capsys):
    bench = load_bench()
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--archs", "wrn16_4", "--methods", "bn,none,fixup,nf", "--threads", "1",
                       "--system-malloc", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    result = json.loads(out.read_text())
    (arch,) = result["results"]
    rows = {r["method"]: r for r in arch["rows"]}
    assert set(rows) == {"bn", "none", "fixup", "nf", "nf.fold"}
    assert rows["bn"]["train_x_bn"] == pytest.approx(1.0) and rows["none"]["train_x_none"] == pytest.approx(1.0)
    for m in ("none", "fixup", "nf"):
        r = rows[m]
        assert r["train_img_s"] > 0 and r["saved_mb"] > 0 and r["peak_mb"] > 0 and r["gflop_step"] > 0
        assert f"| {m} " in text
    assert "train_img_s" not in rows["nf.fold"] and rows["nf.fold"]["eval_img_s"] > 0
    # no BN statistics saved for backward: a property of the graph, not a timing
    assert rows["none"]["saved_mb_x_bn"] < 1.0
    ws = arch["nf_ws"]
    assert ws["weights"] > 0 and 0 < ws["share_of_nf_step"]
    assert "nf: weight standardization" in text and "page faults per training step" in text
    assert result["allocator"] == "C library default"
    assert any(c.startswith(("PASS", "FAIL")) and "nf train throughput" in c for c in result["checks"])
    assert any("peak memory of a training step" in c for c in result["checks"])
    # lr 0 keeps every model at its initialization: all timed on finite numbers, and no warning
    assert all(r["finite"] for r in arch["rows"] if "finite" in r) and "WARNING" not in text


def test_runner_flags_non_finite_models():
    import torch
    import normfree

    bench = load_bench()
    model = normfree.create_model("none_wrn", depth=10, width=1)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    runner = bench.Runner(model, x, y, train=True)
    runner.train_step()
    assert runner.finite()
    before = [p.detach().clone() for p in model.parameters()]
    runner.train_step()  # lr 0: the step runs but leaves the weights as they were
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    with torch.no_grad():
        next(model.parameters())[0].fill_(float("nan"))
    assert not runner.finite()


def test_bench_methods_batch_list_gives_one_table_per_batch_and_a_summary(tmp_path, capsys):
    bench = load_bench()
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--archs", "wrn16_4", "--methods", "bn,none,nf,nf:conv_bias=False", "--threads", "1",
                       "--system-malloc", "--batch", "2,4", "--no-peak-memory", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert [r["batch"] for r in result["results"]] == [2, 4]
    assert all(r.get("peak_mb") is None for res in result["results"] for r in res["rows"])
    assert "ratios against the batch size" in text
    summary = text.split("ratios against the batch size")[1]
    assert "nf x bn" in summary and "nf x none" in summary and "bn x none" in summary
    assert sum(1 for line in summary.splitlines() if line.startswith("| wrn16_4")) == 2
    rows = {r["method"]: r for r in result["results"][0]["rows"]}
    assert rows["nf:conv_bias=False"]["train_img_s"] > 0 and "nf:conv_bias=False x none" in summary
    assert bench.options_of("nf:conv_bias=False:alpha=0.5") == {"conv_bias": False, "alpha": 0.5}
    assert bench.method_of("nf:conv_bias=False") == "nf" and bench.options_of("nf") == {}


def test_step_peak_memory_probe_grows_with_the_batch():
    bench = load_bench()
    kwargs = dict(depth=10, width=1, num_classes=10)
    small = bench.cpu_step_peak_bytes("none_wrn", kwargs, hw=32, batch=4, channels_last=False)
    large = bench.cpu_step_peak_bytes("none_wrn", kwargs, hw=32, batch=128, channels_last=False)
    if small is None:
        pytest.skip("no /proc/self/clear_refs on this system")
    # activations of WRN-10-1 at 32x32 are ~0.4 MB per image: 32x the batch must show
    assert large > small + 20 * 2 ** 20, (small, large)


@pytest.mark.parametrize("argv, message", [
    (["--methods", "bn,batchnorm"], "unknown method 'batchnorm'"),
    (["--archs", "vgg"], "unknown arch 'vgg'"),
    (["--methods", "bn,nf:colour=red"], "bad method variant 'nf:colour=red'"),
    (["--methods", "nf:alpha"], "key=value"),
    (["--batch", "0"], "--batch must be positive integers"),
    (["--batch", "16,x"], "--batch must be positive integers"),
    (["--batch", ""], "--batch must be positive integers"),
])
def test_bench_methods_rejects_bad_arguments_by_name(argv, message, capsys):
    with pytest.raises(SystemExit):
        load_bench().main(argv)
    assert message in capsys.readouterr().err


def test_bench_methods_reports_both_allocators_in_one_table(tmp_path, capsys):
    """--allocators retained,system: the training steps again in a fresh process with the
    C library's defaults, a row per method in both settings and goal lines for each."""
    bench = load_bench()
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--archs", "wrn16_1", "--methods", "none,nf", "--threads", "1",
                       "--no-peak-memory", "--allocators", "retained,system", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    (arch,) = json.loads(out.read_text())["results"]
    other = {r["method"]: r for r in arch["system_malloc"]["rows"]}
    assert set(other) == {"none", "nf"} and all(r["train_img_s"] > 0 for r in other.values())
    assert other["none"]["train_x_none"] == pytest.approx(1.0)
    table = text.split("both allocator settings")[1]
    assert "| none " in table and "| nf " in table and "retained / default" in table
    assert "C library malloc: wrn16_1 batch 8: nf train throughput" in text


def test_ws_benchmark_checks_the_batched_standardization_and_prints_every_row(capsys):
    """benchmarks/bench_ws.py (smoke run): the batched node equals the per-conv one
    (asserted inside the script before timing) and every row is printed."""
    spec = importlib.util.spec_from_file_location("bench_ws", os.path.join(ROOT, "benchmarks", "bench_ws.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    import torch
    threads = torch.get_num_threads()
    try:
        assert module.main(["--arch", "quick", "--reps", "1", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    text = capsys.readouterr().out
    for row in ("step none", "step nf", "step nf-bias", "WS per-conv", "WS batched", "WS reference"):
        assert row in text
    assert "nf - none:" in text


@pytest.mark.parametrize("argv, message", [
    (["--allocators", "jemalloc"], "--allocators must be one or both of retained, system"),
    (["--allocators", "system,system"], "--allocators must be one or both of retained, system"),
])
def test_bench_methods_rejects_bad_allocators(argv, message, capsys):
    with pytest.raises(SystemExit):
        load_bench().main(argv)
    assert message in capsys.readouterr().err
