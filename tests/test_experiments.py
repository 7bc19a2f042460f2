"""The paper's experiments (mbnet.experiments) end to end with --tiny, the shallow model and Table 2
against the paper, and the trainer options the tables need (each reaches the model or optimizer,
is recorded in config.json, and resumes bit for bit)."""
import json
import shutil
import signal

import numpy as np
import pytest

from mbnet import _C, experiments, models, train
from mbnet.models import MobileNetV1, ShallowMobileNet
from mbnet.nn import DepthwiseConv2d
from test_train import _arrays, _assert_resume_is_bit_identical, _tiny_cifar

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return _tiny_cifar(tmp_path_factory.mktemp("cifar"))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The data cache in a temp dir, curves.png not drawn (the trainer's tests draw it; matplotlib
    would be half of the sweep's time), the thread count restored."""
    threads = _C.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MBNET_DATA", raising=False)
        mp.setenv("MBNET_CACHE", str(tmp_path_factory.mktemp("cache")))
        mp.setattr("mbnet.plot.plot_curves", lambda metrics, path: path.write_bytes(PNG))
        yield mp
    _C.set_num_threads(threads)


def _sweep(tiny_data, out, *extra, on_step=None):
    return experiments.main(["--tiny", "--threads", "1", "--data-dir", str(tiny_data), "--out", str(out), *extra],
                            on_step=on_step)


@pytest.fixture(scope="module")
def sweep(tiny_data, env, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    assert _sweep(tiny_data, out) == 0
    return out


def _runs(out):
    return sorted(p.name for p in (out / "runs").iterdir())


def test_tiny_sweep_writes_runs_manifest_results_and_figures(sweep):
    # 16 grid points (Tables 6 and 7 and narrow are among them) + conv + shallow + 2 more seeds + no dw decay
    # + the ablation's cutout, mixup, CutMix, random-resized crop and progressive resizing (its no dw decay
    # row is the one above)
    runs = _runs(sweep)
    assert len(runs) == 26 and "shallow-a0.125-r16-s0" in runs and "conv-a0.0625-r16-s0" in runs
    dw = json.loads((sweep / "runs" / "mobilenet-a0.125-r16-s0-dw-weight-decay-0" / "config.json").read_text())
    assert dw["dw_weight_decay"] == 0 and dw["weight_decay"] == 5e-4 and dw["alpha"] == 0.125
    cutmix = json.loads((sweep / "runs" / "mobilenet-a0.125-r16-s0-cutmix-1" / "config.json").read_text())
    assert (cutmix["cutmix"], cutmix["mixup"], cutmix["cutout"], cutmix["epochs"]) == (1.0, 0.0, 0.0, 1)
    for name in runs:
        d = sweep / "runs" / name
        assert {"config.json", "metrics.jsonl", "last.npz", "latency.json"} <= {p.name for p in d.iterdir()}, name
    manifest = json.loads((sweep / "manifest.json").read_text())
    assert manifest["settings"]["epochs"] == 1 and manifest["settings"]["threads"] == 1
    assert manifest["tables"] == list(experiments.TABLES)
    assert sorted(manifest["runs"]) == runs and all(r["state"] == "done" for r in manifest["runs"].values())
    assert manifest["runs"]["shallow-a0.125-r16-s0"]["options"][:2] == ["--arch", "shallow"]

    doc = json.loads((sweep / "results.json").read_text())
    assert set(doc["tables"]) == set(experiments.TABLES)
    for name, table in doc["tables"].items():
        for row in table["rows"]:
            cfg = json.loads((sweep / "runs" / row["run"] / "config.json").read_text())
            want = train.build_model(cfg).summary(show=False)
            assert (row["mult_adds"], row["params"]) == (want["mult_adds"], want["params"]), row["run"]
            last = experiments.read_metrics(sweep / "runs" / row["run"])[-1]
            assert row["accuracy"] == last["tta_test_acc"] and row["accuracy_is"] == "EMA + flip TTA"
            assert row["batch_1_ms"] > 0 and row["batch_128_ms"] > 0 and row["threads"] == 1
            assert row["engine"] in ("plan", "autograd") and row["train_time_s"] > 0
    t4 = doc["tables"]["table4"]["rows"]
    assert [r["arch"] for r in t4] == ["conv", "mobilenet"] and t4[0]["mult_adds"] > 4 * t4[1]["mult_adds"]
    assert t4[1]["delta"] == pytest.approx(t4[1]["accuracy"] - t4[0]["accuracy"])
    assert t4[0]["paper"] == {"model": "Conv MobileNet", "accuracy": 71.7, "mult_adds_M": 4866, "params_M": 29.3}
    noise = doc["noise"]
    accs = [r["accuracy"] for r in doc["tables"]["noise"]["rows"]]
    assert noise["accuracies"] == accs and noise["spread"] == max(accs) - min(accs)
    for row in doc["tables"]["table6"]["rows"][1:] + doc["tables"]["ablation"]["rows"][1:]:
        assert row["within_noise"] == (abs(row["delta"]) < noise["spread"])
    ablation = doc["tables"]["ablation"]["rows"]
    assert [r["run"] for r in ablation] == ["mobilenet-a0.125-r16-s0"] + [
        "mobilenet-a0.125-r16-s0" + "".join("-" + x.lstrip("-") for x in extra) for _, extra in experiments.ablation_rows(16)]
    prog = json.loads((sweep / "runs" / "mobilenet-a0.125-r16-s0-progressive-resize-8" / "config.json").read_text())
    assert (prog["progressive_resize"], prog["resolution"]) == (8, 16)

    md = (sweep / "results.md").read_text()
    for title in ("Table 4", "Table 5", "Table 6", "Table 7", "Figures 4 and 5", "Weight decay on the depthwise",
                  "Noise band", "Ablation: the default recipe plus one part"):
        assert f"## {title}" in md
    assert "Shallow MobileNet: 65.3%, -3.1 pts, 307M, 2.9M" in md and "spread" in md
    assert "| shallow α=0.125 | " in md
    for png in experiments.FIGURES.values():
        data = (sweep / png).read_bytes()
        assert data[:8] == PNG and len(data) > 5000, png


def test_a_second_invocation_skips_finished_runs(sweep, tiny_data, capsys):
    stamps = {name: (sweep / "runs" / name / "last.npz").stat().st_mtime_ns for name in _runs(sweep)}
    capsys.readouterr()
    assert _sweep(tiny_data, sweep) == 0
    assert "mbnet.experiments: training" not in capsys.readouterr().err
    assert stamps == {name: (sweep / "runs" / name / "last.npz").stat().st_mtime_ns for name in _runs(sweep)}
    # other settings would mix two recipes in one sweep
    assert _sweep(tiny_data, sweep, "--epochs", "2") == 2
    assert "other settings: epochs 1 (now 2)" in capsys.readouterr().err


def test_an_interrupted_sweep_resumes_bit_for_bit(sweep, tiny_data, tmp_path, capsys):
    out = tmp_path / "s"

    def stop_at_2(step):
        if step == 2:
            signal.raise_signal(signal.SIGINT)

    assert _sweep(tiny_data, out, "table5", on_step=stop_at_2) == 130  # mid-epoch in the first run
    narrow = "mobilenet-a0.09375-r16-s0"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tables"] == ["table5"] and manifest["runs"][narrow]["state"] == "interrupted"
    assert "| narrow α=0.09375 | interrupted |" in (out / "results.md").read_text()
    assert "run the same command again" in capsys.readouterr().err
    assert _sweep(tiny_data, out, "table5") == 0
    err = capsys.readouterr().err
    assert f"resuming {narrow}" in err and "training shallow-a0.125-r16-s0" in err
    assert _runs(out) == [narrow, "shallow-a0.125-r16-s0"]
    for name in _runs(out):  # the same runs as the unbroken sweep's
        a, b = _arrays(out / "runs" / name / "last.npz"), _arrays(sweep / "runs" / name / "last.npz")
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name}: {k}")


def test_a_diverged_run_is_recorded_and_skipped(tiny_data, env, tmp_path, capsys):
    out = tmp_path / "s"
    assert _sweep(tiny_data, out, "table5", "--train-args", "--lr 1e30") == 3
    manifest = json.loads((out / "manifest.json").read_text())
    assert [r["state"] for r in manifest["runs"].values()] == ["diverged", "diverged"]
    assert "| shallow α=0.125 | diverged |" in (out / "results.md").read_text()
    capsys.readouterr()
    assert _sweep(tiny_data, out, "table5", "--train-args", "--lr 1e30") == 3
    assert "skipping shallow-a0.125-r16-s0: it diverged" in capsys.readouterr().err
    shutil.rmtree(out / "runs" / "shallow-a0.125-r16-s0")  # deleted: tried again
    assert _sweep(tiny_data, out, "table5", "--train-args", "--lr 1e30") == 3
    err = capsys.readouterr().err
    assert "training shallow-a0.125-r16-s0" in err and "skipping mobilenet-a0.09375-r16-s0" in err


def test_report_only_trains_nothing_and_shows_pending_rows(tiny_data, env, tmp_path):
    out = tmp_path / "s"
    assert _sweep(tiny_data, out, "table5", "--report-only") == 0
    assert not (out / "runs").exists()
    md = (out / "results.md").read_text()
    assert "| shallow α=0.125 | pending |" in md and "Noise band**: not run yet" in md
    rows = json.loads((out / "results.json").read_text())["tables"]["table5"]["rows"]
    assert [r["state"] for r in rows] == ["pending", "pending"] and rows[1]["params"] > 0
    assert all((out / png).read_bytes()[:8] == PNG for png in experiments.FIGURES.values())


def test_a_sweep_with_val_split_says_it_reports_the_held_out_accuracy(tiny_data, env, tmp_path, capsys):
    """--train-args '--val-split F' (options chosen without the test split): every run evaluates on
    the held-out part of train, and the report and the trainer's lines name that accuracy instead
    of the test split's."""
    out = tmp_path / "val"
    capsys.readouterr()
    assert _sweep(tiny_data, out, "table5", "--train-args", "--val-split 0.25") == 0
    err = capsys.readouterr().err
    assert " held-out images, " in err and " | held-out loss " in err and "final epoch: held-out accuracy " in err
    assert " test images" not in err and "test loss" not in err and "test accuracy" not in err
    for run in _runs(out):
        assert json.loads((out / "runs" / run / "config.json").read_text())["val_split"] == 0.25
    md = (out / "results.md").read_text()
    assert "| model | held-out accuracy |" in md and "| model | test accuracy |" not in md
    assert "Held-out accuracy (the fixed 0.25 of each class of the train split" in md
    assert "the test split is not read" in md


def test_bad_options_are_one_line(tiny_data, env, tmp_path, capsys):
    assert _sweep(tiny_data, tmp_path / "a", "--train-args", "--schedule onecycle --gamma 0.5") == 2
    err = capsys.readouterr().err
    assert "--milestones and --gamma apply to --schedule step" in err and "--train-args" in err
    assert not (tmp_path / "a").exists()
    assert _sweep(tiny_data, tmp_path / "a", "--train-args", "--lr '0.1") == 2
    assert "--train-args \"--lr '0.1\": No closing quotation" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # it meant sweeps/tiny in the working directory
        _sweep(tiny_data, "", "table5")
    assert "--out is empty" in capsys.readouterr().err
    # what the sweep sets for each run: given in --train-args too, it won, and every row was mislabeled
    for given in ("--alpha 0.5", "--alpha=1.0 --lr 0.1", "--seed 3 --epochs 2"):
        assert _sweep(tiny_data, tmp_path / "a", "--train-args", given) == 2
        err = capsys.readouterr().err
        assert "which the sweep sets for each run" in err and not (tmp_path / "a").exists()
    assert "sets --epochs, --seed," in err
    with pytest.raises(SystemExit) as e:
        _sweep(tiny_data, tmp_path / "b", "table8")
    assert e.value.code == 2 and "unknown table 'table8'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# The shallow model and Table 2


def test_shallow_and_narrow_counts_match_table_5():
    def totals(model):
        t = model.summary(show=False)
        return t["mult_adds"], t["params"]

    full, shallow = MobileNetV1(1.0, 1000, 224), ShallowMobileNet(1.0, 1000, 224)
    # MobileNetV1 less five of Table 3's 14x14x512 separable layers (and their BatchNorms)
    madds, params = totals(shallow)
    assert totals(full)[0] - madds == 5 * 14 * 14 * (3 * 3 * 512 + 512 * 512)
    assert totals(full)[1] - params == 5 * (3 * 3 * 512 + 512 * 512 + 4 * 512)
    assert (round(madds / 1e6), round(params / 1e6, 1)) == (307, 2.9), (madds, params)
    madds, params = totals(MobileNetV1(0.75, 1000, 224))
    assert (round(madds / 1e6), round(params / 1e6, 1)) == (325, 2.6), (madds, params)
    # eight blocks: the five removed are 512 channels at stride 1
    assert [b.dw.stride for b in list(shallow.features)[2:]] == [1, 2, 1, 2, 1, 2, 2, 1]
    assert [b.pw.weight.shape[1] for b in list(shallow.features)[2:]] == [64, 128, 128, 256, 256, 512, 1024, 1024]


def test_shallow_round_trips_through_config_and_weights_files(tmp_path):
    model = ShallowMobileNet(0.25, num_classes=7, input_size=16, act="relu6", seed=3)
    assert model.config()["arch"] == "shallow"
    again = models.from_config(model.config(), seed=3)
    assert type(again) is ShallowMobileNet and again.config() == model.config()
    model.save(tmp_path / "w.npz")
    loaded = models.load(tmp_path / "w.npz")
    assert type(loaded) is ShallowMobileNet and len(loaded.features) == 10
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[k], v, err_msg=k)


