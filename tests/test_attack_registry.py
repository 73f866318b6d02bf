"""One registry per kind: evaluation attacks (EVAL_ATTACKS, one entry feeds from_name, the names
`d2r eval` takes, the table columns, `d2r list` and the CLI help) and the attack budget (one
Budget object that every method takes, beside the config keys method.eps etc.)."""

import inspect
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import d2r
from d2r import attacks
from d2r.attacks import EVAL_ATTACKS, PGD, Budget, EvalAttack, KLAttack, from_name, project
from d2r.cli import main
from d2r.config import resolve
from d2r.evaluate import attack_plan, markdown_table
from d2r.methods import METHODS
from d2r.models import small_cnn, tiny_cnn
from d2r.registry import OptionError
from d2r.report import column_label
from d2r.report.group import columns_of
from d2r.runs import check_config
from d2r.tables import PAPER_COLUMNS


@dataclass(frozen=True)
class Noise:
    """A toy attack: `draws` uniform draws in the eps-ball, the first one each sample fails on."""

    eps: float
    draws: int = 1

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_adv = x.clone()
        for _ in range(self.draws):
            trial = project(x + torch.empty_like(x).uniform_(-self.eps, self.eps), x, self.eps)
            with torch.no_grad():
                still = model(x_adv).argmax(1) == y
            x_adv[still] = trial[still]
        return x_adv


@pytest.fixture()
def noise_entry():
    """A new evaluation attack registered for one test: noiseK, Table column noise2."""
    entry = EvalAttack(
        "noise",
        r"noise(?P<draws>\d+)",
        lambda eps, draws, **_: Noise(eps, draws),
        "Noise-{draws}",
        "noiseK (K uniform draws)",
        columns={"noise2": "Noise x2"},
    )
    EVAL_ATTACKS.register(entry)
    yield entry
    EVAL_ATTACKS.unregister("noise")


def test_a_registered_attack_is_built_named_and_listed_everywhere(noise_entry, capsys):
    assert from_name("noise3", 0.1) == Noise(0.1, 3)
    assert "noise3" in EVAL_ATTACKS and "noise0" not in EVAL_ATTACKS
    assert attack_plan("pgd3,noise3", 0.1) == {0.1: ["pgd3", "noise3"]}  # d2r eval takes it
    assert "noiseK (K uniform draws)" in attacks.EVAL_NAMES
    with pytest.raises(ValueError, match="noiseK"):  # the unknown-name error lists it
        from_name("noisy", 0.1)
    assert attacks.label("noise3") == "Noise-3" and attacks.label("noise2") == "Noise x2"
    assert main(["list"]) == 0
    assert "noiseK (K uniform draws)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "noiseK" in capsys.readouterr().out
    # a fixed column of every table: eval.md, d2r report
    assert list(PAPER_COLUMNS)[-1] == "noise2" and PAPER_COLUMNS["noise2"] == "Noise x2"
    assert "noise2" in columns_of([]) and column_label("noise2") == "Noise x2"


def test_a_registered_attack_runs_and_has_its_column_in_eval_md(noise_entry):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = model(x).argmax(1)
    result = d2r.evaluate(model, x, y, attacks=["noise2", "pgd3"], eps=0.1, checks=False)
    assert 0 <= result["noise2"] <= 1 and result["worst_case_over"] == ["clean", "noise2", "pgd3"]
    header = markdown_table({"model": result}).splitlines()[0]
    assert "| Noise x2 |" in header and header.index("AA") < header.index("Noise x2")


def test_unregistering_removes_it_again():
    entry = EvalAttack("tmp", "tmp", lambda eps, **_: Noise(eps), "TMP", "tmp", {"tmp": "TMP"})
    EVAL_ATTACKS.register(entry)
    try:
        with pytest.raises(ValueError, match="registered twice"):
            EVAL_ATTACKS.register(entry)
        assert "tmp" in PAPER_COLUMNS
    finally:
        EVAL_ATTACKS.unregister("tmp")
    assert "tmp" not in PAPER_COLUMNS and "tmp" not in EVAL_ATTACKS
    with pytest.raises(ValueError, match="attack 'tmp' unknown"):
        from_name("tmp", 0.1)


