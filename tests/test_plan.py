"""mbnet.plan: BatchNorm folding and the compiled inference plan, held to the autograd model in eval
mode (float32 tolerance) and to the unfused folded network; its results must not depend on the
thread count or on the batch it runs."""
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import mbnet
from mbnet import _C, models, nn
from mbnet import plan as P

RTOL = 2e-5  # of the largest |logit|: float32 sums over up to 9 * 1024 terms, reordered


def randomize(model, seed=0):
    """Non-trivial BN statistics and affine parameters, and a classifier large enough that the
    logits differ by more than rounding; returns the model in eval mode."""
    rng = np.random.default_rng(seed)
    for _, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.gamma.data.shape[0]
            m.gamma.data[...] = rng.uniform(0.5, 1.5, c)
            m.beta.data[...] = rng.normal(0, 0.3, c)
            m.running_mean[...] = rng.normal(0, 0.3, c)
            m.running_var[...] = rng.uniform(0.5, 2.0, c)
    m = model.classifier
    m.weight.data[...] = rng.normal(0, 0.1, m.weight.shape)
    m.bias.data[...] = rng.normal(0, 0.1, m.bias.shape)
    return model.eval()


def eval_logits(model, x):
    with mbnet.no_grad():
        return model(x).data


def images(n, size, seed=1):
    return np.random.default_rng(seed).standard_normal((n, size, size, 3)).astype(np.float32)


def assert_close(got, want, what):
    scale = np.abs(want).max()
    err = np.abs(got - want).max() / scale
    assert err < RTOL, f"{what}: max error {err:.2e} of max |logit| {scale:.3g}"


@pytest.fixture
def restore_threads():
    threads = _C.get_num_threads()
    yield
    _C.set_num_threads(threads)


# --- folding -------------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha, act, size", [
    (1.0, "relu", 32), (0.5, "relu6", 32), (0.5, "relu", 40), (0.25, "relu6", 40), (0.25, "relu", 32),
])
def test_folded_network_matches_eval_model(alpha, act, size):
    model = randomize(models.MobileNetV1(alpha=alpha, input_size=size, act=act, seed=2))
    x = images(2, size)
    assert_close(P.run_folded(P.fold(model), x), eval_logits(model, x), f"alpha={alpha} {act} {size}px")


def test_folded_conv_mobilenet_matches_eval_model():
    model = randomize(models.ConvMobileNet(alpha=0.25, input_size=32, act="relu6"))
    x = images(2, 32)
    layers = P.fold(model)
    assert [f.kind for f in layers] == ["conv"] * 14 + ["pool", "linear"]
    assert_close(P.run_folded(layers, x), eval_logits(model, x), "ConvMobileNet")


def test_fold_is_bn_in_the_weights():
    """One layer by hand: w * gamma / sqrt(var + eps) and beta - mean * gamma / sqrt(var + eps)."""
    model = randomize(models.MobileNetV1(alpha=0.25, input_size=32))
    conv, bn = model.features[0], model.features[1]
    scale = bn.gamma.data / np.sqrt(bn.running_var + bn.eps)
    stem = P.fold(model)[0]
    assert (stem.kind, stem.stride, stem.padding, stem.act) == ("conv", 1, 1, "relu")
    np.testing.assert_allclose(stem.weight, conv.weight.data * scale, rtol=1e-6)
    np.testing.assert_allclose(stem.bias, bn.beta.data - bn.running_mean * scale, rtol=1e-5, atol=1e-6)


def test_fold_refuses_what_it_cannot_fold():
    with pytest.raises(ValueError, match="MobileNetV1 or ConvMobileNet"):
        P.fold(nn.Linear(3, 4))
    model = models.MobileNetV1(alpha=0.25)
    model.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    with pytest.raises(ValueError, match=r"features\.0 \(Conv2d\)"):
        P.fold(model)


# --- the compiled plan ---------------------------------------------------------------------------

