"""benchmarks.bench_layers: one row per compiled layer, every ONNX Runtime node in one of them."""
import pytest

from benchmarks import bench_layers

pytest.importorskip("onnxruntime", reason="onnxruntime is an optional extra ([test])")
pytest.importorskip("onnx", reason="onnx is an optional extra ([test])")


def test_rows_are_the_plan_layers_and_cover_every_onnxruntime_node(tmp_path):
    res = bench_layers.run(tiny=True, threads=1, plot=str(tmp_path / "layers.png"))
    rows = res["rows"]
    # MobileNetV1: the stem, 13 separable blocks, the pooling and classifier
    assert [r["layer"].split()[0] for r in rows] == ["conv"] + ["dwpw"] * 13 + ["pool"]
    assert rows[0]["layer"] == "conv 32x32x3 -> 32x32x8, stride 1"  # α=0.25 at 32 px: stem stride 1
    assert rows[-2]["layer"] == "dwpw 2x2x256 -> 2x2x256, stride 1"
    assert all(r["onnxruntime_ms"] > 0 for r in rows), rows
    assert sum(r["onnxruntime_ms"] for r in rows) == pytest.approx(res["onnxruntime_nodes_ms"])
    assert all(r["mbnet_ms"] > 0 for r in rows), rows
    assert sum(r["mbnet_ms"] for r in rows) == pytest.approx(res["mbnet_layers_ms"])
    assert "| pool + classifier |" in bench_layers.markdown(res)
    assert (tmp_path / "layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_plot_path_in_a_missing_directory_stops_before_measuring(tmp_path):
    with pytest.raises(SystemExit, match="--plot .*: no such directory"):
        bench_layers.run(tiny=True, plot=str(tmp_path / "none" / "layers.png"))


@pytest.mark.parametrize("config, message", [("foo", "expected α@size"), ("0@32", "must be positive"),
                                             ("1@-4", "must be positive")])
def test_a_bad_configuration_is_named(config, message):
    with pytest.raises(SystemExit, match=f"configuration '{config}': .*{message}"):
        bench_layers.run(config=config, calls=1)
