"""Data-parallel training over MPI: one model on R processes (ranks), ``mpirun -n R python ...``.

Notation: R ranks, B the global batch, [lo_r, hi_r) rank r's shard of it (``shard_bounds``).

Each rank holds the whole model, computes the loss of its shard scaled by (hi_r - lo_r) / B and
its gradients, and ``GradReducer`` sums the gradients over the ranks (the mean over the global
batch, exactly, also when R does not divide B). The sum is MPI's ``Iallreduce`` on a few flat
float32 buffers (buckets), started from Tensor.grad_hook while backward is still running when
``overlap`` is on. ``enable_sync_batch_norm`` makes BatchNorm use the statistics of the global
batch (mbnet.functional.SyncBatchNormTrain); without it each rank normalizes with its shard's.

mpi4py is imported only when the process was started by an MPI launcher (OMPI_COMM_WORLD_SIZE or
PMI_SIZE in the environment says more than one process): plain runs and ``-n 1`` never import it.

Every collective is bounded: a rank waits at most ``timeout`` seconds (polling the request),
then prints which wait timed out and calls MPI Abort, which ends every rank. An uncaught
exception on one rank also aborts the job (else the others would wait for it until then).
"""
import os
import sys
import time
import traceback

import numpy as np

DEFAULT_TIMEOUT = 300.0  # seconds a rank waits for the others at one collective
SPIN = 0.002  # seconds a wait polls without sleeping (MPI latency is microseconds when ranks are in step)
BUCKET_FLOATS = 1 << 20  # a bucket closes once it holds this many gradient floats (4 MB)


def shard_bounds(n, rank, size):
    """-> (lo, hi): rank's rows of a batch of n rows split over `size` ranks.

    The rule: rank r takes rows [r·n // size, (r+1)·n // size). The shards are contiguous, disjoint,
    cover the n rows in order, and differ in length by at most one (the first ranks get the
    shorter ones when size does not divide n); a shard is empty only when n < size."""
    if not 0 <= rank < size:
        raise ValueError(f"shard_bounds: rank {rank} is outside 0..{size - 1}")
    return rank * n // size, (rank + 1) * n // size


def launched_size(environ=None):
    """The number of processes an MPI launcher started (Open MPI's or MPICH/PMI's variable), else 1."""
    environ = os.environ if environ is None else environ
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if environ.get(var, "").isdigit():
            return int(environ[var])
    return 1