@pytest.mark.parametrize("alpha, size, act, stem_stride", [
    (0.25, 32, "relu", None),    # stem stride 1
    (0.5, 40, "relu6", None),
    (0.25, 128, "relu", None),   # stem stride 2
    (0.75, 32, "relu6", 2),
    (1.0, 32, "relu", None),
])
def test_plan_matches_eval_model(alpha, size, act, stem_stride):
    model = randomize(models.MobileNetV1(alpha=alpha, input_size=size, act=act, stem_stride=stem_stride, seed=3))
    plan = P.compile(model, batch=8)
    x = images(5, size)
    want = eval_logits(model, x)
    for n in (1, 5):  # smaller batches run on the plan compiled for 8
        got = plan(x[:n])
        assert got.shape == (n, model.num_classes) and got.dtype == np.float32
        assert_close(got, want[:n], f"alpha={alpha} {size}px {act} batch {n}")


def test_plan_runs_a_full_batch_and_conv_mobilenet():
    model = randomize(models.ConvMobileNet(alpha=0.25, input_size=40, act="relu", num_classes=7))
    plan = P.compile(model, batch=3)
    x = images(3, 40)
    assert_close(plan(x), eval_logits(model, x), "ConvMobileNet batch 3")


def test_plan_other_input_size_and_copies_the_weights():
    model = randomize(models.MobileNetV1(alpha=0.25, input_size=32))
    plan = P.compile(model, batch=2, input_size=48)
    x = images(2, 48)
    want = eval_logits(model, x)
    model.classifier.bias.data += 100.0  # the plan holds copies
    assert_close(plan(x), want, "48px plan")
    assert plan.info()["input_hw"] == (48, 48)
    assert [layer["kind"] for layer in plan.info()["layers"]] == ["conv"] + ["dwpw"] * 13


@pytest.mark.parametrize("alpha, size, batch", [(0.25, 128, 1), (0.5, 32, 8), (1.0, 32, 1)])
def test_plan_independent_of_threads_and_batch(alpha, size, batch, restore_threads):
    """Bitwise: every element is computed in the same order under any tiling."""
    model = randomize(models.MobileNetV1(alpha=alpha, input_size=size))
    plan = P.compile(model, batch=batch)
    x = images(batch, size)
    results = []
    for threads in (1, 2, 3):
        _C.set_num_threads(threads)
        results.append(plan(x))
    for threads, got in zip((2, 3), results[1:]):
        np.testing.assert_array_equal(got, results[0], err_msg=f"{threads} threads vs 1")
    np.testing.assert_array_equal(plan(x[:1]), results[0][:1], err_msg="batch 1 vs batch of the plan")


@pytest.mark.parametrize("alpha, size, stem_stride", [(0.125, 40, None), (0.25, 96, 2)])
def test_plan_narrow_layers(alpha, size, stem_stride, restore_threads):
    """Layers of 4-16 output channels (and 10 classes) run on the GEMM's narrow panels: the eval
    model's logits, bitwise the same at 1, 2 and 3 threads."""
    model = randomize(models.MobileNetV1(alpha=alpha, input_size=size, stem_stride=stem_stride, seed=5))
    plan = P.compile(model, batch=3)
    info = plan.info()
    panels = {layer["output"][2]: layer["gemm_panel"] for layer in info["layers"]}
    wide = panels[max(panels)]
    assert all(p == wide for c, p in panels.items() if c >= 32), panels
    if alpha == 0.125:  # 4 channels: narrow on every build (a portable build's tile is 8 wide)
        assert panels[4] < wide, panels
    if _C.build_info()["simd"] == "avx512":
        assert {c: p for c, p in panels.items() if p < wide} == {c: 16 for c in panels if c <= 16}
        assert info["classifier_panel"] == 16
    x = images(3, size)
    want = eval_logits(model, x)
    results = []
    for threads in (1, 2, 3):
        _C.set_num_threads(threads)
        results.append(plan(x))
        np.testing.assert_array_equal(results[-1], results[0], err_msg=f"{threads} threads vs 1")
    assert_close(results[0], want, f"alpha={alpha} {size}px")
    np.testing.assert_array_equal(plan(x[1:2]), results[0][1:2], err_msg="batch 1 vs batch 3")


