"""A whole run over a task file: ``evaluate`` runs (or compares) every task, appends each
result to a results file as it completes, resumes from one, and sums the run up by task type."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..display import Progress
from ..errors import InputError
from ..metrics import means
from ..model import SpectrumModel
from ..textfile import ResultsFile, open_results
from .compare import Comparison, compare_task
from .run import TaskResult, run_task
from .tasks import FIELDS, Task


@dataclass(frozen=True)
class EvalReport:
    """The results of a run over a task file, with each task type's means (``summary``)."""

    model: str
    format: str
    seed: int
    end_token: bool
    tasks: list  # TaskResult, or Comparison with ``vs``
    vs: str | None = None

    def summary(self) -> dict:
        """Per task type: the mean of each metric over the tasks that have it (with ``vs``:
        each model's means, the differences', and the between-model measures')."""
        summary = {}
        for kind in FIELDS:
            results = [r for r in self.tasks if r.type == kind]
            if not results:
                continue
            if self.vs is None:
                summary[kind] = {**means([r.metrics for r in results]), "tasks": len(results)}
                continue
            between = means([{"js_between": r.js_between, "first_token_kl": r.first_token_kl}
                              for r in results])
            summary[kind] = {"a": means([r.a.metrics for r in results]),
                             "b": means([r.b.metrics for r in results]),
                             "diff": means([r.diff for r in results]),
                             **between, "tasks": len(results)}
        return summary

    def to_dict(self) -> dict:
        head = {"model": self.model, **({"vs": self.vs} if self.vs else {}),
                "format": self.format, "seed": self.seed, "end_token": self.end_token}
        return {**head, "tasks": [r.to_dict() for r in self.tasks], "summary": self.summary()}


def evaluate(model: SpectrumModel, tasks: list[Task], *, vs: SpectrumModel | None = None,
             seed: int = 0, end_token: bool = True, out: str | ResultsFile | None = None,
             resume: bool = False, progress: bool = True) -> EvalReport:
    """Run ``tasks`` on ``model`` (and compare with ``vs``). With ``out``, each task's result
    is appended to that JSONL file as it completes; ``resume`` reads the results already
    there (from the same models and settings) and runs only the rest. ``out`` may also be a file
    that ``open_results`` opened (and read, with ``resume``): the command line opens it before
    loading the models."""
    if isinstance(out, (str, Path)):
        with open_results(out, resume=resume) as opened:
            return evaluate(model, tasks, vs=vs, seed=seed, end_token=end_token, out=opened,
                            progress=progress)
    run = {"model": model_label(model), "vs": model_label(vs) if vs else None, "seed": seed,
           "end_token": end_token}
    done = _read_done(out, run, tasks) if out is not None else {}
    results = []
    todo = [t for t in tasks if json.dumps(t.id) not in done]
    with Progress(len(todo), enabled=progress) as bar:
        for task in tasks:
            key = json.dumps(task.id)
            if key in done:
                result = done[key]
            else:
                result = (compare_task(model, vs, task, seed=seed, end_token=end_token) if vs
                          else run_task(model, task, seed=seed, end_token=end_token))
                if out is not None:
                    out.write({**run, **result.to_dict()})
                bar.advance()
            results.append(result)
    return EvalReport(run["model"], model.format, seed, end_token, results, run["vs"])


def model_label(model: SpectrumModel) -> str:
    """The model's file and its adapters: a base with and without an adapter are two models."""
    adapters = model.engine.describe().get("lora", [])
    return " + ".join([model.path] + [f"{Path(a['path']).name}:{a['scale']:g}" for a in adapters])


def _read_done(out: ResultsFile, run: dict, tasks: list[Task]) -> dict:
    """The results already in ``out`` (resume) by id (as JSON text), checked to come from this
    run: the model's label is known only once it has loaded."""
    ids = {json.dumps(t.id) for t in tasks}
    done = {}
    for number, record in enumerate(out.earlier, start=1):
        settings = {name: record.get(name) for name in run}
        if settings != run:
            different = ", ".join(f"{name} {settings[name]!r}" for name in run
                                  if settings[name] != run[name])
            raise InputError(f"{out.name} line {number} is from another run ({different}); "
                             "choose another --out or the same settings")
        if json.dumps(record["id"]) not in ids:
            raise InputError(f"{out.name} line {number}: task {record['id']!r} is not in these "
                             "tasks")
        kind = Comparison if run["vs"] else TaskResult
        done[json.dumps(record["id"])] = kind.from_dict(
            {k: v for k, v in record.items() if k not in run})
    return done
