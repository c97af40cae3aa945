"""`supsup sweep CONFIG`: hyper-parameter search with Ray Tune, tracked in MLflow.

The search space is data (the config's `sweep` section), keyed by dotted config paths:
`train.density: {grid: [0.05, 0.1]}`, `train.lr: {loguniform: [1e-4, 1e-2]}`, `choice: [..]`,
`uniform: [low, high]`. Before any trial starts every key is checked to name a config field and
every grid/choice value and both bounds of every range are applied to the config and validated,
so `train.density: {grid: [0, 0.1]}` fails at once, naming `train.density`.

Each trial is a thin function around `supsup.train.train_group`: it rebuilds the config with its
values, carves a validation split off the *train* data (the test split never takes part in
selection), trains a few sample tasks vectorised and reports, at every log point, the mean
validation accuracy with the mask density and the bytes a task's masks take (bit-packed, and
zlib-compressed: a sparse mask compresses, which is what lower densities buy; the paper's
Section 3.5 trades accuracy for bytes the same way). Reporting at every log point lets ASHA stop
poor trials early.

Only the driver writes to MLflow (a Tune callback): one parent run per sweep and a child run per
trial with its values as params and its metrics by training step. At the end the best setting is
written as a full config (`runs/<name>/sweep/best.yaml`, name suffixed `-best`) that `supsup train`
accepts, beside a CSV/JSON of all trials and two plots: validation accuracy against density and
against compressed bytes per task.
"""

from pipeline.jobs.sweep.driver import cmd_sweep, run_sweep
from pipeline.jobs.sweep.outputs import SweepSummary, best_config, format_table
from pipeline.jobs.sweep.space import param_space, trial_task_ids, validate_space, with_values
from pipeline.jobs.sweep.trial import mask_bytes, sweep_trial, validation_tasks

__all__ = [
    "SweepSummary", "best_config", "cmd_sweep", "mask_bytes",
    "param_space", "run_sweep", "sweep_trial", "trial_task_ids", "validate_space",
    "validation_tasks", "with_values", "format_table",
]
