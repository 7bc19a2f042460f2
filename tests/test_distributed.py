"""mbnet.distributed: the sharding rule, synchronized BatchNorm, the gradient hook and reducer
without MPI; then 2 ranks under `mpirun` on localhost (1 thread each) against one process."""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mbnet import Tensor, data
from mbnet import distributed as dist
from mbnet import functional as F

ROOT = Path(__file__).resolve().parent.parent


# --- sharding ------------------------------------------------------------------------------------

@given(n=st.integers(0, 300), size=st.integers(1, 17))
def test_shards_partition_the_batch(n, size):
    bounds = [dist.shard_bounds(n, r, size) for r in range(size)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    for (lo, hi), (lo2, _) in zip(bounds, bounds[1:]):
        assert hi == lo2  # contiguous and disjoint, in rank order
    lengths = [hi - lo for lo, hi in bounds]
    assert max(lengths) - min(lengths) <= 1 and sum(lengths) == n


def test_shard_bounds_rejects_a_bad_rank():
    with pytest.raises(ValueError, match="rank 2 is outside 0..1"):
        dist.shard_bounds(10, 2, 2)


@pytest.mark.parametrize("n, batch, ranks, augment", [
    (96, 16, 2, {}), (100, 16, 3, {}), (100, 10, 4, {"resized_crop_area": 0.3, "cutout": 3}), (37, 5, 5, {})],
    ids=["R_div_B", "R3_B16", "R4_B10_resized_crop_cutout", "R_eq_B"])
def test_sharded_loaders_cover_each_global_batch_once(n, batch, ranks, augment):
    """Every image of every global batch goes to exactly one rank, with the crop, flip (and
    cutout) it gets in the whole batch; over an epoch every image is seen once (the last
    incomplete global batch is dropped, as with one process)."""
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    ids = np.arange(n)
    kw = dict(mean=np.full(3, 0.5), std=np.full(3, 0.25), train=True, seed=7, **augment)
    whole = data.Loader(images, ids, batch, **kw)
    shards = [data.Loader(images, ids, batch, shard=(r, ranks), **kw) for r in range(ranks)]
    assert all(len(s) == len(whole) == n // batch for s in shards)
    for epoch in (0, 1):
        seen = []
        for (i, x, y), *parts in zip(whole.epoch(epoch), *(s.epoch(epoch) for s in shards)):
            assert all(j == i for j, _, _ in parts)
            np.testing.assert_array_equal(np.concatenate([p[2] for p in parts]), y)
            np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), x)
            seen += list(y)
        assert len(seen) == len(set(seen)) == (n // batch) * batch
        assert sorted(seen) == sorted(data.shuffle_order(n, 7, epoch)[:len(seen)])


def test_launched_size_reads_the_launchers_variables():
    assert dist.launched_size({}) == 1
    assert dist.launched_size({"OMPI_COMM_WORLD_SIZE": "1"}) == 1  # mpirun -n 1: a plain run
    assert dist.launched_size({"OMPI_COMM_WORLD_SIZE": "4"}) == 4
    assert dist.launched_size({"PMI_SIZE": "3"}) == 3


def test_plain_run_never_imports_mpi4py():
    env = {k: v for k, v in os.environ.items() if k not in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")}
    code = "import sys; from mbnet import distributed as d; w = d.world(); print(w.size, 'mpi4py' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "False"]


# --- synchronized BatchNorm ----------------------------------------------------------------------

def _bn_case(dtype, act, n=6, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, 3, 3, 5)) * 2 + 1).astype(dtype)
    gamma, beta = rng.standard_normal(5).astype(dtype), rng.standard_normal(5).astype(dtype)
    gy = rng.standard_normal(x.shape).astype(dtype)
    return x, gamma, beta, gy


def _bn_run(x, gamma, beta, gy, act, stats=False):
    """-> y, dx, dgamma, dbeta, running_mean, running_var of one training-mode batch_norm; with
    stats, given x's (mean, var) as a convolution's kernel would give them."""
    rm, rv = np.zeros(x.shape[-1], x.dtype), np.ones(x.shape[-1], x.dtype)
    xt, gt, bt = Tensor(x, True), Tensor(gamma, True), Tensor(beta, True)
    axes = tuple(range(x.ndim - 1))
    given = (x.mean(axes, dtype=np.float64).astype(x.dtype), x.var(axes, dtype=np.float64).astype(x.dtype))
    y = F.batch_norm(xt, gt, bt, rm, rv, True, 0.1, 1e-5, act, stats=given if stats else None)
    y.backward(gy)
    return y.data, xt.grad, gt.grad, bt.grad, rm, rv


@pytest.fixture
def bn_allreduce():
    yield F.set_batch_norm_allreduce
    F.set_batch_norm_allreduce(None)


