"""mbnet.nn: parameter/buffer naming, train/eval, state_dict round trips and errors, npz save/load,
initialization, dropout reproducibility, layer gradients."""
import numpy as np
import pytest

from mbnet import Tensor, nn
from mbnet import functional as F
from test_autograd import check_backward


def small_net(seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, 2, rng=rng, dtype=dtype), nn.BatchNorm2d(4, "relu", dtype=dtype),
        nn.DepthwiseSeparable(4, 6, 1, "relu6", rng=rng, dtype=dtype),
        nn.GlobalAvgPool2d(), nn.Dropout(0.2, seed=seed), nn.Linear(6, 3, rng=rng, dtype=dtype))


def test_names_parameters_and_buffers():
    net = small_net()
    names = [n for n, _ in net.named_parameters()]
    assert names == ["0.weight", "1.gamma", "1.beta", "2.dw.weight", "2.bn1.gamma", "2.bn1.beta", "2.pw.weight",
                     "2.bn2.gamma", "2.bn2.beta", "5.weight", "5.bias"]
    assert all(p.requires_grad for p in net.parameters())
    assert [n for n, _ in net.named_buffers()] == ["1.running_mean", "1.running_var", "2.bn1.running_mean",
                                                   "2.bn1.running_var", "2.bn2.running_mean", "2.bn2.running_var"]
    assert net[2].bn1.running_var is net.buffers()[3]
    assert len(net) == 6 and isinstance(net[5], nn.Linear)
    assert net[0].weight.shape == (3, 3, 3, 4) and net[0].padding == 1
    assert net[2].dw.weight.shape == (3, 3, 4) and net[2].pw.weight.shape == (4, 6)


def test_train_eval_and_zero_grad(rng):
    net = small_net()
    assert net.training and net[2].bn1.training
    assert net.eval() is net and not net[2].bn1.training and not net[4].training
    net.train()
    assert net[2].bn2.training
    x = rng.standard_normal((2, 6, 6, 3))
    F.cross_entropy(net(Tensor(x)), np.array([0, 2])).backward()
    assert all(p.grad is not None for p in net.parameters())
    net.zero_grad()
    assert all(p.grad is None for p in net.parameters())


def test_batchnorm_module_updates_running_statistics_only_in_training(rng):
    bn = nn.BatchNorm2d(3, dtype=np.float64)
    x = Tensor(rng.standard_normal((4, 2, 2, 3)) + 2)
    bn(x)
    assert np.all(bn.running_mean > 0.1)
    before = bn.running_mean.copy()
    bn.eval()
    bn(x)
    np.testing.assert_array_equal(bn.running_mean, before)
    with pytest.raises(ValueError, match="act"):
        nn.BatchNorm2d(3, act="gelu")


def test_state_dict_is_float32_copies_of_params_and_buffers():
    net = small_net(dtype=np.float64)
    sd = net.state_dict()
    assert list(sd) == ["0.weight", "1.gamma", "1.beta", "1.running_mean", "1.running_var", "2.dw.weight",
                        "2.bn1.gamma", "2.bn1.beta", "2.bn1.running_mean", "2.bn1.running_var", "2.pw.weight",
                        "2.bn2.gamma", "2.bn2.beta", "2.bn2.running_mean", "2.bn2.running_var", "5.weight",
                        "5.bias"]
    assert all(a.dtype == np.float32 for a in sd.values())
    sd["0.weight"][...] = 0
    assert np.any(net[0].weight.data != 0)


def test_state_dict_round_trip_reproduces_outputs(rng):
    a, b = small_net(seed=1, dtype=np.float32), small_net(seed=2, dtype=np.float32)
    x = Tensor(rng.standard_normal((2, 6, 6, 3)).astype(np.float32))
    a(x)  # moves the running statistics away from their initial values
    a.eval(), b.eval()
    weight = b[0].weight
    b.load_state_dict(a.state_dict())
    assert b[0].weight is weight  # loaded in place: an optimizer's references stay valid
    np.testing.assert_array_equal(b(x).data, a(x).data)
    np.testing.assert_array_equal(b[1].running_mean, a[1].running_mean)


def test_save_and_load_npz(tmp_path, rng):
    a, b = small_net(seed=1), small_net(seed=2)
    a(Tensor(rng.standard_normal((2, 6, 6, 3))))
    path = tmp_path / "net.npz"
    a.save(path)
    b.load(path)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        np.testing.assert_array_equal(x, y, err_msg=name)
    assert b[0].weight.dtype == np.float64  # loading casts to the module's dtype