class World:
    """The ranks of this job: ``rank``, ``size`` and, when size > 1, the mpi4py communicator."""

    def __init__(self, comm=None, timeout=DEFAULT_TIMEOUT):
        self.comm, self.timeout = comm, timeout
        self.rank = comm.Get_rank() if comm is not None else 0
        self.size = comm.Get_size() if comm is not None else 1

    def __repr__(self):
        return f"World(rank={self.rank}, size={self.size})"

    def abort(self, message, code=1):
        """Prints `message` naming this rank (on the real stderr: mbnet.train silences ranks > 0)
        and ends every rank of the job (MPI Abort)."""
        print(f"mbnet: rank {self.rank}/{self.size}: {message}; aborting all ranks", file=sys.__stderr__, flush=True)
        if self.comm is None:
            raise SystemExit(code)
        self.comm.Abort(code)

    def wait(self, request, what, timeout=None):
        """Waits for a non-blocking MPI request at most ``timeout`` seconds (default: the world's),
        else aborts the job."""
        timeout = self.timeout if timeout is None else timeout
        start = time.monotonic()
        while not request.Test():
            waited = time.monotonic() - start
            if waited > timeout:
                self.abort(f"{what} did not complete within {timeout:g} s (another rank died, hangs or "
                           f"is far behind)")
            if waited > SPIN:  # a long wait (a rank behind): leave the core to others
                time.sleep(2e-4)

    def start_allreduce(self, buf):
        """Starts summing ndarray ``buf`` over the ranks in place; -> the MPI request."""
        from mpi4py import MPI

        return self.comm.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM)

    def allreduce(self, buf, what="allreduce"):
        """Sums ndarray ``buf`` (C-contiguous) over the ranks in place, bounded; returns it."""
        if self.size > 1:
            self.wait(self.start_allreduce(buf), what)
        return buf

    def broadcast(self, arrays, what="broadcast", root=0):
        """Copies rank ``root``'s values of the ndarrays ``arrays`` into every rank's, in place
        (one flat buffer of their common dtype)."""
        if self.size == 1 or not arrays:
            return
        flat = np.concatenate([np.ravel(a) for a in arrays])
        self.wait(self.comm.Ibcast(flat, root=root), what)
        offset = 0
        for a in arrays:
            a[...] = flat[offset:offset + a.size].reshape(a.shape)
            offset += a.size

    def barrier(self, what="barrier", timeout=None):
        if self.size > 1:
            self.wait(self.comm.Ibarrier(), what, timeout)

    def first_rank_of_each_machine(self):
        """True on the lowest rank of every machine (ranks sharing memory)."""
        from mpi4py import MPI

        return self.comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank() == 0

    def in_turn(self, fn, what):
        """-> fn() of this rank, called on rank 0 first, then on the first rank of every other
        machine, then on the others: fn fills a cache (shared by all machines, or one per machine)
        that ranks writing at once would corrupt. Ranks wait for their turn without a time bound
        (rank 0 may decode a large data set for hours; a rank that dies still ends the job)."""
        if self.size == 1:
            return fn()
        first = self.first_rank_of_each_machine()
        turn = 0 if self.rank == 0 else 1 if first else 2
        result = None
        for phase in range(3):
            if phase == turn:
                result = fn()
            self.barrier(what, timeout=float("inf"))
        return result


_world = None


def world(timeout=None):
    """The job's World, created on the first call: size 1 without importing mpi4py unless an MPI
    launcher started more than one process. ``timeout`` (seconds) bounds every later collective."""
    global _world
    if _world is None:
        size = launched_size()
        if size > 1:
            try:
                from mpi4py import MPI
            except ImportError as e:
                raise SystemExit(f"mbnet: started as {size} MPI processes but mpi4py cannot be imported ({e}); "
                                 "install it with: pip install -e '.[mpi]'") from None
            _world = World(MPI.COMM_WORLD)
            _abort_on_uncaught(_world)
        else:
            _world = World()
    if timeout is not None:
        _world.timeout = timeout
    return _world


def _abort_on_uncaught(w):
    """An exception that ends one rank ends all of them at once (else the others would wait for it
    until their timeout)."""
    def hook(kind, value, tb):
        traceback.print_exception(kind, value, tb, file=sys.__stderr__)
        w.abort(f"uncaught {kind.__name__}")

    sys.excepthook = hook


# ------------------------------------------------------------------------------------------------
# Gradients


class _Bucket:
    def __init__(self, params, extra, dtype):
        self.params = params
        self.buf = np.zeros(sum(p.size for p in params) + extra, dtype)
        self.filled = 0
        self.request = None