@pytest.mark.parametrize("stats", [False, True], ids=["summed", "given"])
@pytest.mark.parametrize("act", ["none", "relu", "relu6"])
@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 1e-5)], ids=["f64", "f32"])
def test_sync_batch_norm_on_one_process_is_batch_norm(act, dtype, tol, stats, bn_allreduce):
    case = _bn_case(dtype, act)
    plain = _bn_run(*case, act)
    bn_allreduce(lambda a: a)
    synced = _bn_run(*case, act, stats)
    for name, a, b in zip(["y", "dx", "dgamma", "dbeta", "running_mean", "running_var"], plain, synced):
        np.testing.assert_allclose(b, a, rtol=tol, atol=tol, err_msg=f"act={act}: {name}")


@pytest.mark.parametrize("stats", [False, True], ids=["summed", "given"])
@pytest.mark.parametrize("split", [3, 4], ids=["halves", "unequal"])
def test_sync_batch_norm_split_over_two_workers_is_the_whole_batch(split, stats, bn_allreduce):
    """Two threads stand in for two ranks (their allreduce adds both buffers): the shards'
    outputs and input gradients are the whole batch's rows, dgamma/dbeta add up to its own."""
    act = "relu"
    x, gamma, beta, gy = _bn_case(np.float64, act, n=7)
    whole = _bn_run(x, gamma, beta, gy, act)
    barrier, slots = threading.Barrier(2), [None, None]

    def allreduce(a, rank=None):
        slots[rank] = a
        barrier.wait()
        total = slots[0] + slots[1]
        barrier.wait()
        return total

    local = threading.local()
    bn_allreduce(lambda a: allreduce(a, local.rank))
    parts = [None, None]

    def work(rank, rows):
        local.rank = rank
        parts[rank] = _bn_run(x[rows], gamma, beta, gy[rows], act, stats)

    threads = [threading.Thread(target=work, args=(r, rows)) for r, rows in enumerate([slice(0, split), slice(split, None)])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, name in [(0, "y"), (1, "dx")]:
        np.testing.assert_allclose(np.concatenate([parts[0][k], parts[1][k]]), whole[k], rtol=1e-12, atol=1e-12,
                                   err_msg=name)
    for k, name in [(2, "dgamma"), (3, "dbeta")]:
        np.testing.assert_allclose(parts[0][k] + parts[1][k], whole[k], rtol=1e-12, atol=1e-12, err_msg=name)
    for k, name in [(4, "running_mean"), (5, "running_var")]:
        np.testing.assert_allclose(parts[0][k], whole[k], rtol=1e-12, err_msg=name)


def test_dropout_of_a_shard_is_the_shard_of_the_whole_batchs_dropout():
    x = Tensor(np.random.default_rng(0).standard_normal((7, 12)).astype(np.float32))
    whole = F.dropout(x, 0.5, True, np.random.default_rng(3)).data
    parts = [F.dropout(Tensor(x.data[lo:hi]), 0.5, True, np.random.default_rng(3), rows=(lo, 7)).data
             for lo, hi in (dist.shard_bounds(7, r, 3) for r in range(3))]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    assert (whole == 0).any()


# --- the gradient hook and the reducer -----------------------------------------------------------

def test_grad_hook_fires_once_when_the_gradient_is_final():
    """A leaf used twice gets its hook once, after both uses, with the summed gradient."""
    a, b = Tensor(np.array([1.0, 2.0]), True), Tensor(np.array([3.0, 4.0]), True)
    calls = []
    a.grad_hook = b.grad_hook = lambda t: calls.append((t is a, t.grad.copy()))
    h = a * 2.0
    loss = (h * b + h).sum() + (b * b).sum() + (a * a).sum()
    loss.backward()
    assert sorted(c[0] for c in calls) == [False, True]
    for is_a, g in calls:
        np.testing.assert_array_equal(g, (a if is_a else b).grad)
    np.testing.assert_array_equal(a.grad, 2 * np.array([3.0, 4.0]) + 2 + 2 * np.array([1.0, 2.0]))
    np.testing.assert_array_equal(b.grad, 2 * np.array([1.0, 2.0]) + 2 * np.array([3.0, 4.0]))


def test_grad_hook_fires_while_backward_is_still_walking():
    a, b = Tensor(np.array([1.0, 2.0]), True), Tensor(np.array([3.0, 4.0]), True)
    a_grad_when_b_done = []
    b.grad_hook = lambda t: a_grad_when_b_done.append(a.grad)
    ((a * 2.0) * b).sum().backward()
    assert a_grad_when_b_done == [None] and a.grad is not None


def test_reducer_on_one_process_keeps_the_gradients():
    from mbnet.models import MobileNetV1

    model = MobileNetV1(alpha=0.25, num_classes=10, input_size=8, seed=0)
    params = model.parameters()
    reducer = dist.GradReducer(dist.World(), params, bucket_floats=5000, n_values=2)
    assert len(reducer.buckets) > 2
    assert sorted(id(p) for b in reducer.buckets for p in b.params) == sorted(id(p) for p in params)
    x = np.random.default_rng(0).standard_normal((4, 8, 8, 3)).astype(np.float32)
    F.cross_entropy(model(Tensor(x)), np.arange(4)).backward()
    params[0].grad = None  # a parameter without a gradient contributes zeros
    before = [np.zeros(p.shape, np.float32) if p.grad is None else p.grad.copy() for p in params]
    np.testing.assert_array_equal(reducer.reduce([1, 5]), [1, 5])
    for p, g in zip(params, before):
        np.testing.assert_array_equal(p.grad, g)
    with pytest.raises(ValueError, match="1 values, made for 2"):
        reducer.reduce([0])


# --- two ranks under mpirun ----------------------------------------------------------------------

def mpi_env(threads=1):
    """The environment of an `mpirun` test: this checkout first on the path, 1 kernel thread,
    root allowed (containers)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS=str(threads), OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        env.pop(var, None)
    return env


def mpirun_command(n):
    """`mpirun -n n --oversubscribe` (the one beside this Python first), or skip the test."""
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        pytest.skip("mpi4py is not installed (pip install -e '.[mpi]')")
    mpirun = shutil.which("mpirun", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if mpirun is None:
        pytest.skip("no mpirun on PATH (pip install -e '.[mpi]' brings Open MPI)")
    return [mpirun, "-n", str(n), "--oversubscribe"]


def _parity_run(tmp_path, name, ranks, *flags):
    out = tmp_path / f"{name}.npz"
    cmd = [sys.executable, str(ROOT / "tests" / "mpi_parity_worker.py"), str(out), *flags]
    if ranks > 1:
        cmd = mpirun_command(ranks) + cmd
    r = subprocess.run(cmd, env=mpi_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    with np.load(out) as z:
        return dict(z)


def test_two_ranks_with_sync_bn_equal_one_process(tmp_path):
    """3 SGD steps, global batch 10 (5 per rank): the float64 weights and gradients of 2 ranks
    with synchronized BatchNorm, with and without overlap, equal one process's to rounding (the
    sums run in another order), and the running variances are not equal without it. Float64,
    because this tiny network (1x1 maps at the end, BatchNorm over 10 values) amplifies a
    rounding difference about 100-fold per step: 1e-12 after one step, 1e-8 after three."""
    mpirun_command(2)
    one = _parity_run(tmp_path, "one", 1, "f64")
    assert one["features.0.weight"].dtype == np.float64
    for overlap in ("overlap", "nooverlap"):
        two = _parity_run(tmp_path, "two", 2, "f64", "sync", overlap)
        assert int(two["buckets"]) >= 4
        for k in one:
            if k != "buckets":
                np.testing.assert_allclose(two[k], one[k], rtol=0, atol=1e-7 if k.startswith("grad.") else 1e-9,
                                           err_msg=f"{overlap}: {k}")
    per_rank = _parity_run(tmp_path, "per_rank", 2, "f64")
    assert max(np.abs(per_rank[k] - one[k]).max() for k in one if k.endswith("running_var")) > 1e-3


# --- python -m mbnet.train on two ranks ----------------------------------------------------------

TRAIN = ["--threads", "1", "--alpha", "0.25", "--resolution", "16", "--batch-size", "32", "--lr", "0.05",
         "--warmup", "0.5", "--ema-decay", "0.9", "--no-tta", "--limit-test", "20"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from test_train import _tiny_cifar

    return _tiny_cifar(tmp_path_factory.mktemp("cifar"))


def _arrays(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files if k != "meta"}


def _train_two_ranks(tiny, out, action="none", *options, timeout=120):
    """mpirun -n 2 tests/mpi_train_worker.py ACTION <TRAIN options> -> (CompletedProcess, seconds)."""
    cmd = mpirun_command(2) + [sys.executable, str(ROOT / "tests" / "mpi_train_worker.py"), action, *TRAIN,
                               "--data-dir", str(tiny), "--out", str(out), *options]
    t0 = time.monotonic()
    r = subprocess.run(cmd, env=mpi_env(), capture_output=True, text=True, timeout=timeout)
    return r, time.monotonic() - t0


def test_train_on_two_ranks_resumes_bit_for_bit_and_only_rank0_writes(tiny, tmp_path):
    """2 epochs of 3 steps; SIGTERM to rank 1 at the first step stops both ranks after the second
    (the flag travels with the gradients), rank 0 saves, and the resumed run ends with exactly
    the weights, EMA and optimizer state of an unbroken one. Rank 1 runs under an audit hook that
    fails it if it writes anything into the run directory."""
    common = ["--epochs", "2", "--limit-train", "96"]
    a, b = tmp_path / "a", tmp_path / "b"
    r, _ = _train_two_ranks(tiny, a, "none", *common)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in a.iterdir()) == ["config.json", "curves.png", "last.npz",
                                                   "metrics.jsonl", "run.lock"]
    assert r.stderr.count("epoch 2/2: train loss") == 1  # rank 0 alone prints
    r, _ = _train_two_ranks(tiny, b, "term@0", *common)
    assert r.returncode == 143, r.stderr[-3000:]
    assert "saved" in r.stderr and "at epoch 1, step 2/3" in r.stderr and "mpirun -n 2 python -m mbnet.train" in r.stderr
    r, _ = _train_two_ranks(tiny, b, "none", *common, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    unbroken, resumed = _arrays(a / "last.npz"), _arrays(b / "last.npz")
    assert unbroken.keys() == resumed.keys() and len(unbroken) > 100
    for k in unbroken:
        np.testing.assert_array_equal(resumed[k], unbroken[k], err_msg=k)
    metrics = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2] and 0 <= metrics[-1]["test_acc"] <= 1


@pytest.mark.parametrize("mixing", [[], ["--mixup", "0.4"], ["--cutmix", "1"]], ids=["plain", "mixup", "cutmix"])
def test_train_sync_bn_step_on_two_ranks_equals_one_process(tiny, tmp_path, mixing):
    """The third step of a run (augmentation, schedule, momentum, EMA all at work) computed by 2
    ranks with --sync-bn from the 1-process checkpoint after step 2 gives the 1-process weights
    to rounding: the median weight tensor within 1e-3 of the step's update of it. The ranks sum in
    another order, and this tiny network (BatchNorm over 32 values on its 1x1 maps) magnifies that
    (test_two_ranks_with_sync_bn_equal_one_process): measured 1e-4 of the update for most tensors,
    but from some states (one in four of seeds 0-4, with and without CutMix, and the states that
    a changed rounding in the first two steps leaves) a few tensors move by 0.4-25% of their
    update, the reordered sums having crossed a kink of the activations; every tensor is held
    within its update. A wrong mixing, a shard's rows lost or a statistic left unsynchronized
    moves every tensor by a sizable part of its update. With mixup or CutMix the ranks make their
    rows of the global batch's mixing (partners from the other shard too)."""
    from mbnet import train

    common = ["--epochs", "1", "--limit-train", "96", "--sync-bn", "--data-dir", str(tiny), *mixing]
    one, split = tmp_path / "one", tmp_path / "split"
    assert train.main(TRAIN + common + ["--out", str(one)]) == 0
    stop_after_2 = lambda step: step == 1 and signal.raise_signal(signal.SIGINT)  # noqa: E731
    assert train.main(TRAIN + common + ["--out", str(split)], on_step=stop_after_2) == 130
    split_at_2 = tmp_path / "split-at-2.npz"
    shutil.copy(split / "last.npz", split_at_2)
    r, _ = _train_two_ranks(tiny, split, "none", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "used 1 MPI rank(s), now 2" in r.stderr
    a, b = _arrays(one / "last.npz"), _arrays(split / "last.npz")
    start = _arrays(split_at_2)
    rel = sorted((float(np.abs(a[k] - b[k]).max() / max(np.abs(a[k] - start[k]).max(), 1e-3)), k)
                 for k in a if k.startswith("model/"))
    assert rel[len(rel) // 2][0] < 1e-3 and rel[-1][0] < 1, (rel[len(rel) // 2], rel[-1])
    assert rel[-1][0] > 0  # two ranks did compute it (in another summation order)


@pytest.mark.parametrize("action, options, expect", [
    ("kill@1", [], "exited on signal 9"),
    ("stop@1", ["--mpi-timeout", "4"], "gradient allreduce (bucket 1/1) did not complete within 4 s"),
], ids=["killed", "hung"])
def test_a_dead_or_hung_rank_ends_the_job_with_a_message(tiny, tmp_path, action, options, expect):
    """Rank 1 SIGKILLs (mpirun ends the job) or SIGSTOPs itself (rank 0's bounded wait aborts it)
    after its second step: non-zero exit, a message, well within the test's bound."""
    r, seconds = _train_two_ranks(tiny, tmp_path / "run", action, "--epochs", "2", "--limit-train", "96", *options,
                                  timeout=90)
    assert r.returncode != 0
    assert expect in r.stderr.replace("\n", " "), r.stderr[-3000:]
    assert seconds < 60
