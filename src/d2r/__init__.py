"""d2r: adversarially robust image classifiers with Dual Regularization (D2R) and
Collaborative Adversarial Generation (CAG), the baselines it is compared with, and the
evaluation the field trusts."""

__version__ = "0.1.0"

from d2r.api import export_model, load_model, make_report, train
from d2r.evaluate import evaluate

__all__ = ["__version__", "evaluate", "export_model", "load_model", "make_report", "train"]