# The paper's Table 2 (MobileNetV1, 224 px, 1000 classes): % of mult-adds, % of parameters.
TABLE_2 = {"Conv 1x1": (94.86, 74.59), "Conv DW 3x3": (3.06, 1.06), "Conv 3x3 (full)": (1.19, 0.02),
           "Fully connected": (0.18, 24.33)}


def test_summary_prints_table_2(capsys):
    t = MobileNetV1(1.0, 1000, 224).summary()
    out = capsys.readouterr().out
    by_type = t["by_type"]
    assert list(by_type) == list(TABLE_2)
    madds = sum(v["mult_adds"] for v in by_type.values())
    weights = sum(v["weights"] for v in by_type.values())
    assert madds == t["mult_adds"]  # BN, pooling and activations count no mult-adds
    assert t["params"] - weights == t["buffers"] + 1000  # BN gamma, beta (as many as mean, var) and the FC bias
    for kind, (paper_madds, paper_weights) in TABLE_2.items():
        got_m = round(100 * by_type[kind]["mult_adds"] / madds, 2)
        got_w = round(100 * by_type[kind]["weights"] / weights, 2)
        assert got_w == paper_weights, f"{kind}: {got_w}% of the weights, the paper {paper_weights}%"
        if kind == "Conv 3x3 (full)":
            # the paper prints 1.19%: the stem's 10.84M of 568.7M is 1.91%, digits swapped (the four
            # printed shares sum to 99.29%; with 1.91% they make 100%)
            assert got_m == 1.91 and by_type[kind]["mult_adds"] == 112 * 112 * 3 * 3 * 3 * 32
            assert round(sum(m for m, _ in TABLE_2.values()), 2) == 99.29
        else:
            assert got_m == paper_madds, f"{kind}: {got_m}% of the mult-adds, the paper {paper_madds}%"
        assert f"{got_m:.2f}%" in out and f"{got_w:.2f}%" in out
    assert "Type (Table 2)" in out