def test_plan_chunks_give_the_same_logits():
    """A batch runs a chunk of images at a time; the chunk changes nothing, bitwise."""
    model = randomize(models.MobileNetV1(alpha=0.25, input_size=40))
    x = images(5, 40)
    whole = P.compile(model, batch=5)
    assert whole.info()["chunk"] == 5
    for chunk in (1, 2, 3):
        plan = P.compile(model, batch=5, chunk=chunk)
        assert plan.info()["chunk"] == chunk
        np.testing.assert_array_equal(plan(x), whole(x), err_msg=f"chunk {chunk}")
        np.testing.assert_array_equal(plan(x[:4]), whole(x)[:4], err_msg=f"chunk {chunk}, batch 4")
    big = P.compile(models.MobileNetV1(alpha=0.25, input_size=224), batch=64)
    assert 1 < big.info()["chunk"] < 64  # 16 MB buffers: a few 224 px images per pass
    assert big.info()["buffer_bytes"] < 100 * 2**20


def test_plan_stages_pass_fewer_images_through_large_maps_and_change_nothing():
    """Layers run in stages: a pass of a few images through the large early maps, of the whole
    chunk through the small late ones. The stages cover the layers in order, take more images per
    pass as the maps shrink, and give the logits of the plan that passes one image at a time
    (bitwise) and of the autograd model."""
    model = randomize(models.MobileNetV1(alpha=0.25, input_size=32))
    x = images(40, 32)
    plan = P.compile(model, batch=40)
    info = plan.info()
    stages = info["stages"]
    assert [s[0] for s in stages] == [0] + [s[1] + 1 for s in stages[:-1]]
    assert stages[-1][1] == len(info["layers"]) - 1
    chunks = [s[2] for s in stages]
    assert chunks == sorted(chunks) and len(set(chunks)) >= 2
    assert chunks[0] < info["chunk"] == chunks[-1] == 40
    # Block 1, 8 -> 16 channels at 32x32 (padded 34x34): the most images, a power of two, whose
    # input and output fit 2 MB
    assert info["layers"][1]["output"] == (32, 32, 16)
    assert chunks[0] == 16 and 16 * 34 * 34 * (8 + 16) <= 2**19 < 32 * 34 * 34 * (8 + 16)
    one = P.compile(model, batch=40, chunk=1)
    assert [s[2] for s in one.info()["stages"]] == [1]
    got = plan(x)
    np.testing.assert_array_equal(got, one(x))
    np.testing.assert_array_equal(plan(x[:7]), got[:7])  # a last pass of fewer images
    want = eval_logits(model, x)
    np.testing.assert_allclose(got, want, rtol=0, atol=RTOL * np.abs(want).max())


@pytest.mark.parametrize("threads", [1, 2])
def test_plan_timed_gives_the_logits_and_a_time_per_layer(threads, restore_threads):
    """Plan.timed: the logits of a plain call, bitwise, and one positive time per compiled layer
    plus the pooling and classifier, which together take no longer than the call; a layer that a
    stage runs in several passes (chunk 1, batch 3) sums them."""
    import time

    _C.set_num_threads(threads)
    model = randomize(models.MobileNetV1(alpha=0.25, input_size=32))
    for batch, chunk in ((1, 0), (3, 1)):
        plan = P.compile(model, batch=batch, chunk=chunk)
        x = images(batch, 32)
        t0 = time.perf_counter()
        got, seconds = plan.timed(x)
        wall = time.perf_counter() - t0
        np.testing.assert_array_equal(got, plan(x))
        assert len(seconds) == len(plan.info()["layers"]) + 1
        assert all(s > 0 for s in seconds), seconds
        assert sum(seconds) <= wall
    with pytest.raises(TypeError, match="plan: x must be a numpy.ndarray"):
        plan.timed([1.0])
    with pytest.raises(ValueError, match="compiled for at most 3"):
        plan.timed(images(4, 32))


def test_plan_takes_tensors_and_concurrent_calls():
    """Calls from several Python threads take turns (the plan's buffers are shared)."""
    from concurrent.futures import ThreadPoolExecutor

    model = randomize(models.MobileNetV1(alpha=0.25, input_size=32))
    plan = P.compile(model, batch=2)
    xs = [images(2, 32, seed=s) for s in range(6)]
    want = [plan(x) for x in xs]
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(plan, xs))
    for w, g in zip(want, got):
        np.testing.assert_array_equal(g, w)
    np.testing.assert_array_equal(plan(mbnet.Tensor(xs[0])), want[0])


