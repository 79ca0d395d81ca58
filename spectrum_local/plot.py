"""Drawing an eval report (``spectrum-local eval --plot FILE``) with matplotlib.

One panel per distribution task (the target and the model's probabilities over the candidates),
one per steerability task (loss against the number of examples k), and one for all generation
tasks together. A comparison report (``--vs``) draws model b beside model a in every panel.
Figures are made with ``matplotlib.figure.Figure`` directly, never pyplot, so drawing needs no
display and leaves the caller's matplotlib state alone.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from .display import percent
from .errors import InputError, SpectrumError

COLUMNS = 3
CELL = (5.4, 3.6)  # inches per grid cell
DPI = 110
WIDE = 12  # distribution tasks with more candidates than this get a whole row
TARGET, MODEL_COLORS = "0.55", ("C0", "C1")


def check_available() -> None:
    """Fail before a long eval run, not after it, when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SpectrumError("--plot needs matplotlib: pip install 'spectrum-local[eval]'") from None


def plot_report(report: dict, path: str | os.PathLike) -> None:
    """Draw an eval report (single-model, or a ``--vs`` comparison) into ``path``; the format
    follows its extension (.png, .svg, .pdf, ...; .png when it has none).

    A report with no task that can be drawn still gets a figure, saying so, so that ``--plot``
    always leaves the file it was asked for. The figure goes to a temporary file in the same
    folder first and replaces ``path`` only once complete. Raises InputError for a malformed
    report or an extension matplotlib can't write, SpectrumError when matplotlib is missing or
    the file can't be written."""
    check_available()
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    path = Path(path)
    names = [report["model"]] + ([report["vs"]] if "vs" in report else [])
    labels = [Path(n).name for n in names]
    if len(set(labels)) < len(labels):  # same file name in two folders: show the full paths
        labels = names
    # Each task as its list of runs [(label, run)], one per model: the panels draw them alike.
    tasks = [(t, [(labels[0], t["a"]), (labels[1], t["b"])] if "vs" in report
              else [(labels[0], t)]) for t in report["tasks"]]
    panels = [(_distribution, len(runs[0][1]["candidates"]) > WIDE, runs)
              for t, runs in tasks if t["type"] == "distribution"]
    panels += [(_steerability, False, runs) for t, runs in tasks if t["type"] == "steerability"]
    generation = [runs for t, runs in tasks if t["type"] == "generation"]
    if generation:
        panels.append((_generation, len(generation) > 4, generation))
    panels.sort(key=lambda panel: panel[1])  # narrow panels fill rows of 3; wide ones follow

    narrow = sum(not wide for _, wide, _ in panels)
    rows = math.ceil(narrow / COLUMNS) + sum(wide for _, wide, _ in panels)
    fig = Figure(figsize=(CELL[0] * COLUMNS, CELL[1] * max(rows, 1) + 0.5), dpi=DPI,
                 layout="constrained")
    # One key for the colours of all panels (model names are too long for a legend in each), as
    # the figure's heading: constrained layout would overlap a suptitle and a legend above it.
    drawn = {draw for draw, _, _ in panels}
    keys = [Patch(color=TARGET, label="target")] if _distribution in drawn else []
    keys += [Patch(color=color, label=label) for label, color in zip(labels, MODEL_COLORS)]
    heading = (f"spectrum-local eval · format {report.get('format')} · seed {report.get('seed')}"
               f" · end token {'on' if report.get('end_token') else 'off'}")
    fig.legend(handles=keys, loc="outside upper center", ncols=len(keys), frameon=False,
               title=heading, title_fontsize=13)
    grid = fig.add_gridspec(max(rows, 1), COLUMNS)
    for i, (draw, wide, runs) in enumerate(panels):
        row = i // COLUMNS if i < narrow else math.ceil(narrow / COLUMNS) + i - narrow
        draw(fig.add_subplot(grid[row, :] if wide else grid[row, i % COLUMNS]), runs)
    if not panels:
        fig.text(0.5, 0.5, "no tasks to draw", ha="center", va="center", fontsize=14)
    _save(fig, path)


