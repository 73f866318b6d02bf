"""Run configuration: typed dataclasses, YAML in/out, `--set a.b=c` overrides, "8/255" parsing.

Structure and types only. The sections `data`, `train`, `eval` are dataclasses whose
annotations are their types (Literal for choices) and whose numeric fields carry their range.
Component sections (`target`, `guide`, `method`) are plain dicts `{name: ..., **options}`: the
registered constructor's signature is their schema and the constructor checks their ranges
(`registry.build`), so a new model or method needs no edit here. Every error is a one-line
ValueError naming the key and what is valid.

`sections` (the dataclasses), `values` (one value parsed and checked), `loading` (YAML and
overrides to a Config and back), `resume` (older runs' values, what a resume may change).
"""

from d2r.config.loading import (
    apply_overrides,
    as_set,
    dump_yaml,
    from_dict,
    load_yaml,
    replace,
    resolve,
    to_dict,
)
from d2r.config.resume import (
    EARLIER_DEFAULTS,
    changed_keys,
    check_resume_config,
    earlier_defaults,
    flatten,
)
from d2r.config.sections import Config, DataConfig, EvalConfig, TrainConfig
from d2r.config.values import coerce, format_eps, parse_number, parse_value

__all__ = [
    "EARLIER_DEFAULTS",
    "Config",
    "DataConfig",
    "EvalConfig",
    "TrainConfig",
    "apply_overrides",
    "as_set",
    "changed_keys",
    "check_resume_config",
    "coerce",
    "dump_yaml",
    "earlier_defaults",
    "flatten",
    "format_eps",
    "from_dict",
    "load_yaml",
    "parse_number",
    "parse_value",
    "replace",
    "resolve",
    "to_dict",
]