def test_plan_bad_inputs_raise_named_errors():
    model = randomize(models.MobileNetV1(alpha=0.25, input_size=32))
    plan = P.compile(model, batch=4)
    x = images(4, 32)
    with pytest.raises(ValueError, match=r"x has a batch of 5 .* at most 4"):
        plan(images(5, 32))
    with pytest.raises(ValueError, match=r"x has shape \(2, 40, 40, 3\) .* \(n, 32, 32, 3\)"):
        plan(images(2, 40))
    with pytest.raises(ValueError, match=r"x has shape \(2, 32, 32, 4\)"):
        plan(np.zeros((2, 32, 32, 4), np.float32))
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        plan(x[0])
    with pytest.raises(ValueError, match="x must not be empty"):
        plan(x[:0])
    with pytest.raises(TypeError, match="x must have dtype float32"):
        plan(x.astype(np.float64))
    with pytest.raises(TypeError, match="x must be a numpy.ndarray"):
        plan(x.tolist())
    np.testing.assert_array_equal(plan(x[:, ::-1]), plan(np.ascontiguousarray(x[:, ::-1])))  # views work
    for kwargs, match in [(dict(batch=2**63), r"batch must be an int in \[1, 2\^20\], got 9223372036854775808"),
                          (dict(batch=2.0), "batch must be an int"),
                          (dict(batch=2, chunk=2**64), r"chunk must be an int in \[0, 2\^20\]")]:
        with pytest.raises(ValueError, match=match):  # beyond int64: pybind's signature dump before
            P.compile(model, **kwargs)
    with pytest.raises(ValueError, match="model must be a MobileNetV1 or ConvMobileNet, got NoneType"):
        P.compile(None, 2)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match=r"batch must be an int in \[1, 2\^20\]"):
            P.compile(model, batch=bad)
    with pytest.raises(ValueError, match="input_size must be a positive int"):
        P.compile(model, batch=1, input_size=0)
    with pytest.raises(ValueError, match=r"chunk must be an int in \[0, 2\^20\]"):
        P.compile(model, batch=1, chunk=-1)


@st.composite
def layer_stacks(draw):
    """(Folded layers, x): 1-3 random conv / dw+pw layers on an odd-sized, non-square input with
    channel counts below, at and off the vector width, then pool and linear. Half the inputs are
    tiny (one thread runs them), half large enough to be split between threads."""
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    big = draw(st.booleans())  # large enough for the threaded paths (tiles per thread, shared tiles)
    sizes = st.integers(17, 41) if big else st.integers(1, 9)
    h, w, c = draw(sizes), draw(sizes), draw(st.sampled_from([1, 3, 16, 17, 64]))
    n = draw(st.integers(1, 3))
    x = rng.standard_normal((n, h, w, c)).astype(np.float32)
    layers = []
    for _ in range(draw(st.integers(1, 3))):
        act, s = draw(st.sampled_from(["none", "relu", "relu6"])), draw(st.sampled_from([1, 2]))
        co = draw(st.sampled_from([1, 5, 16, 33, 64]))
        if draw(st.booleans()):
            k = draw(st.sampled_from([1, 3, 5]))
            p = draw(st.integers(0, k // 2))
            layers.append(P.Folded("conv", rng.standard_normal((k, k, c, co)), rng.standard_normal(co), s, p, act))
        else:
            k, p = 3, draw(st.integers(0, 1))
            layers += [P.Folded("dw", rng.standard_normal((3, 3, c)), rng.standard_normal(c), s, p, act),
                       P.Folded("pw", rng.standard_normal((c, co)), rng.standard_normal(co), 1, 0,
                                draw(st.sampled_from(["none", "relu", "relu6"])))]
        h, w = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        assume(h >= 1 and w >= 1)
        c = co
    k = draw(st.integers(1, 4))
    layers += [P.Folded("pool"), P.Folded("linear", rng.standard_normal((c, k)), rng.standard_normal(k))]
    return layers, x


@given(layer_stacks(), st.sampled_from([1, 2, 3]))
def test_plan_matches_unfused_layers_on_edge_shapes(stack, threads):
    """The plan against run_folded (one _C kernel per layer): odd and non-square sizes, stride 2
    on odd sizes, padding 0..2, 1x1 / 3x3 / 5x5 convs, channels 1..33, batch 1..3, any act."""
    layers, x = stack
    plan = P.Plan(layers, batch=3, input_hw=x.shape[1:3])
    want = P.run_folded(layers, x)
    old = _C.get_num_threads()
    _C.set_num_threads(threads)
    try:
        got = plan(x)
    finally:
        _C.set_num_threads(old)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(want).max()))


