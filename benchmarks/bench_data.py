"""The input pipeline: images decoded into the cache per second, batches per second out of the
Loader, and a training step fed by the Loader against the same step on one reused batch.

    flock /tmp/mbnet-bench.lock python -m benchmarks.bench_data [--sizes 32,224] [--images 2000]
                                   [--batch 128] [--alpha 1.0] [--steps 5] [--workers 0]
                                   [--threads T] [--tiny] [--json out.json]

For each side S: writes --images JPEGs of about 1.2 S x 1.1 S (so every image is resized and
cropped, as a photo folder would be) in 10 class folders, builds the cache (data.load_data with
--workers processes; 0 = all cores) and times it once; times a second load_data (the cache's
check and memory map); times --steps batches out of a training Loader (shuffle, crop with padding
S/8, flip, normalize; prefetch thread); then times --steps MobileNetV1 training steps (forward,
cross-entropy, backward, SGD) fed by that Loader against --steps steps on one batch reused, each
the median of its steps. A ratio near 1 means the Loader is hidden behind the step.
"""
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from mbnet import _C

from . import common


def write_jpegs(root, n, size, classes=10, seed=0):
    """root/train/<k>/NNNN.jpg (n images) and root/test/<k>/0.jpg: smooth random pictures of
    about 1.2 size x 1.1 size pixels, JPEG quality 90."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = round(1.2 * size), round(1.1 * size)
    for split, count in (("train", n), ("test", classes)):
        for i in range(count):
            d = Path(root) / split / str(i % classes)
            d.mkdir(parents=True, exist_ok=True)
            small = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
            small.resize((w, h), Image.BICUBIC).save(d / f"{i:05d}.jpg", quality=90)


def step_fn(model, opt):
    """One training step on (x, y): zero_grad, forward, cross-entropy, backward, SGD update."""
    from mbnet import Tensor
    from mbnet.functional import cross_entropy

    def step(x, y):
        opt.zero_grad()
        loss = cross_entropy(model(Tensor(x)), y)
        loss.backward()
        opt.step()

    return step


def timed_steps(step, batches, steps):
    """Per-step seconds of `steps` steps after one untimed step, each taking the next (x, y) from
    batches (the wait for a batch counts toward its step)."""
    it = iter(batches)
    step(*next(it))  # warm-up; lets a prefetching loader get ahead as it does in training
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        x, y = next(it)
        step(x, y)
        times.append(time.perf_counter() - t0)
    return times


def run_size(size, images, batch, alpha, steps, workers):
    from mbnet import data, optim
    from mbnet.models import MobileNetV1

    with tempfile.TemporaryDirectory(prefix="mbnet-bench-data-") as tmp:
        write_jpegs(Path(tmp) / "src", images, size)
        cache = Path(tmp) / "cache"
        t0 = time.perf_counter()
        d = data.load_data(Path(tmp) / "src", resolution=size, cache_dir=cache, workers=workers)
        build = time.perf_counter() - t0
        hit = common.measure(lambda: data.load_data(Path(tmp) / "src", resolution=size, cache_dir=cache),
                             repeat=3, warmup=0)["median"]
        x, y = d["train_x"], d["train_y"]
        mean, std = data.channel_stats(x[:256])
        loader = data.Loader(x, y, batch, mean, std, train=True, seed=0, pad=round(size / 8))
        n_batches = max(1, min(steps, len(loader) - 1))  # + 1 warm-up step

        def drain():
            for i, _, _ in loader.epoch(0):
                if i + 1 == n_batches:
                    break

        drain_s = common.measure(drain, repeat=3)["median"]

        model = MobileNetV1(alpha, num_classes=10, input_size=size, seed=0)
        opt = optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        step = step_fn(model, opt)
        x0, y0 = loader.batch(0, 0)
        fixed = timed_steps(step, iter(lambda: (x0, y0), None), n_batches)
        with loader.epoch(1) as batches:
            fed = timed_steps(step, ((bx, by) for _, bx, by in batches), n_batches)
        del x, y, d  # release the memory maps before the directory goes
    fed_s, fixed_s = statistics.median(fed), statistics.median(fixed)
    return {"size": size, "images": images, "batch": batch, "alpha": alpha, "steps": n_batches,
            "decode_s": build, "decode_images_per_s": (images + 10) / build, "cache_hit_s": hit,
            "loader_batches_per_s": n_batches / drain_s, "loader_images_per_s": n_batches * batch / drain_s,
            "step_with_loader_s": fed_s, "step_reused_batch_s": fixed_s, "ratio": fed_s / fixed_s,
            "step_with_loader_times": fed, "step_reused_batch_times": fixed}


def run(sizes=(32, 224), images=2000, batch=128, alpha=1.0, steps=5, workers=0, threads=None, tiny=False):
    if threads is not None:
        _C.set_num_threads(threads)
    if tiny:
        images, batch, alpha, steps = 24, 2, 0.25, 2
    workers = workers or os.cpu_count() or 1
    rows = [run_size(s, images, batch, alpha, steps, workers) for s in sizes]
    return {"benchmark": "data", **common.machine_info(), "workers": workers, "tiny": tiny, "rows": rows}


def markdown(res):
    lines = [f"Input pipeline: JPEGs of about 1.2S x 1.1S decoded into the cache by {res['workers']} processes; "
             f"a training Loader (shuffle, padded crop, flip, normalize, prefetch); MobileNetV1 training steps "
             f"with {res['threads']} kernel threads fed by the Loader vs. on one reused batch (medians)",
             "", *common.header(res), ""]
    rows = [(f"{r['size']}x{r['size']}", r["images"], f"{r['decode_images_per_s']:.0f}",
             f"{r['cache_hit_s'] * 1e3:.0f}",
             f"{r['loader_batches_per_s']:.1f} ({r['loader_images_per_s']:.0f} img/s)",
             f"{r['alpha']} / {r['batch']}", f"{r['step_with_loader_s'] * 1e3:.1f}",
             f"{r['step_reused_batch_s'] * 1e3:.1f}", f"{r['ratio']:.3f}") for r in res["rows"]]
    lines.append(common.table(["S", "images", "decoded/s into the cache", "cached load + check (ms)",
                               "Loader batches/s", "alpha / batch", "step with Loader (ms)",
                               "step, reused batch (ms)", "ratio"], rows))
    return "\n".join(lines)


def main(argv=None):
    return common.cli(__doc__, run, markdown, argv, {"tiny": "24 images, batch 2, alpha 0.25, 2 steps: a smoke run",
                                                     "workers": "decoding processes (default 0: all cores)"})


if __name__ == "__main__":
    main()
