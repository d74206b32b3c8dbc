"""The benchmark script runs and reports what it promises (never its timings)."""
import importlib.util
import json
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_methods", os.path.join(ROOT, "benchmarks", "bench_methods.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_methods_quick_prints_table_ratios_ws_share_and_goal_lines(tmp_path, capsys):
    bench = load_bench()
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--archs", "wrn", "--methods", "bn,none,fixup,nf", "--threads", "1",
                       "--keep-denormals", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    result = json.loads(out.read_text())
    (arch,) = result["results"]
    rows = {r["method"]: r for r in arch["rows"]}
    assert set(rows) == {"bn", "none", "fixup", "nf", "nf.fold"}
    assert rows["bn"]["train_x_bn"] == pytest.approx(1.0) and rows["none"]["train_x_none"] == pytest.approx(1.0)
    for m in ("none", "fixup", "nf"):
        assert rows[m]["train_img_s"] > 0 and rows[m]["peak_mb"] > 0 and rows[m]["gflop_step"] > 0
        assert f"| {m:9s} |" in text
    assert "train_img_s" not in rows["nf.fold"] and rows["nf.fold"]["eval_img_s"] > 0
    assert rows["none"]["mem_x_bn"] < 1.0  # no BN statistics saved for backward: a property, not a timing
    ws = arch["nf_ws"]
    assert ws["weights"] > 0 and 0 < ws["share_of_nf_step"]
    assert "nf: weight standardization" in text
    assert any(c.startswith(("PASS", "FAIL")) and "nf train throughput" in c for c in result["checks"])


def test_bench_methods_rejects_unknown_method_and_arch(capsys):
    bench = load_bench()
    with pytest.raises(SystemExit):
        bench.main(["--methods", "bn,batchnorm"])
    assert "unknown method 'batchnorm'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--archs", "vgg"])
    assert "unknown arch 'vgg'" in capsys.readouterr().err