@pytest.mark.parametrize("acts, stem", [(("none", "relu6", "none"), (3, 1, 1)),
                                        (("relu6", "none", "relu"), (5, 2, 2))])
@pytest.mark.parametrize("n", [1, 3])
def test_plan_epilogue_is_bias_then_act_bitwise(acts, stem, n, restore_threads):
    """The GEMM's epilogue adds the bias and applies the act to each block of the product as it is
    finished: bitwise run_folded at one thread (its convolutions sum in the same order, then bias,
    then act), at 1-3 threads. Odd sizes; a stem whose rows are multiplied one by one into the
    padded output, a conv through the scratch tile into an unpadded output (shared by the team at
    batch 1), a 1x1 conv written in place; 'none' and 'relu6' on each. The first conv reads the
    input unpadded (its taps past the border are zeros): 3x3 stride 1 and 5x5 stride 2, pad 1 and 2."""
    rng = np.random.default_rng(7)
    k, s, p = stem
    layers = [P.Folded("conv", rng.standard_normal((k, k, 3, 33)), rng.standard_normal(33) * 3, s, p, acts[0]),
              P.Folded("conv", rng.standard_normal((3, 3, 33, 64)), rng.standard_normal(64) * 3, 2, 1, acts[1]),
              P.Folded("conv", rng.standard_normal((1, 1, 64, 200)), rng.standard_normal(200) * 3, 1, 0, acts[2]),
              P.Folded("pool"), P.Folded("linear", rng.standard_normal((200, 5)), rng.standard_normal(5))]
    size = (37, 35) if s == 1 else (73, 69)  # the same sizes after the stem
    x = rng.standard_normal((n, *size, 3)).astype(np.float32)
    plan = P.Plan(layers, batch=n, input_hw=size)
    _C.set_num_threads(1)
    want = P.run_folded(layers, x)
    for threads in (1, 2, 3):
        _C.set_num_threads(threads)
        np.testing.assert_array_equal(plan(x), want, err_msg=f"{acts}, batch {n}, {threads} threads")


def test_plan_binding_checks_its_layers():
    w = np.ones((3, 3, 3, 8), np.float32)
    b, fc_w, fc_b = np.zeros(8, np.float32), np.ones((8, 2), np.float32), np.zeros(2, np.float32)
    conv = ("conv", w, b, 1, 1, "relu")
    assert _C._InferencePlan([conv], fc_w, fc_b, 1, (4, 4)).run(np.ones((1, 4, 4, 3), np.float32)).shape == (1, 2)
    with pytest.raises(ValueError, match=r"layers\[1\] takes 3 channels but the layer before gives 8"):
        _C._InferencePlan([conv, conv], fc_w, fc_b, 1, (4, 4))
    with pytest.raises(ValueError, match=r"layers\[0\] depthwise kernel must be 3x3"):
        _C._InferencePlan([("dwpw", np.ones((5, 5, 3), np.float32), np.zeros(3, np.float32), 1, 2, "relu",
                            np.ones((3, 8), np.float32), b, "relu")], fc_w, fc_b, 1, (4, 4))
    with pytest.raises(ValueError, match=r"layers\[0\] bias must have shape \(8,\)"):
        _C._InferencePlan([("conv", w, np.zeros(7, np.float32), 1, 1, "relu")], fc_w, fc_b, 1, (4, 4))
    with pytest.raises(ValueError, match="act must be"):
        _C._InferencePlan([("conv", w, b, 1, 1, "gelu")], fc_w, fc_b, 1, (4, 4))
    with pytest.raises(TypeError, match=r"layers\[0\] act must be a str"):
        _C._InferencePlan([("conv", w, b, 1, 1, None)], fc_w, fc_b, 1, (4, 4))
    with pytest.raises(TypeError, match=r"layers\[0\] stride must be an int"):
        _C._InferencePlan([("conv", w, b, 1.0, 1, "relu")], fc_w, fc_b, 1, (4, 4))
    with pytest.raises(TypeError, match=r"layers\[0\] weight must have dtype float32"):
        _C._InferencePlan([("conv", w.astype(np.float64), b, 1, 1, "relu")], fc_w, fc_b, 1, (4, 4))
    with pytest.raises(ValueError, match="chunk must be >= 0"):
        _C._InferencePlan([conv], fc_w, fc_b, 1, (4, 4), -1)
    with pytest.raises(ValueError, match="classifier weight takes 3 features"):
        _C._InferencePlan([conv], np.ones((3, 2), np.float32), fc_b, 1, (4, 4))
    with pytest.raises(ValueError, match="output height would be < 1"):
        _C._InferencePlan([("conv", w, b, 1, 0, "relu")], fc_w, fc_b, 1, (2, 2))
    with pytest.raises(ValueError, match="batch must be in"):
        _C._InferencePlan([conv], fc_w, fc_b, 0, (4, 4))


