"""python -m mbnet.plot: several runs' curves on common axes, and its one-line errors."""
import json

import pytest

from mbnet import plot

PNG = b"\x89PNG\r\n\x1a\n"


def _run(d, accs, val_split=0.1, ema=True):
    d.mkdir()
    rows = []
    for e, acc in enumerate(accs, 1):
        row = {"epoch": e, "train_loss": 2.0 / e, "train_acc": 0.1 * e}
        if acc is not None:
            row.update(test_acc=acc - 0.01, test_loss=1.0, **({"ema_test_acc": acc} if ema else {}))
        rows.append(row)
    rows[-1]["tta_test_acc"] = accs[-1] + 0.005
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "config.json").write_text(json.dumps({"val_split": val_split}))
    return d


def test_runs_are_drawn_on_common_axes_with_their_split(tmp_path, monkeypatch):
    a, b = _run(tmp_path / "a", [None, 0.5, None, 0.7]), _run(tmp_path / "b", [0.4, 0.6, 0.65, 0.8], ema=False)
    out = tmp_path / "cmp.png"
    assert plot.main([str(a), str(b), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG
    drawn = {}
    monkeypatch.setattr(plot, "plot_runs", lambda runs, path, split: drawn.update(runs=runs, split=split))
    assert plot.main([str(a), str(b), "--out", str(out), "--label", "CutMix", "--label", "plain"]) == 0
    assert drawn["split"] == "held-out" and list(drawn["runs"]) == ["CutMix", "plain"]
    assert [r["epoch"] for r in drawn["runs"]["CutMix"]] == [1, 2, 3, 4]


@pytest.mark.parametrize("make,extra,message", [
    (lambda t: [_run(t / "a", [0.5]), _run(t / "b", [0.5], val_split=None)], [],
     "evaluated on different splits (held-out, test)"),
    (lambda t: [_run(t / "a", [0.5]), t], [], "no metrics.jsonl with rows"),
    (lambda t: [_run(t / "a", [0.5])], ["--label", "x", "--label", "y"], "2 --label for 1 runs"),
    (lambda t: [_run(t / "a", [0.5]), _run(t / "a2", [0.6])], ["--label", "same", "--label", "same"],
     "two runs named 'same'"),
])
def test_bad_arguments_are_one_line(tmp_path, capsys, make, extra, message):
    runs = make(tmp_path)
    with pytest.raises(SystemExit) as e:
        plot.main([str(r) for r in runs] + ["--out", str(tmp_path / "o.png")] + extra)
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


def test_out_in_a_missing_directory_is_refused(tmp_path, capsys):
    a = _run(tmp_path / "a", [0.5])
    with pytest.raises(SystemExit) as e:
        plot.main([str(a), "--out", str(tmp_path / "no" / "o.png")])
    assert e.value.code == 2 and f"--out {tmp_path / 'no' / 'o.png'}: no such directory" in capsys.readouterr().err
