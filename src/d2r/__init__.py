"""d2r: adversarially robust image classifiers with Dual Regularization (D2R) and
Collaborative Adversarial Generation (CAG), the baselines it is compared with, and the
evaluation the field trusts."""

from d2r.api import export_model, load_model, make_report, train
from d2r.evaluate import evaluate
from d2r.plugins import load as _load_plugins
from d2r.version import __version__

_load_plugins()  # the `d2r.plugins` entry points, once per process (d2r/plugins.py)

__all__ = ["__version__", "evaluate", "export_model", "load_model", "make_report", "train"]
