"""Property tests of the config parser: on any keys and values, `resolve(overrides=...)` and
`from_dict` either return a Config that survives a YAML round trip, or raise a one-line
ValueError - never another exception."""

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from d2r.config import Config, flatten, from_dict, resolve, to_dict

VALID_KEYS = sorted(flatten(to_dict(Config())))  # e.g. train.epochs, method.eps, data.root
SECTIONS = ["seed", "data", "train", "eval", "target", "guide", "method"]
NAMES = sorted({k.split(".")[-1] for k in VALID_KEYS} | {"name", "x", "", "0"})

key = st.one_of(
    st.sampled_from(VALID_KEYS),
    st.lists(st.sampled_from(SECTIONS + NAMES), min_size=1, max_size=3).map(".".join),
    st.text(max_size=12),
)
scalar_text = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(
        [
            "true",
            "no",
            "null",
            "~",
            "[1, 2]",
            "{a: 1}",
            "8/255",
            "1/0",
            "./.",
            "1e400",
            "-0",
            "[",
            "{",
            "'",
            "2020-01-01",
            "pgd20",
            "stop",
            "skip",
            "",
            "nan",
            ".nan",
            "-.inf",
            "inf",
            "[a]",
            "[0.5, .nan]",
            "[true]",
        ]
    ),
    st.text(max_size=12),
)
plain = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
values = st.recursive(
    plain,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(NAMES), inner, max_size=3)
    ),
    max_leaves=6,
)
raw_config = st.dictionaries(
    st.one_of(st.sampled_from(SECTIONS), st.text(max_size=5)),
    st.one_of(values, st.dictionaries(st.sampled_from(NAMES), values, max_size=4)),
    max_size=4,
)


def accepted_or_one_line_error(build) -> None:
    try:
        cfg = build()
    except ValueError as err:
        assert str(err) and "\n" not in str(err), repr(err)
        return
    assert isinstance(cfg, Config)
    for value in flatten(to_dict(cfg)).values():  # numbers that reach training are finite
        for v in value if isinstance(value, list) else [value]:
            assert not (isinstance(v, float) and not math.isfinite(v)), to_dict(cfg)
    assert all(isinstance(v, float) for v in cfg.train.decay_at), cfg.train.decay_at
    assert to_dict(from_dict(to_dict(cfg))) == to_dict(cfg)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(key, scalar_text), max_size=4))
def test_overrides_accept_or_raise_one_line_value_error(pairs):
    accepted_or_one_line_error(lambda: resolve(overrides=[f"{k}={v}" for k, v in pairs]))


@settings(max_examples=300, deadline=None)
@given(raw_config)
def test_from_dict_accepts_or_raises_one_line_value_error(raw):
    accepted_or_one_line_error(lambda: from_dict(raw))


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(VALID_KEYS), scalar_text)
def test_single_valid_key_with_any_value(k, v):
    accepted_or_one_line_error(lambda: resolve(overrides=[f"{k}={v}"]))