def _distribution(ax, runs: list) -> None:
    first = runs[0][1]
    candidates = first["candidates"]
    series = [(first["target"], TARGET)]
    series += [(run["probs"], color) for (_, run), color in zip(runs, MODEL_COLORS)]
    if any(len(values) != len(candidates) for values, _ in series):
        raise InputError(f"task {first['id']}: target and probs must have one value per candidate")
    width = 0.8 / len(series)
    for j, (values, color) in enumerate(series):
        ax.bar([i + (j - (len(series) - 1) / 2) * width for i in range(len(candidates))], values,
               width, color=color)
    many, long = len(candidates) > WIDE, max(map(len, candidates), default=0) > 4
    ax.set_xticks(range(len(candidates)), [_text(c) for c in candidates],
                  rotation=90 if many else 30 if long else 0, fontsize=8 if many else 9,
                  ha="right" if many or long else "center", va="center" if many else "top",
                  rotation_mode="anchor")
    js = " / ".join(_num(run["metrics"].get("js_divergence"), ".3f") for _, run in runs)
    # percent() keeps a tiny coverage (a base model's 1e-15) readable instead of "0%"
    coverage = " / ".join("n/a" if run["metrics"].get("coverage") is None
                          else percent(run["metrics"]["coverage"]) for _, run in runs)
    ax.set_title(f"{_text(first['id'])}\nJS {js} · coverage {coverage}", fontsize=10)
    ax.set_ylabel("probability")
    ax.set_xlim(-0.6, len(candidates) - 0.4)


def _steerability(ax, runs: list) -> None:
    for (_, run), color in zip(runs, MODEL_COLORS):
        k = run["k"]
        if len(run["loss"]) != len(k) or any(len(o) != len(k) for o in run["loss_by_ordering"]):
            raise InputError(f"task {run['id']}: loss and loss_by_ordering need one value per k")
        for ordering in run["loss_by_ordering"]:  # faint: the spread behind the mean
            ax.plot(k, ordering, color=color, alpha=0.2, linewidth=0.8)
        ax.plot(k, run["loss"], color=color, marker="o", linewidth=2)
    first = runs[0][1]
    if first.get("optimal_loss") is not None:  # one process: the same for both models
        ax.axhline(first["optimal_loss"], color="0.3", linestyle="--",
                   label="entropy of the process")
        ax.legend(fontsize=8)
    ax.set_xscale("symlog", linthresh=1)  # k usually doubles: 0, 1, 2, 4, 8, ...
    ax.minorticks_off()
    ax.set_xticks(first["k"], [str(k) for k in first["k"]])
    slopes = " / ".join(_num(run["metrics"].get("slope"), "+.3f") for _, run in runs)
    ax.set_title(f"{_text(first['id'])}\nslope {slopes} nats per k", fontsize=10)
    ax.set_xlabel("k (examples in the prompt)")
    ax.set_ylabel("loss (nats per output)")


def _generation(ax, tasks: list) -> None:
    bars = [(metric, model, alpha) for model in range(len(tasks[0]))
            for metric, alpha in (("valid_fraction", 1.0), ("unique_of_valid", 0.45))]
    width = 0.8 / len(bars)
    for j, (metric, model, alpha) in enumerate(bars):
        values = [runs[model][1]["metrics"].get(metric) for runs in tasks]
        ax.bar([i + (j - (len(bars) - 1) / 2) * width for i in range(len(tasks))],
               [math.nan if v is None else v for v in values], width, alpha=alpha,
               color=MODEL_COLORS[model], label=metric.replace("_", " ") if model == 0 else None)
    ax.set_xticks(range(len(tasks)),
                  [f"{_text(runs[0][1]['id'])}\nn={runs[0][1]['n']}" for runs in tasks],
                  fontsize=8)
    ax.set_ylim(0, 1.15)  # headroom for the legend above the bars
    ax.set_title("generation", fontsize=10)
    ax.legend(fontsize=8, ncols=2, loc="upper center")


def _text(s: str | int, limit: int = 24) -> str:
    """A label as drawn (task ids may be numbers): shortened, newlines visible, and "$" not read
    as mathtext."""
    s = str(s).replace("\n", "\\n")
    return (s if len(s) <= limit else s[:limit - 1] + "…").replace("$", r"\$")


def _num(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def _save(fig, path: Path) -> None:
    fmt = path.suffix[1:].lower() or "png"
    if fmt not in fig.canvas.get_supported_filetypes():
        raise InputError(f"--plot: can't write .{fmt} files; use .png, .svg or .pdf")
    # Not mkstemp: its files are private (0600), and the plot should get the usual permissions.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            fig.savefig(f, format=fmt)
        os.replace(tmp, path)
    except OSError as e:
        raise SpectrumError(f"--plot: can't write {path}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)  # after a failure; after os.replace it is gone already
