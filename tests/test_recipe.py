"""Mixup, CutMix and the --recipe presets: the batch draws (shape, dtype, determinism in (seed,
epoch, step), their defining property, MPI shards), the loss and accuracy of a mixed batch, the
presets' values and overrides, a bit-identical resume with mixing on, and a --branch that
switches mixing off."""
import json
import signal

import numpy as np
import pytest

from mbnet import Tensor, data, train
from mbnet.functional import cross_entropy
from test_train import _args, _arrays, _meta, _assert_resume_is_bit_identical, _tiny_cifar


def _images(n=16, s=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, s, s, 3), dtype=np.uint8), rng.integers(0, 10, n)


def _loader(x, y, **kw):
    return data.Loader(x, y, 8, np.full(3, 0.5), np.full(3, 0.25), train=True, seed=3, pad=0, hflip=False, **kw)


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_mix_draw_is_a_pure_function_of_seed_epoch_step(kind):
    opts = {kind: 1.0}
    d = data.mix_draw(1, 2, 3, 16, 8, **opts)
    assert d.kind == kind and 0 <= d.lam <= 1 and sorted(d.partner) == list(range(16))
    again = data.mix_draw(1, 2, 3, 16, 8, **opts)
    assert d.lam == again.lam and d.box == again.box and np.array_equal(d.partner, again.partner)
    others = [data.mix_draw(*k, 16, 8, **opts) for k in ((2, 2, 3), (1, 3, 3), (1, 2, 4))]
    assert all(o.lam != d.lam for o in others)  # seed, epoch and step each change the draw
    assert data.mix_draw(1, 2, 3, 16, 8) is None  # both off


def test_both_on_picks_each_kind_per_batch():
    kinds = {data.mix_draw(0, 0, i, 8, 8, mixup=0.2, cutmix=1.0).kind for i in range(20)}
    assert kinds == {"mixup", "cutmix"}


def test_mixup_batch_is_the_convex_combination_and_weights_sum_to_one():
    x, y = _images()
    plain, mixed = _loader(x, y), _loader(x, y, mixup=0.4)
    for step in range(2):
        (xp, yp), (xm, ym) = plain.batch(1, step), mixed.batch(1, step)
        assert xm.shape == xp.shape and xm.dtype == np.float32 and xm.flags.c_contiguous
        d = data.mix_draw(3, 1, step, 8, 8, mixup=0.4)
        assert isinstance(ym, data.Mixed) and ym.lam == d.lam and 0 < ym.lam < 1
        assert ym.lam + (1 - ym.lam) == 1.0 and ym.a.dtype == ym.b.dtype == np.int64
        np.testing.assert_array_equal(ym.a, yp)
        np.testing.assert_array_equal(ym.b, yp[d.partner])
        np.testing.assert_allclose(xm, ym.lam * xp + (1 - ym.lam) * xp[d.partner], rtol=1e-6, atol=1e-6)
        again = mixed.batch(1, step)  # the same batch when asked again (a resumed run)
        np.testing.assert_array_equal(again[0], xm)


def test_cutmix_pastes_a_box_whose_area_fraction_is_its_label_weight():
    x, y = _images(s=16)
    plain, mixed = _loader(x, y), _loader(x, y, cutmix=1.0)
    seen_clipped = False
    for step in range(2):
        for epoch in range(6):
            (xp, yp), (xm, ym) = plain.batch(epoch, step), mixed.batch(epoch, step)
            assert xm.shape == xp.shape and xm.dtype == np.float32
            d = data.mix_draw(3, epoch, step, 8, 16, cutmix=1.0)
            top, left, h, w = d.box
            inside = np.zeros((16, 16), bool)
            inside[top:top + h, left:left + w] = True
            np.testing.assert_array_equal(xm[:, inside], xp[d.partner][:, inside])
            np.testing.assert_array_equal(xm[:, ~inside], xp[:, ~inside])
            assert 1 - ym.lam == pytest.approx(inside.mean()) and ym.lam == d.lam
            np.testing.assert_array_equal(ym.b, yp[d.partner])
            seen_clipped |= h < w or w < h  # a box cut by the image border
    assert seen_clipped


@pytest.mark.parametrize("opts", [{"mixup": 0.4}, {"cutmix": 1.0}, {"mixup": 0.4, "cutmix": 1.0, "cutout": 3},
                                  {"cutmix": 1.0, "trivial": True}])