def test_evaluation_runs_the_plan_of_the_current_weights():
    """mbnet.run.inference (what training's and mbnet.evaluate's test passes run): a float32
    MobileNetV1 through a plan compiled from its weights at the call (bitwise that plan, also after
    the weights change), TTA the mean over the mirror (with shift also over both moved diagonally,
    the border black); a float64 model, or one the plan does not know, through the autograd forward."""
    from mbnet.run import evaluate, inference

    model = randomize(models.MobileNetV1(alpha=0.25, input_size=16, seed=4))
    x = images(6, 16)
    mirror = np.ascontiguousarray(x[:, :, ::-1])
    run = inference(model, 6)
    np.testing.assert_array_equal(run(x), P.compile(model, 6)(x))
    np.testing.assert_array_equal(run(x, tta=True), 0.5 * (run(x) + run(mirror)))
    # with shift, also both moved by (2, 2) and (-2, -2), the border the normalized black
    black = -np.array(model.mean, np.float32) / np.array(model.std, np.float32)
    padded = [np.pad(v, ((0, 0), (2, 2), (2, 2), (0, 0)), constant_values=np.nan) for v in (x, mirror)]
    moved = [p[:, a:a + 16, a:a + 16] for p in padded for a in (0, 4)]  # (+2, +2), then (-2, -2)
    moved = [np.where(np.isnan(m), black, m).astype(np.float32) for m in moved]
    assert np.array_equal(moved[0][:, 2:, 2:], x[:, :-2, :-2]) and np.all(moved[0][:, :2] == black)
    want = (run(x) + run(mirror) + sum(run(m) for m in moved)) / 6
    np.testing.assert_allclose(run(x, tta=True, shift=2), want, rtol=1e-6, atol=1e-6)
    assert_close(run(x), eval_logits(model, x), "inference vs autograd")
    model.classifier.bias.data += 1.0  # a later call sees the new weights
    np.testing.assert_array_equal(inference(model, 6)(x), P.compile(model, 6)(x))
    assert not np.array_equal(inference(model, 6)(x), run(x))

    class Images:  # a one-batch test loader
        batch_size, labels = 6, np.arange(6) % 10

        def epoch(self, epoch):
            yield 0, x, self.labels

    model.train()
    _, acc, preds = evaluate(model, Images())
    np.testing.assert_array_equal(preds, P.compile(model, 6)(x).argmax(1))
    assert acc == np.mean(preds == Images.labels) and model.training

    double = randomize(models.MobileNetV1(alpha=0.25, input_size=16, seed=4, dtype=np.float64))
    x64 = x.astype(np.float64)
    np.testing.assert_array_equal(inference(double, 6)(x64), eval_logits(double, x64))
    np.testing.assert_allclose(inference(double, 6)(x64, tta=True, shift=2),  # the same views, through autograd
                               sum(eval_logits(double, v.astype(np.float64)) for v in [x, mirror] + moved) / 6,
                               rtol=1e-12, atol=1e-12)
    seq = nn.Sequential(nn.GlobalAvgPool2d(), nn.Linear(3, 2, rng=np.random.default_rng(0)))  # no plan for it
    np.testing.assert_array_equal(inference(seq, 6)(x), eval_logits(seq.eval(), x))
