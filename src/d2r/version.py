"""The package's version, in a module of its own: what every record of a run (env.json,
eval.json, a model card) names, importable from any layer."""

__version__ = "0.1.0"
