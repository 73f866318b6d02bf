"""Robust accuracy users can trust: per-sample flags for each attack and their worst case
(RobustBench style: a sample is robust only if every attack in the suite failed on it), with
the settings beside every number and the sanity checks of `d2r.sanity`.

- `core`: `evaluate` takes a model and images (no files); the flags and suites. Its options
  travel as one `EvalOptions` (`evaluate_with`).
- `runs`: `evaluate_run` is `d2r eval RUN`: a run's checkpoints, each result kept in the run's
  eval.json store (d2r.evalstore), resumable batch by batch; `evaluate_weights` for a file;
  both build an `EvalOptions` and an `EvalData` (the test images' source) for
  `evaluate_models`.
- `command`: `d2r eval`'s parser and handler.
"""

from d2r.attacks import EvaluationWarning
from d2r.evaluate.core import (
    EvalOptions,
    attack_norm,
    attack_settings,
    build_suite,
    evaluate,
    evaluate_with,
    suite_flags,
    suite_norm,
    worst_case,
)
from d2r.evaluate.runs import (
    EvalData,
    EvaluationStopped,
    ResultsNotWritten,
    attack_plan,
    evaluate_models,
    evaluate_run,
    evaluate_weights,
    suite_keys,
    weights_eval_dir,
)
from d2r.files import file_sha256
from d2r.measure import Attack, as_float, batch_flags, batch_seed, correct_flags, seeded
from d2r.tables import markdown_table

__all__ = [
    "Attack",
    "EvalData",
    "EvalOptions",
    "EvaluationStopped",
    "EvaluationWarning",
    "ResultsNotWritten",
    "as_float",
    "attack_norm",
    "attack_plan",
    "attack_settings",
    "batch_flags",
    "batch_seed",
    "build_suite",
    "correct_flags",
    "evaluate",
    "evaluate_models",
    "evaluate_run",
    "evaluate_weights",
    "evaluate_with",
    "file_sha256",
    "markdown_table",
    "seeded",
    "suite_flags",
    "suite_keys",
    "suite_norm",
    "weights_eval_dir",
    "worst_case",
]