def test_mpi_shards_are_slices_of_the_whole_mixed_batch(opts):
    x, y = _images(n=24)
    whole = _loader(x, y, **opts).batch(2, 1)
    parts = [_loader(x, y, shard=(r, 3), **opts).batch(2, 1) for r in range(3)]
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), whole[0])
    for field in ("a", "b"):
        np.testing.assert_array_equal(np.concatenate([getattr(p[1], field) for p in parts]), getattr(whole[1], field))
    assert {p[1].lam for p in parts} == {whole[1].lam}


@pytest.mark.parametrize("opts", [{"cutmix": 1.0}, {"mixup": 0.4, "cutmix": 1.0}])
def test_mix_prob_leaves_a_fraction_of_batches_unmixed_and_mixes_the_rest_as_prob_1(opts):
    keys = [(epoch, i) for epoch in range(4) for i in range(100)]
    draws = [data.mix_draw(5, *k, 16, 8, prob=0.3, **opts) for k in keys]
    assert 0.25 < sum(d is not None for d in draws) / len(draws) < 0.35  # a coin per batch, p = 0.3
    for k, d in zip(keys, draws):
        again, every = data.mix_draw(5, *k, 16, 8, prob=0.3, **opts), data.mix_draw(5, *k, 16, 8, **opts)
        assert (again is None) == (d is None)
        if d is not None:  # mixed as with prob 1
            assert (d.kind, d.lam, d.box) == (every.kind, every.lam, every.box) == (again.kind, again.lam, again.box)
            np.testing.assert_array_equal(d.partner, every.partner)
    x, y = _images(n=80, s=8)  # the loader: a mixed batch is prob 1's, an unmixed one the plain loader's
    some, always, never = _loader(x, y, mix_prob=0.3, **opts), _loader(x, y, **opts), _loader(x, y)
    seen = set()
    for i in range(10):
        got = some.batch(0, i)
        mixed = data.mix_draw(3, 0, i, 8, 8, prob=0.3, **opts) is not None
        seen.add(mixed)
        assert isinstance(got[1], data.Mixed) == mixed
        np.testing.assert_array_equal(got[0], (always if mixed else never).batch(0, i)[0])
    assert seen == {True, False}


def test_mix_epochs_mixes_the_epochs_before_it_and_leaves_the_rest_as_unmixed_loaders_make_them():
    x, y = _images(n=16, s=8)
    for kw in ({"cutmix": 1.0}, {"mixup": 0.4}, {"mixup": 0.4, "cutmix": 1.0}):
        until, always, never = _loader(x, y, mix_epochs=2, **kw), _loader(x, y, **kw), _loader(x, y)
        for epoch in range(4):
            for i in range(2):
                got, want = until.batch(epoch, i), (always if epoch < 2 else never).batch(epoch, i)
                assert isinstance(got[1], data.Mixed) == (epoch < 2)
                np.testing.assert_array_equal(got[0], want[0])
                if epoch < 2:
                    assert got[1].lam == want[1].lam
                    np.testing.assert_array_equal(got[1].b, want[1].b)
                np.testing.assert_array_equal(np.asarray(got[1].a if epoch < 2 else got[1]),
                                              np.asarray(want[1].a if epoch < 2 else want[1]))
    cfg = {"resolution": 32, "epochs": 300, "mix_until": 0.9, "cutmix": 1.0}
    assert train.augmentation(cfg)["mix_epochs"] == 270
    assert train.augmentation({"resolution": 32, "epochs": 50})["mix_epochs"] is None  # every epoch (runs saved before the option)


def test_mixed_loss_and_accuracy():
    logits = Tensor(np.array([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]], np.float32))
    a, b = np.array([0, 2]), np.array([1, 1])
    loss, correct = train.batch_loss(logits, data.Mixed(a, b, 0.25), 0.1)
    want = 0.25 * cross_entropy(logits, a, 0.1).data + 0.75 * cross_entropy(logits, b, 0.1).data
    assert float(loss.data) == pytest.approx(float(want), rel=1e-6)
    assert correct == pytest.approx(0.25 * 1 + 0.75 * 1)  # row 0 hits a, row 1 hits b
    assert train.batch_loss(logits, a, 0.0)[1] == 1


def _parse(*argv):
    parser = train.build_parser()
    return train.make_config(train.parse_args(parser, list(argv)))


