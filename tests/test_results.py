"""The README's accuracy claims, checked by running them: every `python -m mbnet.evaluate docs/...`
command of the README that ends in a comment "# NN.NN%" is run on the shared CIFAR-10 copy beside
the checkout (skipped where it is not there) and must print that accuracy."""
import re
from pathlib import Path

import pytest

from mbnet import evaluate

ROOT = Path(__file__).resolve().parents[1]
DATA = "../shared/data/cifar10-jpeg"
CLAIM = re.compile(r"^python -m mbnet\.evaluate (docs/\S+\.npz)((?: --[\w-]+(?: \d+)?)*) --data-dir "
                   + re.escape(DATA) + r"\s+# (\d+\.\d\d)%$", re.M)
# Another CPU or build rounds the sums differently, which may move an image that sits on a decision
# boundary: the claim must hold within 3 of the 10,000 test images.
SLACK = 0.03


def claims():
    return [(weights, opts.split(), float(pct)) for weights, opts, pct in CLAIM.findall((ROOT / "README.md").read_text())]


def test_the_readme_makes_claims_this_test_finds():
    found = claims()
    assert len(found) >= 2, found
    assert all((ROOT / weights).is_file() for weights, _, _ in found), found


@pytest.mark.parametrize("weights,opts,claimed", claims(), ids=lambda v: " ".join(v) if isinstance(v, list) else str(v))
def test_readme_evaluate_commands_print_the_accuracy_claimed(weights, opts, claimed, tmp_path_factory, monkeypatch,
                                                             capsys):
    data = ROOT / DATA
    if not (data / "test").is_dir():
        pytest.skip(f"the shared CIFAR-10 copy is not beside the checkout ({data})")
    monkeypatch.setenv("MBNET_CACHE", str(tmp_path_factory.getbasetemp() / "mbnet-cache"))  # shared by the claims
    assert evaluate.main([str(ROOT / weights), *opts, "--data-dir", str(data)]) == 0
    out = capsys.readouterr().out
    correct, total = map(int, re.search(r"^test accuracy: [\d.]+% \((\d+)/(\d+)\)$", out, re.M).groups())
    assert total == 10000
    assert abs(100 * correct / total - claimed) <= SLACK + 1e-9, (weights, opts, out.splitlines()[:2])
