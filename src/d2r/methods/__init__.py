"""Training methods: which attack, which function of `losses`, and which model modes.

A Method is an nn.Module owning its model(s); `forward(x, y)` generates the adversarial batch
(`generate`), optionally perturbs the target's weights (AWP, any method with `awp_gamma > 0`) and
returns the dict of a loss function (`loss`: scalar "loss" + detached terms). It knows nothing
about the trainer's optimizer, devices or checkpoints (a model it trains itself, LAS-AT's
strategy network, has its own optimizer, listed in `optimizers()` for the checkpoint).
Two-model methods hold `self.target` and `self.guide`; only the target is evaluated. Every
method is a row of the same loop: `method.name` picks it.

Attack modes differ between the references, so each `generate` says which it follows; and
each method makes its reference's train-mode passes in their order, since every one of them
moves the BatchNorm running statistics (docs/methods.md, "Train-mode passes").

`base` holds the Method class and what every method shares (AWP included), `single` PGD-AT,
TRADES and MART, `guided` the two-model methods LBGAT and D2R, `instance` FAT and GAIRAT (an
early stop, a weight per example), `curriculum` SAT (a difficulty that ramps up over the
epochs), `randomized` RAT(TRADES) (noisy weights for the attack, Taylor terms in the loss),
`las_at` LAS-AT (a strategy network, trained by the method with its own optimizer, picks each
example's attack). Importing this package registers all ten in METHODS.
"""

from d2r.methods.base import (
    METHODS,
    Method,
    awp_perturbation,
    bn_only_pass,
    eval_mode,
    frozen_buffers,
)
from d2r.methods.curriculum import SAT
from d2r.methods.guided import D2R, LBGAT
from d2r.methods.instance import FAT, GAIRAT
from d2r.methods.las_at import LASAT
from d2r.methods.randomized import RATTRADES
from d2r.methods.single import MART, PGDAT, TRADES

__all__ = [
    "D2R",
    "FAT",
    "GAIRAT",
    "LASAT",
    "LBGAT",
    "MART",
    "METHODS",
    "PGDAT",
    "RATTRADES",
    "SAT",
    "TRADES",
    "Method",
    "awp_perturbation",
    "bn_only_pass",
    "eval_mode",
    "frozen_buffers",
]