def test_presets_resolve_to_their_documented_values_and_options_override_them():
    default = _parse()
    assert default["recipe"] == "default" and default == {**_parse("--recipe", "default")}
    for name, preset in train.RECIPES.items():
        cfg = _parse("--recipe", name)
        assert cfg["recipe"] == name
        assert {k: cfg[k] for k in preset} == preset
        assert {k: v for k, v in cfg.items() if k not in preset and k != "recipe" and k != "warmup"} == \
            {k: v for k, v in default.items() if k not in preset and k != "recipe" and k != "warmup"}
        for k, v in preset.items():  # each value appears in --help
            shown = f"{v:g}" if isinstance(v, float) else str(v)
            assert f"--{k.replace('_', '-')} {shown}" in train._recipe_help(), (name, k)
    rec = _parse("--recipe", "record")
    assert (rec["epochs"], rec["schedule"], rec["cutmix"], rec["warmup"]) == (300, "cosine", 1.0, 15.0)
    # an explicit option wins, also when it equals the option's own default
    over = _parse("--recipe", "record", "--epochs", "50", "--cutmix", "0", "--schedule", "onecycle")
    assert (over["epochs"], over["cutmix"], over["schedule"], over["dw_weight_decay"]) == (50, 0.0, "onecycle", 5e-4)
    # --help states what each recipe's runs reached (README's Results)
    assert all(f in train._recipe_help() for f in ("fast reached 90.16%%", "90.31%%", "90.92%%"))


@pytest.mark.parametrize("argv,message", [
    (["--recipe", "slow"], "argument --recipe: invalid choice"),
    (["--mixup", "-1"], "argument --mixup"),
    (["--cutmix", "nan"], "argument --cutmix"),
    (["--recipe", "record", "--warmup", "400"], "--warmup 400.0 is longer than --epochs 300"),
    (["--mix-until", "0.5"], "--mix-until 0.5 needs --mixup or --cutmix"),
    (["--mix-prob", "0.5"], "--mix-prob 0.5 needs --mixup or --cutmix"),
    (["--mixup", "1", "--mix-prob", "1.5"], "argument --mix-prob"),
    (["--cutmix", "1", "--mix-until", "0"], "argument --mix-until"),
])
def test_bad_recipe_and_mix_options_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _tiny_cifar(tmp_path_factory.mktemp("cifar"), n_per_batch=32)