def test_frozen_parameters_stay_in_the_state(tmp_path, rng):
    from mbnet import optim
    from mbnet.models import MobileNetV1
    from mbnet.run import live_arrays

    model = MobileNetV1(alpha=0.25, input_size=8, seed=1)
    assert len(model.state_dict()) == 137  # stem 5 + 13 blocks x 10 + classifier 2
    model.features[0].weight.requires_grad = False  # freeze the stem convolution
    assert len(model.parameters()) == 82 and "features.0.weight" not in dict(model.named_parameters())
    sd = model.state_dict()
    assert len(sd) == 137 and "features.0.weight" in sd
    model.save(tmp_path / "frozen.npz")
    again = MobileNetV1(alpha=0.25, input_size=8, seed=2)
    again.load(tmp_path / "frozen.npz")  # strict: 137 entries on both sides
    for k, a in again.state_dict().items():
        np.testing.assert_array_equal(a, sd[k], err_msg=k)
    # the EMA of a model with a frozen layer follows every entry, the frozen one included
    ema = optim.EMA(model.state_dict(), 0.5)
    model.features[0].weight.data += 1.0
    ema.update(live_arrays(model))
    assert ema.updates == 1 and not np.array_equal(ema.shadow["features.0.weight"], sd["features.0.weight"])


def test_load_state_dict_errors_name_the_entry():
    net = small_net()
    sd = net.state_dict()
    missing = dict(sd)
    del missing["2.bn1.running_var"]
    with pytest.raises(ValueError, match=r"missing keys: 2\.bn1\.running_var"):
        net.load_state_dict(missing)
    with pytest.raises(ValueError, match=r"unexpected keys: extra\.weight"):
        net.load_state_dict({**sd, "extra.weight": np.zeros(1)})
    bad = {**sd, "2.pw.weight": np.zeros((6, 4), np.float32)}
    before = net[0].weight.data.copy()
    with pytest.raises(ValueError, match=r"2\.pw\.weight has shape \(6, 4\), the module expects \(4, 6\)"):
        net.load_state_dict(bad)
    np.testing.assert_array_equal(net[0].weight.data, before)  # nothing was half-loaded
    net.load_state_dict({"0.weight": np.zeros((3, 3, 3, 4)), "junk": np.zeros(2)}, strict=False)
    assert np.all(net[0].weight.data == 0)
    with pytest.raises(ValueError, match=r"0\.weight has shape"):
        net.load_state_dict({"0.weight": np.zeros(3)}, strict=False)


def test_initialization_follows_kaiming_fan_out():
    rng = np.random.default_rng(0)
    conv = nn.Conv2d(16, 64, 3, rng=rng)
    dw = nn.DepthwiseConv2d(2000, rng=rng)
    pw = nn.PointwiseConv2d(64, 128, rng=rng)
    fc = nn.Linear(256, 100, rng=rng)
    for name, w, std in [("conv", conv.weight, np.sqrt(2 / (9 * 64))), ("depthwise", dw.weight, np.sqrt(2 / 9)),
                         ("pointwise", pw.weight, np.sqrt(2 / 128)), ("linear", fc.weight, 0.01)]:
        assert w.dtype == np.float32
        assert abs(w.data.std() / std - 1) < 0.05, name
        assert abs(w.data.mean()) < 0.1 * std, name
    assert np.all(fc.bias.data == 0)
    a, b = nn.Conv2d(3, 4, 3, rng=np.random.default_rng(5)), nn.Conv2d(3, 4, 3, rng=np.random.default_rng(5))
    np.testing.assert_array_equal(a.weight.data, b.weight.data)


def test_dropout_module_is_reproducible_and_identity_in_eval():
    x = Tensor(np.ones((4, 10), np.float32))
    a, b = nn.Dropout(0.5, seed=3), nn.Dropout(0.5, seed=3)
    np.testing.assert_array_equal(a(x).data, b(x).data)
    state = a.rng.bit_generator.state
    first = a(x).data
    a.rng.bit_generator.state = state  # a trainer can save and restore the stream
    np.testing.assert_array_equal(a(x).data, first)
    a.eval()
    assert a(x) is x


def check_module_backward(module, x, labels, name, rng, rtol=1e-5, eps=1e-6, atol=1e-9):
    """check_backward of cross_entropy(module(x), labels) w.r.t. x and every parameter: the
    check's tensors are swapped into the parameters' attribute slots for each evaluation, and
    dropout modules are reseeded so every evaluation draws the same masks."""
    slots = [(m, attr) for _, m in module.named_modules() for attr, v in vars(m).items()
             if isinstance(v, Tensor) and v.requires_grad]
    originals = [getattr(m, attr) for m, attr in slots]
    dropouts = [m for _, m in module.named_modules() if isinstance(m, nn.Dropout)]

    def fn(x_t, *params):
        for (m, attr), p in zip(slots, params):
            setattr(m, attr, p)
        for d in dropouts:
            d.rng = np.random.default_rng(0)
        return F.cross_entropy(module(x_t), labels)

    try:
        check_backward(fn, [x] + [p.data for p in originals], name, rng,
                       ["x"] + [n for n, _ in module.named_parameters()], eps=eps, rtol=rtol, atol=atol)
    finally:
        for (m, attr), p in zip(slots, originals):
            setattr(m, attr, p)


@pytest.mark.parametrize("training", [True, False])
def test_layer_gradients_through_modules(training, rng):
    net = small_net()
    net(Tensor(rng.standard_normal((4, 6, 6, 3))))  # running statistics away from (0, 1)
    net.train(training)
    check_module_backward(net, rng.standard_normal((3, 6, 6, 3)), np.array([1, 2, 0]),
                          f"small_net(training={training})", rng)
