"""What a run is: its method built from the config, its directory and environment record.
The training loop is in `trainer`; the run's saved state in `checkpoint`; `load_run` rebuilds a
run from them for evaluation and export.

`build` (config -> method, its checks), `directory` (the run directory, its lock, env.json),
`load` (rebuilding a run), `listing` (`d2r list`).
"""

from d2r.runs.build import (
    DATA_SIZED,
    MODEL_KEYS,
    build_method,
    check_config,
    check_external_models,
    check_schedule,
    eval_eps,
    eval_norm,
    external_sources,
    load_initial_weights,
    resolved_config,
    split_model_spec,
    weight_files,
)
from d2r.runs.directory import (
    RUN_LOCK,
    Run,
    default_run_dir,
    environment,
    own_run_dir,
    prepare_run_dir,
    training_now,
    write_env,
)
from d2r.runs.listing import add_command
from d2r.runs.load import (
    data_record,
    load_checkpoint,
    load_ema_target,
    load_run,
    read_config,
    run_data_info,
)

__all__ = [
    "DATA_SIZED",
    "MODEL_KEYS",
    "RUN_LOCK",
    "Run",
    "add_command",
    "build_method",
    "check_config",
    "check_external_models",
    "check_schedule",
    "data_record",
    "default_run_dir",
    "environment",
    "eval_eps",
    "eval_norm",
    "external_sources",
    "load_checkpoint",
    "load_ema_target",
    "load_initial_weights",
    "load_run",
    "own_run_dir",
    "prepare_run_dir",
    "read_config",
    "resolved_config",
    "run_data_info",
    "split_model_spec",
    "training_now",
    "weight_files",
    "write_env",
]