def test_resume_with_mixup_and_cutmix_is_bit_identical(tiny, tmp_path, capsys):
    common = ["--epochs", "2", "--limit-train", "128", "--limit-test", "32", "--mixup", "0.4", "--cutmix", "1",
              "--cutout", "0.25", "--recipe", "fast", "--mix-until", "0.5", "--mix-prob", "0.7"]  # epoch 2 unmixed
    _assert_resume_is_bit_identical(_args(tiny, tmp_path / "a", *common), _args(tiny, tmp_path / "b", *common), tiny)
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert (cfg["recipe"], cfg["epochs"], cfg["mixup"], cfg["cutmix"], cfg["cutout"], cfg["dw_weight_decay"],
            cfg["mix_until"], cfg["mix_prob"]) == ("fast", 2, 0.4, 1.0, 0.25, 5e-4, 0.5, 0.7)
    metrics = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= m["train_acc"] <= 1 and np.isfinite(m["train_loss"]) for m in metrics)
    assert [json.loads(line)["train_acc"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()] \
        == [m["train_acc"] for m in metrics]


def test_branch_that_switches_cutmix_off_ends_as_the_unbroken_run_with_the_switch(tiny, tmp_path, capsys):
    common = ["--epochs", "2", "--limit-train", "128", "--limit-test", "32", "--cutmix", "1"]
    straight, always, branch = tmp_path / "straight", tmp_path / "always", tmp_path / "branch"
    assert train.main(_args(tiny, straight, *common, "--mix-until", "0.5")) == 0  # epoch 2 unmixed
    stop = lambda step: step == 2 and signal.raise_signal(signal.SIGINT)  # noqa: E731
    assert train.main(_args(tiny, always, *common), on_step=stop) == 130  # CutMix every epoch, stopped in epoch 1
    ckpt = str(always / "last.npz")
    argv = ["--branch", ckpt, "--out", str(branch), "--data-dir", str(tiny), "--threads", "1"]
    assert train.main(argv + ["--mix-until", "0.5", "--eval-every", "2"]) == 0
    assert "branching" in capsys.readouterr().err
    a, b = _arrays(straight / "last.npz"), _arrays(branch / "last.npz")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    rows = [json.loads(line) for line in (branch / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_acc"] for r in rows] == \
        [json.loads(line)["train_acc"] for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert "test_acc" not in rows[0] and "test_acc" in rows[1]  # --eval-every 2 from the branch on
    cfg = json.loads((branch / "config.json").read_text())
    assert (cfg["mix_until"], cfg["eval_every"], cfg["cutmix"]) == (0.5, 2, 1.0)
    assert _meta(always / "last.npz")["epoch"] == 0  # mid-epoch 1
    assert cfg["branched_from"] == [{"checkpoint": ckpt, "epoch": 0, "batch": _meta(always / "last.npz")["batch"],
                                     "changed": {"mix_until": 0.5, "eval_every": 2}}]
    assert json.loads((always / "config.json").read_text())["mix_until"] == 1.0  # the source is left as it was

    # refused, one line each, and no run directory left behind
    for extra, message in [(["--mix-until", "0.25"], "disagree from epoch 1 on, and"),  # round(0.25 x 2) = 0
                           (["--lr", "0.5", "--cutout", "0.25"], "--cutout, --lr would change the epochs already"),
                           (["--resume"], "--branch starts a new run; it cannot be combined with --resume")]:
        out = tmp_path / "refused"
        status = train.main(["--branch", ckpt, "--out", str(out), "--data-dir", str(tiny), *extra]) \
            if extra != ["--resume"] else pytest.raises(SystemExit, train.main, argv + extra).value.code
        assert status == 2 and message in capsys.readouterr().err, extra
        assert not out.exists()
    assert train.main(argv) == 2 and "already holds a run; --branch starts a new one" in capsys.readouterr().err


# ---- progressive resizing -------------------------------------------------------------------

def _area_reference(x, side):
    """float64 area resampling as a matrix product: R[i, j] = |[i s/side, (i+1) s/side) ∩ [j, j+1)| side/s."""
    s = x.shape[1]
    r = np.zeros((side, s))
    for i in range(side):
        for j in range(s):
            r[i, j] = max(0.0, min((i + 1) * s / side, j + 1) - max(i * s / side, j)) * side / s
    return np.einsum("ih,bhwc,jw->bijc", r, x.astype(np.float64), r)


@pytest.mark.parametrize("side", [32, 24, 20, 16, 9, 1])
def test_area_resize_is_the_box_filter_and_keeps_the_mean(side):
    x = np.random.default_rng(side).standard_normal((3, 32, 32, 3)).astype(np.float32)
    y = data.area_resize(x, side)
    assert y.shape == (3, side, side, 3) and y.dtype == np.float32
    np.testing.assert_allclose(y, _area_reference(x, side), rtol=0, atol=2e-6)
    np.testing.assert_allclose(y.mean((1, 2)), x.mean((1, 2)), rtol=0, atol=2e-6)  # every pixel weighs side/s
    index, weight = data.area_taps(32, side)
    np.testing.assert_allclose(weight.sum(1), 1, atol=1e-6)
    np.testing.assert_allclose(np.bincount(index.ravel(), weight.ravel(), 32), side / 32, atol=1e-6)
    const = np.full((1, 32, 32, 3), 0.3, np.float32)
    np.testing.assert_allclose(data.area_resize(const, side), 0.3, atol=1e-6)
    if side == 16:  # halving averages each 2x2 block
        np.testing.assert_allclose(y, x.reshape(3, 16, 2, 16, 2, 3).mean((2, 4)), atol=1e-6)
    with pytest.raises(ValueError, match="side must be in"):
        data.area_taps(32, 33)


def test_train_side_ramps_in_steps_of_8_px_to_the_resolution():
    cfg = {"resolution": 32, "epochs": 40, "progressive_resize": 16, "progressive_until": 0.5}
    assert [train.train_side(cfg, e) for e in range(40)] == [16] * 10 + [24] * 10 + [32] * 20
    cfg = {"resolution": 32, "epochs": 10, "progressive_resize": 12, "progressive_until": 0.8}
    sides = [train.train_side(cfg, e) for e in range(10)]
    assert sides == [12, 12, 16, 16, 16, 24, 24, 24, 32, 32]  # 12 + 20 e / 8, rounded down to 8 px
    assert [train.train_side({"resolution": 32, "epochs": 5}, e) for e in range(5)] == [32] * 5  # off


def test_loader_side_resizes_the_same_batches():
    x, y = _images(n=16, s=8)
    side = lambda epoch: 4 if epoch == 0 else 8  # noqa: E731
    for kw in ({}, {"cutmix": 1.0}, {"mixup": 0.4}):
        full, small = _loader(x, y, **kw), _loader(x, y, side=side, **kw)
        for epoch in (0, 1):
            a, b = full.batch(epoch, 1), small.batch(epoch, 1)
            assert b[0].shape == (8, side(epoch), side(epoch), 3) and b[0].dtype == np.float32
            np.testing.assert_array_equal(b[0], data.area_resize(a[0], side(epoch)))
            np.testing.assert_array_equal(np.asarray(b[1].a if kw else b[1]), np.asarray(a[1].a if kw else a[1]))


def test_progressive_resize_trains_small_first_and_resumes_bit_identically(tiny, tmp_path, capsys):
    common = ["--epochs", "2", "--limit-train", "128", "--limit-test", "32", "--progressive-resize", "8"]
    _assert_resume_is_bit_identical(_args(tiny, tmp_path / "a", *common), _args(tiny, tmp_path / "b", *common), tiny)
    metrics = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [m["train_side"] for m in metrics] == [8, 16]  # the resolution is 16 (SMALL), reached at half the epochs
    assert all(np.isfinite(m["train_loss"]) and "test_acc" in m for m in metrics)
    err = capsys.readouterr().err
    assert "epoch 1/2: train loss" in err and " at 8 px" in err and " at 16 px" not in err
    line1 = [line for line in err.splitlines() if line.startswith("epoch 1/2: train loss")][0]
    assert line1.endswith(" to go")  # the epochs at 16 px counted at 4x the pace of those at 8
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert (cfg["progressive_resize"], cfg["progressive_until"]) == (8, 0.5)


def test_progressive_resize_must_be_below_the_resolution(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--progressive-resize", "32", "--resolution", "32"])
    assert e.value.code == 2 and "--progressive-resize 32 must be smaller than --resolution 32" in capsys.readouterr().err


def test_keep_epochs_keeps_a_checkpoint_a_branch_continues_bit_for_bit(tiny, tmp_path):
    common = ["--epochs", "3", "--limit-train", "128", "--limit-test", "32", "--cutmix", "1"]
    straight, kept, branch = tmp_path / "straight", tmp_path / "kept", tmp_path / "branch"
    assert train.main(_args(tiny, straight, *common, "--mix-until", "0.67")) == 0  # epoch 3 unmixed
    stop = lambda step: step == 3 and signal.raise_signal(signal.SIGINT)  # noqa: E731 (in epoch 2)
    assert train.main(_args(tiny, kept, *common, "--keep-epochs", "1", "3"), on_step=stop) == 130
    assert sorted(p.name for p in kept.glob("*.npz")) == ["epoch-1.npz", "last.npz"]
    assert (_meta(kept / "epoch-1.npz")["epoch"], _meta(kept / "epoch-1.npz")["batch"]) == (1, 0)
    argv = ["--out", str(kept), "--resume", "--data-dir", str(tiny), "--threads", "1", "--keep-epochs", "2"]
    assert train.main(argv) == 0  # --keep-epochs is given anew at --resume: epoch 3's is not kept now
    assert sorted(p.name for p in kept.glob("*.npz")) == ["epoch-1.npz", "epoch-2.npz", "last.npz"]
    assert "keep_epochs" not in json.loads((kept / "config.json").read_text())
    # the kept epoch-1 checkpoint branched with the CutMix switch: the unbroken run with the switch
    argv = ["--branch", str(kept / "epoch-1.npz"), "--out", str(branch), "--data-dir", str(tiny), "--threads", "1"]
    assert train.main(argv + ["--mix-until", "0.67"]) == 0
    a, b = _arrays(straight / "last.npz"), _arrays(branch / "last.npz")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    mixed = _arrays(kept / "last.npz")  # the kept run mixed its third epoch too: other weights
    assert any(not np.array_equal(a[k], mixed[k]) for k in a)
