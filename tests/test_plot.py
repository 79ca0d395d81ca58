"""plot_report: eval reports drawn into image files (pure drawing: the reports are built here)."""

from __future__ import annotations

import copy
import os
import sys

import pytest
from matplotlib.figure import Figure
from matplotlib.image import imread

from spectrum_local.errors import InputError, SpectrumError
from spectrum_local.plot import plot_report

STATES = ["Alabama", "Alaska", "Arizona", "Arkansas", "California", "Colorado", "Connecticut",
          "Delaware", "Florida", "Georgia", "Hawaii", "Idaho", "Illinois", "Indiana", "Iowa",
          "Kansas", "Kentucky", "Louisiana", "Maine", "Maryland", "Massachusetts", "Michigan",
          "Minnesota", "Mississippi", "Missouri", "Montana", "Nebraska", "Nevada",
          "New Hampshire", "New Jersey", "New Mexico", "New York", "North Carolina",
          "North Dakota", "Ohio", "Oklahoma", "Oregon", "Pennsylvania", "Rhode Island",
          "South Carolina", "South Dakota", "Tennessee", "Texas", "Utah", "Vermont", "Virginia",
          "Washington", "West Virginia", "Wisconsin", "Wyoming"]


def normalized(weights):
    return [w / sum(weights) for w in weights]


def distribution(task_id, candidates, target, probs, ordinal=False):
    return {"id": task_id, "type": "distribution", "candidates": candidates, "target": target,
            "probs": probs, "logprobs": [-1.0] * len(candidates), "ordinal": ordinal,
            "metrics": {"coverage": 0.84, "js_divergence": 0.14, "kl_divergence": 0.5,
                        "cross_entropy": 2.8, "mode_match": 1}}


def dice(shift=0.0):
    target = normalized([6 - abs(s - 7) for s in range(2, 13)])
    return distribution("two-dice-sum", [str(s) for s in range(2, 13)], target,
                        normalized([t + shift * (s % 3) for s, t in enumerate(target)]), True)


def states(shift=1.0):
    return distribution("us-states", STATES, [1 / 50] * 50,
                        normalized([1 + shift * (i % 7) for i in range(50)]))


def steer(optimal_loss, offset=0.0):
    k = [0, 1, 2, 4, 8, 16]
    loss = [0.9 + offset, 0.8 + offset, 0.7, 0.62, 0.57, 0.55]
    return {"id": "biased-coin", "type": "steerability", "k": k, "loss": loss,
            "loss_by_ordering": [[x + d for x in loss] for d in (-0.05, 0.0, 0.04)],
            "optimal_loss": optimal_loss,
            "metrics": {"first_loss": loss[0], "last_loss": loss[-1], "slope": -0.02}}


def generation(task_id, valid_set_size, coverage, valid=0.9):
    return {"id": task_id, "type": "generation", "n": 100, "valid_set_size": valid_set_size,
            "answers": [{"text": "Ohio", "count": 7, "valid": True},
                        {"text": "Atlantis", "count": 1, "valid": False}],
            "metrics": {"valid_fraction": valid, "unique_of_valid": 0.5, "unique_valid": 45,
                        "valid_set_coverage": coverage, "pairwise_collision": 0.02,
                        "normalized_entropy": None if coverage is None else 0.95}}


def report(tasks):
    return {"model": "/models/spectrum-gemma-3-12b-v1-Q4_K_M.gguf", "format": "gemma3",
            "seed": 0, "end_token": True, "tasks": tasks, "summary": {}}


def full_report():
    return report([dice(), states(),
                   distribution("coin", ["heads"], [1.0], [1.0]),  # one candidate
                   steer(None), steer(0.5004),
                   generation("us-states-gen", 50, 0.9),
                   generation(7, None, None, valid=1.0)])  # ids may be numbers