class GradReducer:
    """Sums ``.grad`` of ``params`` over the ranks after each backward (the loss of each rank must
    already be scaled so that the sum is the global gradient: ``loss_scale``).

    The parameters, in reverse order (the order backward finishes them), are cut into buckets of
    at least ``bucket_floats`` floats, each one flat buffer of the parameters' dtype (float32); the
    last bucket also carries ``n_values`` numbers that ``reduce(values)`` sums along (a stop flag,
    the loss and accuracy counts of the step: no extra collective). With ``overlap``, each
    parameter's grad_hook copies its gradient into its bucket as soon as it is final, and a full
    bucket's Iallreduce starts at once (in bucket order; backward walks the same graph in the same
    order on every rank, so the collectives, sync-BN's included, are issued in one order) while
    backward goes on; ``reduce()`` then starts what is left, waits, and points each ``.grad`` at
    its slice of the summed buffer (valid until the next ``reduce()``). Without overlap everything
    is copied and reduced in ``reduce()``. ``wait_time`` is the time the last ``reduce()`` took
    (the part of the communication that backward did not hide).
    """

    def __init__(self, world, params, bucket_floats=BUCKET_FLOATS, overlap=True, n_values=0):
        params = list(params)
        self.world, self.overlap = world, overlap
        groups, cur, n = [], [], 0
        for p in reversed(params):
            cur.append(p)
            n += p.size
            if n >= bucket_floats:
                groups.append(cur)
                cur, n = [], 0
        if cur or not groups:
            groups.append(cur)
        dtypes = {p.dtype for p in params}
        if len(dtypes) > 1:
            raise TypeError(f"GradReducer: the parameters mix dtypes {sorted(map(str, dtypes))}")
        dtype = dtypes.pop() if dtypes else np.float32
        self.n_values = n_values
        self.buckets = [_Bucket(g, n_values if i == len(groups) - 1 else 0, dtype) for i, g in enumerate(groups)]
        self.slot = {}
        for k, b in enumerate(self.buckets):
            offset = 0
            for p in b.params:
                self.slot[id(p)] = (k, offset)
                offset += p.size
        self.next = 0  # first bucket not started
        self.copied = set()  # id of the parameters copied into their bucket this step
        self.wait_time = 0.0
        for p in params:
            p.grad_hook = self._hook if overlap and world.size > 1 else None

    def _copy_in(self, p):
        k, offset = self.slot[id(p)]
        b = self.buckets[k]
        view = b.buf[offset:offset + p.size]
        if p.grad is None:
            view[...] = 0
        else:
            view[...] = p.grad.ravel()
        b.filled += 1
        self.copied.add(id(p))

    def _hook(self, p):
        self._copy_in(p)
        while self.next < len(self.buckets) - 1:  # the last bucket waits for the values
            b = self.buckets[self.next]
            if b.filled < len(b.params):
                break
            b.request = self.world.start_allreduce(b.buf)
            self.next += 1
        for b in self.buckets[:self.next]:
            b.request.Test()  # Open MPI advances non-blocking collectives inside MPI calls

    def reduce(self, values=()):
        """Sums the gradients over the ranks into every ``.grad``, and the ``n_values`` numbers
        ``values`` along with them; -> their sums (float64 ndarray)."""
        t0 = time.perf_counter()
        for b in self.buckets:
            for p in b.params:
                if id(p) not in self.copied:  # overlap off, or the parameter got no gradient
                    self._copy_in(p)
        if len(values) != self.n_values:
            raise ValueError(f"GradReducer.reduce: {len(values)} values, made for {self.n_values}")
        last = self.buckets[-1].buf
        last[len(last) - self.n_values:] = values
        if self.world.size > 1:
            for k in range(self.next, len(self.buckets)):
                self.buckets[k].request = self.world.start_allreduce(self.buckets[k].buf)
            for k, b in enumerate(self.buckets):
                self.world.wait(b.request, f"gradient allreduce (bucket {k + 1}/{len(self.buckets)})")
                b.request = None
        for b in self.buckets:
            offset = 0
            for p in b.params:
                p.grad = b.buf[offset:offset + p.size].reshape(p.shape)
                offset += p.size
            b.filled = 0
        self.next = 0
        self.copied.clear()
        self.wait_time = time.perf_counter() - t0
        return last[len(last) - self.n_values:].astype(np.float64)


def loss_scale(world, batch_size):
    """The factor of rank's mean loss over its shard that makes the ranks' gradients sum to the
    gradient of the mean loss over the global batch: shard length / batch_size."""
    lo, hi = shard_bounds(batch_size, world.rank, world.size)
    return (hi - lo) / batch_size


def enable_sync_batch_norm(world):
    """Training BatchNorm normalizes with the statistics of the global batch (all ranks)."""
    from . import functional as F

    F.set_batch_norm_allreduce(lambda a: world.allreduce(np.ascontiguousarray(a), "sync-BN allreduce"))


def reduce_sums(world, values, what="evaluation counts"):
    """Sums a few numbers over the ranks (float64); -> ndarray."""
    return world.allreduce(np.array(values, np.float64), what)