# ----------------------------------------------------------------------------------------------
# Trainer options


NEW_OPTIONS = ["--arch", "shallow", "--act", "relu6", "--stem-stride", "2", "--schedule", "step",
               "--milestones", "0.25", "0.5", "--gamma", "0.5", "--warmup", "0", "--dw-weight-decay", "0"]


def _train_args(tiny_data, out, *extra):
    return ["--threads", "1", "--alpha", "0.25", "--resolution", "16", "--batch-size", "32", "--limit-train", "96",
            "--limit-test", "32", "--ema-decay", "0.9", "--no-tta", "--data-dir", str(tiny_data), "--out", str(out),
            *extra]


def test_new_train_options_reach_the_model_and_optimizer(tiny_data, env, tmp_path):
    parser = train.build_parser()
    argv = _train_args(tiny_data, tmp_path, *NEW_OPTIONS)
    r = train.start_run(parser.parse_args(argv), argv, parser, tmp_path)
    m = r.model
    assert type(m) is ShallowMobileNet and m.features[0].stride == 2 and m.features[5].bn2.act == "relu6"
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert {k: cfg[k] for k in ("arch", "act", "stem_stride", "milestones", "gamma", "dw_weight_decay")} == \
        {"arch": "shallow", "act": "relu6", "stem_stride": 2, "milestones": [0.25, 0.5], "gamma": 0.5,
         "dw_weight_decay": 0.0}
    total = 50 * r.spe
    first = int(np.ceil(0.25 * total))  # the first step at or past the first milestone
    assert [r.schedule(s) for s in (0, first - 1, first, total // 2, total - 1)] == \
        pytest.approx([r.cfg["lr"] * f for f in (1, 1, 0.5, 0.25, 0.25)])
    # weight decay: 0 on the depthwise filters, 5e-4 on the other weights, none on BN and biases
    dw = {id(mod.weight) for _, mod in m.named_modules() if isinstance(mod, DepthwiseConv2d)}
    assert len(dw) == 8
    for p, wd in zip(r.opt.params, r.opt.decays):
        assert wd == (0.0 if id(p) in dw else 5e-4 if p.data.ndim > 1 else 0.0)
    # one step with zero gradients: only decay moves a weight
    before = {id(p): p.data.copy() for p in r.opt.params}
    for p in r.opt.params:
        p.grad = np.zeros_like(p.data)
    r.opt.lr = 0.1
    r.opt.step()
    for p in r.opt.params:
        moved = not np.array_equal(p.data, before[id(p)])
        assert moved == (id(p) not in dw and p.data.ndim > 1)


def test_defaults_keep_todays_recipe(tmp_path):
    cfg = train.make_config(train.build_parser().parse_args([]))
    assert (cfg["arch"], cfg["act"], cfg["stem_stride"], cfg["dw_weight_decay"]) == ("mobilenet", "relu", 1, 5e-4)
    assert cfg["milestones"] is None and cfg["gamma"] is None  # onecycle has none
    step = train.make_config(train.build_parser().parse_args(["--schedule", "step", "--resolution", "96"]))
    assert step["milestones"] == [0.5, 0.75] and step["gamma"] == 0.1 and step["stem_stride"] == 2
    # a config saved before these options: MobileNetV1 with relu, the stem stride by size, weight decay for all
    old = {"alpha": 0.25, "num_classes": 10, "resolution": 32, "dropout": 0.0, "seed": 0, "classes": None,
           "mean": (0, 0, 0), "std": (1, 1, 1), "weight_decay": 1e-3, "schedule": "step"}
    model = train.build_model(old)
    assert type(model) is MobileNetV1 and model.act == "relu" and model.stem_stride == 1
    assert set(train.weight_decays(model, old)) == {1e-3}
    assert train.schedule_options(old) == {"milestones": (0.5, 0.75), "gamma": 0.1}


@pytest.mark.parametrize("argv,message", [
    (["--milestones", "0.5"], "--milestones and --gamma apply to --schedule step, not onecycle"),
    (["--schedule", "step", "--milestones", "0.7", "0.3"], "--milestones must increase"),
    (["--schedule", "step", "--milestones", "1.5"], "argument --milestones: must be a finite number in (0, 1)"),
    (["--dw-weight-decay", "-1"], "argument --dw-weight-decay"),
    (["--arch", "resnet"], "argument --arch: invalid choice"),
    (["--stem-stride", "3"], "argument --stem-stride: invalid choice"),
])
def test_bad_new_options_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_resume_with_the_new_options_is_bit_identical(tiny_data, env, tmp_path):
    common = [*NEW_OPTIONS, "--epochs", "2"]
    _assert_resume_is_bit_identical(_train_args(tiny_data, tmp_path / "a", *common),
                                    _train_args(tiny_data, tmp_path / "b", *common), tiny_data)


def test_training_time_is_flagged_unless_one_quiet_machine_measured_it(sweep):
    """The sweep's runs record the CPU per epoch and per latency file; a run trained on several
    machines, with the cores shared, or before the trainer recorded either, is marked †."""
    doc = json.loads((sweep / "results.json").read_text())
    row = doc["tables"]["table6"]["rows"][0]
    assert len(row["train_machines"]) == 1 and row["latency_machine"] == row["train_machines"][0]
    flag = experiments.not_one_quiet_machine
    one = {"train_machines": ["Xeon, avx512"], "shared_epochs": 0}
    assert not flag(one)
    assert flag({**one, "shared_epochs": 2})
    assert flag({**one, "train_machines": ["EPYC, avx512", "Xeon, avx512"]})
    assert flag({**one, "train_machines": ["unknown", "Xeon, avx512"]}) and flag({})


def test_measure_latency_times_every_finished_run_again_in_rounds(tiny_data, env, tmp_path, capsys):
    """--measure-latency trains nothing and rewrites every finished run's latency.json with the median
    of TINY_ROUNDS rounds; the report says how the latencies were measured."""
    out = tmp_path / "s"
    assert _sweep(tiny_data, out, "table5") == 0
    md = (out / "results.md").read_text()
    assert "measured after each run's training" in md
    before = {r: json.loads((out / "runs" / r / "latency.json").read_text()) for r in _runs(out)}
    assert all(lat["rounds"] == 1 for lat in before.values())
    stamps = {r: (out / "runs" / r / "last.npz").stat().st_mtime_ns for r in _runs(out)}
    capsys.readouterr()
    assert _sweep(tiny_data, out, "--measure-latency") == 0
    err = capsys.readouterr().err
    assert "training" not in err and f"latency round {experiments.TINY_ROUNDS}/{experiments.TINY_ROUNDS}: 2 runs" in err
    assert stamps == {r: (out / "runs" / r / "last.npz").stat().st_mtime_ns for r in _runs(out)}
    manifest = json.loads((out / "manifest.json").read_text())
    rows = json.loads((out / "results.json").read_text())["tables"]["table5"]["rows"]
    for row in rows:
        lat = json.loads((out / "runs" / row["run"] / "latency.json").read_text())
        assert lat["rounds"] == experiments.TINY_ROUNDS and lat["repeats"] == {"1": 3, "128": 2}
        assert lat["batch_1_ms"] > 0 and lat["batch_128_ms"] > lat["batch_1_ms"] and lat["threads"] == 1
        assert manifest["runs"][row["run"]]["latency"] == lat
        assert (row["batch_1_ms"], row["batch_128_ms"], row["latency_rounds"]) == (
            lat["batch_1_ms"], lat["batch_128_ms"], experiments.TINY_ROUNDS)
    assert f"median over {experiments.TINY_ROUNDS} rounds" in (out / "results.md").read_text()


def test_the_latency_figure_has_one_point_per_network(tmp_path, monkeypatch):
    """The noise band's seeds and the recipe variants are the grid's network: one point, the first."""
    drawn = {}
    monkeypatch.setattr("mbnet.plot.plot_points", lambda series, path, **kw: drawn.__setitem__(path.name, series))

    def row(run, arch, alpha, ms):
        return {"run": run, "arch": arch, "alpha": alpha, "resolution": 32, "mult_adds": int(alpha * 1e6),
                "params": 1, "accuracy": 0.5, "batch_1_ms": ms, "batch_128_ms": 128 * ms, "engine": "plan",
                "threads": 2}

    measured = [row("mobilenet-a1-r32-s0", "mobilenet", 1.0, 1.0), row("mobilenet-a1-r32-s1", "mobilenet", 1.0, 2.0),
                row("mobilenet-a1-r32-s0-dw-weight-decay-0", "mobilenet", 1.0, 3.0),
                row("conv-a1-r32-s0", "conv", 1.0, 4.0), row("mobilenet-a0.5-r32-s0", "mobilenet", 0.5, 0.5)]
    experiments.write_figures(tmp_path, measured[:1] + measured[4:], measured)
    series = drawn[experiments.FIGURES["latency"]]
    assert series["batch 1"] == [(1_000_000, 1.0, ""), (1_000_000, 4.0, "conv"), (500_000, 0.5, "")]
    assert [ms for _, ms, _ in series["batch 128, per image"]] == [1.0, 4.0, 0.5]
