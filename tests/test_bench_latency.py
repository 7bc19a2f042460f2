"""benchmarks.bench_latency: the engines take turns over rounds; the table names what it ran."""
import pytest

from benchmarks import bench_latency

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is an optional extra ([test])")
pytest.importorskip("onnx", reason="onnx is an optional extra ([test])")


def test_rounds_give_a_ratio_per_round_and_the_table_names_onnxruntime():
    res = bench_latency.run(configs=("0.25@32",), runs=4, rounds=2, warmup=0, threads=1, use_torch=False)
    (row,) = res["rows"]
    e = row["onnxruntime"]
    assert len(e["round_ms"]) == len(row["mbnet"]["round_ms"]) == 2
    assert e["ratio_rounds"] == pytest.approx([o / m for o, m in zip(e["round_ms"], row["mbnet"]["round_ms"])])
    assert min(e["ratio_rounds"]) <= e["ratio"] <= max(e["ratio_rounds"])
    text = bench_latency.markdown(res)
    assert f"ONNX Runtime {ort.__version__} runs mbnet's own export" in text
    assert "2 rounds of 2 calls" in text
