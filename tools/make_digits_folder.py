"""Writes scikit-learn's handwritten digits as an image-folder tree for `python -m mbnet.train`.

    python tools/make_digits_folder.py ROOT [--test-fraction 0.2] [--seed 0]

sklearn.datasets.load_digits: 1,797 grayscale 8x8 images of the digits 0-9 (values 0..16, scaled
here to 0..255), bundled with scikit-learn (nothing is downloaded). Writes
ROOT/train/<digit>/NNNN.png and ROOT/test/<digit>/NNNN.png (NNNN = the image's index in
load_digits). The test split is round(test_fraction * n) images of each digit, chosen by
numpy.random.default_rng(seed), so the same command always writes the same split. With
--test-fraction 0 only train/ is written (then train with --val-split F).

A tool, not a benchmark or part of mbnet: scikit-learn is no dependency of mbnet, and the tree it
writes is the data set behind the README's image-folder figure.
"""
import argparse
import sys
from pathlib import Path

import numpy as np


def write_digits(root, test_fraction=0.2, seed=0):
    """-> {split: number of images written}."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255 / 16)).astype(np.uint8)  # (1797, 8, 8), 0..16 -> 0..255
    labels = d.target
    test = np.zeros(len(labels), bool)
    rng = np.random.default_rng(seed)
    for k in range(10):
        idx = np.flatnonzero(labels == k)
        test[rng.permutation(idx)[:round(test_fraction * len(idx))]] = True
    counts = {"train": 0, "test": 0}
    for i, (im, y) in enumerate(zip(images, labels)):
        split = "test" if test[i] else "train"
        out = Path(root) / split / str(y)
        out.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im, mode="L").save(out / f"{i:04d}.png")
        counts[split] += 1
    return counts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", help="output directory (must not exist yet)")
    ap.add_argument("--test-fraction", type=float, default=0.2, help="held out per digit (default 0.2)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if Path(args.root).exists():
        ap.error(f"{args.root} already exists; choose a new directory")
    if not 0 <= args.test_fraction < 1:
        ap.error(f"--test-fraction {args.test_fraction}: must be in [0, 1)")
    counts = write_digits(args.root, args.test_fraction, args.seed)
    print(f"wrote {counts['train']} train and {counts['test']} test images into {args.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
