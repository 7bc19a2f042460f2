"""Run by tests/test_distributed.py, alone or under `mpirun -n R`: a few SGD steps of a tiny
MobileNetV1 on one fixed global batch sequence, each rank on its shard, and rank 0 writes the
weights and gradients to argv[1]. argv[2:]: "sync" (--sync-bn), "nooverlap", "f64"."""
import sys

import numpy as np

from mbnet import Tensor, _C, optim
from mbnet import distributed as dist
from mbnet.functional import cross_entropy
from mbnet.models import MobileNetV1

STEPS, B = 3, 10

out, flags = sys.argv[1], set(sys.argv[2:])
_C.set_num_threads(1)
dtype = np.float64 if "f64" in flags else np.float32
w = dist.world(timeout=60)
rng = np.random.default_rng(0)
x_all = rng.standard_normal((STEPS * B, 16, 16, 3)).astype(dtype)
y_all = rng.integers(0, 10, STEPS * B)
model = MobileNetV1(alpha=0.25, num_classes=10, input_size=16, seed=0, dtype=dtype)
opt = optim.make_optimizer("sgd", model.parameters(), 0.05, weight_decay=5e-4)
if "sync" in flags:
    dist.enable_sync_batch_norm(w)
# small buckets, so that several of them start during backward
reducer = dist.GradReducer(w, model.parameters(), bucket_floats=20000, overlap="nooverlap" not in flags)
lo, hi = dist.shard_bounds(B, w.rank, w.size)
for step in range(STEPS):
    x, y = x_all[step * B:(step + 1) * B][lo:hi], y_all[step * B:(step + 1) * B][lo:hi]
    model.zero_grad()
    cross_entropy(model(Tensor(x)), y).backward(dist.loss_scale(w, B))
    reducer.reduce()
    opt.step()
if w.rank == 0:
    np.savez(out, **{k: p.data for k, p in model.named_parameters()}, **dict(model.named_buffers()),
             **{"grad." + k: p.grad for k, p in model.named_parameters()},
             buckets=len(reducer.buckets))