def comparison():
    pairs = [(dice(), dice(0.02)), (states(), states(0.5)), (steer(0.5004), steer(0.5004, 0.2)),
             (generation("us-states-gen", 50, 0.9), generation("us-states-gen", 50, 0.7, 0.6))]
    tasks = [{"id": a["id"], "type": a["type"], "a": a, "b": b, "js_between": 0.01,
              "first_token_kl": 0.02, "diff": {}} for a, b in pairs]
    return {**report(tasks), "vs": "/other/gemma-3-12b-base-Q4_K_M.gguf"}


def test_png_is_written_and_grows_with_the_panels(tmp_path):
    small, full = tmp_path / "small.png", tmp_path / "full.png"
    plot_report(report([dice()]), small)
    plot_report(full_report(), str(full))
    small_pixels, full_pixels = imread(small), imread(full)
    assert full_pixels.shape[0] > small_pixels.shape[0]  # taller: more rows of panels
    assert full_pixels.shape[1] == small_pixels.shape[1]
    assert full_pixels[..., :3].std() > 0.05  # something was drawn, not a blank page
    assert sorted(os.listdir(tmp_path)) == ["full.png", "small.png"]  # no temporary file left


def test_comparison(tmp_path):
    plot_report(comparison(), tmp_path / "compare.png")
    assert imread(tmp_path / "compare.png").shape[0] > 500


def test_svg_and_no_extension(tmp_path):
    plot_report(full_report(), tmp_path / "report.svg")
    assert (tmp_path / "report.svg").read_text().lstrip().startswith("<?xml")
    plot_report(full_report(), tmp_path / "report")  # no extension: PNG, matplotlib's default
    assert (tmp_path / "report").read_bytes().startswith(b"\x89PNG")


def test_nothing_to_draw_still_writes_a_figure(tmp_path):
    plot_report(report([{"id": "future", "type": "something-new"}]), tmp_path / "empty.png")
    assert imread(tmp_path / "empty.png").shape[0] > 100


def test_labels_are_not_mathtext(tmp_path):
    task = distribution("prices $", ["$5", "$10 or $20", "a\nb", "x" * 80], [0.25] * 4,
                        [0.25] * 4)
    plot_report(report([task]), tmp_path / "dollars.png")


def test_old_file_is_replaced_only_on_success(tmp_path, monkeypatch):
    path = tmp_path / "plot.png"
    path.write_bytes(b"the user's old plot")

    bad = full_report()
    bad["tasks"][0]["probs"] = bad["tasks"][0]["probs"][:-1]
    with pytest.raises(InputError, match="two-dice-sum"):
        plot_report(bad, path)
    bad = copy.deepcopy(comparison())
    bad["tasks"][2]["b"]["loss_by_ordering"][0].pop()
    with pytest.raises(InputError, match="biased-coin"):
        plot_report(bad, path)
    with pytest.raises(InputError, match=r"\.xyz"):
        plot_report(report([dice()]), tmp_path / "plot.xyz")

    def fail_halfway(self, f, **kwargs):
        f.write(b"half a PNG")
        raise RuntimeError("drawing failed")
    monkeypatch.setattr(Figure, "savefig", fail_halfway)
    with pytest.raises(RuntimeError, match="drawing failed"):
        plot_report(report([dice()]), path)

    assert path.read_bytes() == b"the user's old plot"
    assert os.listdir(tmp_path) == ["plot.png"]

    monkeypatch.undo()
    plot_report(report([dice()]), path)
    assert imread(path).shape[0] > 100


def test_unwritable_folder_is_a_spectrum_error(tmp_path):
    with pytest.raises(SpectrumError, match="can't write"):
        plot_report(report([dice()]), tmp_path / "no-such-folder" / "plot.png")


def test_missing_matplotlib_is_a_spectrum_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import of it now fails
    with pytest.raises(SpectrumError, match=r"pip install 'spectrum-local\[eval\]'"):
        plot_report(report([dice()]), tmp_path / "plot.png")
    assert not (tmp_path / "plot.png").exists()

