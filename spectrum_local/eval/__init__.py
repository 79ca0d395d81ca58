"""``spectrum-local eval``: how well a model matches distributions, and what a change to it
(quantization, an adapter) costs.

- ``tasks``: the task file (``distribution``, ``generation``, ``steerability``) and its checks;
- ``run``: one task on one model, its metrics (computed in ``metrics.py``);
- ``compare``: one task on two models, how far apart they are (the quantization report);
- ``report``: a whole run (``evaluate``): results files, resume, the summary by task type.
"""

from .compare import Comparison, compare_task, first_token_kl, task_prompt
from .report import EvalReport, evaluate, model_label
from .run import TaskResult, run_task
from .tasks import (FIELDS, SUITES, DistributionTask, GenerationTask, SteerabilityTask, Task,
                    Validator, load_tasks, parse_task)

__all__ = ["FIELDS", "SUITES", "Comparison", "DistributionTask", "EvalReport", "GenerationTask",
           "SteerabilityTask", "Task", "TaskResult", "Validator", "compare_task", "evaluate",
           "first_token_kl", "load_tasks", "model_label", "parse_task", "run_task",
           "task_prompt"]