def test_the_paper_columns_come_from_the_registry_in_table_1s_order():
    assert dict(PAPER_COLUMNS) == {
        "clean": "Clean",
        "pgd20": "PGD-20",
        "pgd50": "PGD-50",
        "cw20": "C&W",
        "aa": "AA",
    }
    assert EVAL_ATTACKS.names() == ["pgd", "cw", "fgsm", "aa", "aa_plus", "aa_rand"]


# The attack budget -----------------------------------------------------------------------------


def _models(name: str, seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    models = [small_cnn(in_channels=1)]
    return models + ([tiny_cnn(in_channels=1)] if METHODS.get(name).uses_guide else [])


def _attack(method) -> object:
    return getattr(method, "pgd", None) or getattr(method, "kl_attack", None)


@pytest.mark.parametrize("name", METHODS.names())
def test_a_budget_or_its_four_keywords_build_the_same_method(name):
    norm = "linf" if name == "las_at" else "l2"  # LAS-AT's candidates are L-inf radii
    budget = Budget(eps=0.1, step_size=0.02, steps=2, norm=norm)
    by_keywords = METHODS.create(name, *_models(name), eps=0.1, step_size=0.02, steps=2, norm=norm)
    by_budget = METHODS.get(name).with_budget(budget, *_models(name))
    assert by_keywords.budget == by_budget.budget == budget
    assert _attack(by_keywords) == _attack(by_budget)
    if _attack(by_budget) is not None:
        assert _attack(by_budget).eps == 0.1 and _attack(by_budget).norm == norm
    a, b = by_keywords.state_dict(), by_budget.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(2))
    losses = []
    for method in (by_keywords, by_budget):
        torch.manual_seed(3)
        losses.append(method(x, y)["loss"])
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)


@pytest.mark.parametrize("name", METHODS.names())
def test_every_methods_default_budget_is_budgets_default(name):
    """The config schema (the signature) still holds the four keys, no `budget`: config.yaml
    and checkpoints are as before; their defaults are Budget()'s."""
    params = inspect.signature(METHODS.get(name)).parameters
    assert "budget" not in params
    defaults = {k: params[k].default for k in ("eps", "step_size", "steps", "norm")}
    # but LAS-AT's (its attack's start radius and its reward's PGD-10): its code's 8/255, 2/255
    expected = Budget(8 / 255, 2 / 255) if name == "las_at" else Budget()
    assert Budget(**defaults) == expected == METHODS.create(name, *_models(name)).budget


def test_a_budget_and_any_of_its_keywords_are_refused_together():
    with pytest.raises(TypeError, match=r"the budget is given; drop steps="):
        METHODS.get("trades").with_budget(Budget(), small_cnn(in_channels=1), steps=3)


@pytest.mark.parametrize(
    ("option", "value", "rule"),
    [
        ("eps", -1.0, "must be >= 0"),
        ("step_size", -0.5, "must be >= 0"),
        ("steps", 0, "must be > 0"),
        ("norm", "l1", "choose one of linf, l2"),
    ],
)
def test_a_bad_budget_is_refused_as_the_keyword_and_the_config_key_are(option, value, rule):
    with pytest.raises(OptionError) as as_budget:
        Budget(**{option: value})
    with pytest.raises(OptionError) as as_keyword:
        METHODS.create("d2r", *_models("d2r"), **{option: value})
    assert str(as_budget.value) == str(as_keyword.value) and rule in str(as_budget.value)
    with pytest.raises(ValueError, match=rf"config key 'method.{option}': {rule}"):
        check_config(resolve(overrides=[f"method.{option}={value}"]))


def test_the_config_message_of_a_bad_budget_key_is_unchanged():
    with pytest.raises(ValueError) as err:
        check_config(resolve(overrides=["method.eps=-1"]))
    hint = "(e.g. 8/255 in linf, 0.5 in l2)"
    assert str(err.value) == f"config key 'method.eps': must be >= 0 {hint}, got -1.0"


def test_a_config_cannot_give_a_budget_object():
    with pytest.raises(ValueError, match="has no option 'budget'"):
        check_config(resolve(overrides=["method.budget=1"]))


def test_the_budget_feeds_the_attacks_keywords():
    budget = Budget(eps=0.05, step_size=0.01, steps=4)
    assert KLAttack(**budget.kwargs()) == KLAttack(eps=0.05, step_size=0.01, steps=4)
    assert PGD(**budget.kwargs()).steps == 4
