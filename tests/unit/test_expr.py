"""hpo.expr: the arithmetic of derive: and constraints: — Python's precedence, its guards and its messages.

tests/test_space.py covers the bounds on huge results and unparsable sources; this file the language itself.
"""

import re

import pytest

from hpo.expr import MAX_DEPTH, MAX_LENGTH, Expression


@pytest.mark.parametrize(
    "source, expected",
    [
        ("2 + 3 * 4", 14),  # * before +
        ("(2 + 3) * 4", 20),
        ("10 - 4 - 3", 3),  # left to right
        ("64 / 4 / 2", 8.0),
        ("2 ** 3 ** 2", 512),  # ** is right-associative: 2 ** 9
        ("-2 ** 2", -4),  # ** binds tighter than unary minus
        ("(-2) ** 2", 4),
        ("2 ** -1", 0.5),
        ("7 // 2 * 2", 6),
        ("7 % 4 * 2", 6),
        ("-7 // 2", -4),  # floor division rounds down, as in Python
        ("7 / 2", 3.5),  # true division
        ("+3 - -3", 6),
        ("min(4, 2, 8) + max(1, 3)", 5),
        ("max(min(1, 2), 0.5)", 1),
        ("1e-3 * 2", 0.002),
    ],
)
def test_arithmetic_follows_python(source, expected):
    value = Expression(source).evaluate({})
    assert value == expected and type(value) is type(expected)


def test_names_are_collected_and_bound_at_evaluation():
    expr = Expression("per_device_train_batch_size * gradient_accumulation_steps // max(r, 2)")
    assert expr.names == {"per_device_train_batch_size", "gradient_accumulation_steps", "r"}
    assert expr.evaluate({"per_device_train_batch_size": 16, "gradient_accumulation_steps": 4, "r": 8}) == 8


@pytest.mark.parametrize(
    "source, values, expected",
    [
        ("a * b <= 128", {"a": 16, "b": 8}, True),
        ("a * b <= 128", {"a": 16, "b": 9}, False),
        ("1 <= a < 4", {"a": 3}, True),  # chained, as in Python
        ("1 <= a < 4", {"a": 4}, False),
        ("a == 2 or b == 2 and a == 3", {"a": 2, "b": 0}, True),  # and before or: a == 2 or (b == 2 and a == 3)
        ("(a == 2 or b == 2) and a == 3", {"a": 2, "b": 0}, False),
        ("a != b", {"a": 1, "b": 1.0}, False),
        ("a + 1 > b * 2", {"a": 4, "b": 2}, True),  # arithmetic before comparison
    ],
)
def test_conditions_compare_and_combine(source, values, expected):
    assert Expression(source, condition=True).evaluate(values) is expected


def test_and_or_stop_at_the_first_deciding_value():
    # The right side would divide by zero: it is never evaluated, as in Python.
    assert Expression("r == 0 or 8 / r > 1", condition=True).evaluate({"r": 0}) is True
    assert Expression("r != 0 and 8 / r > 1", condition=True).evaluate({"r": 0}) is False
    assert Expression("0 > r > 8 / r", condition=True).evaluate({"r": 0}) is False  # a chain stops too


@pytest.mark.parametrize("source", ["1 < 2", "2 < 1", "learning_rate < 0.1 or 1 < 2", "2 * 3 >= min(1, 2)"])
def test_a_condition_must_read_a_parameter_or_a_metric(source):
    # A comparison of numbers alone holds for every trial or for none: as --pick "1 < 2" chose the best trial
    # whatever the user meant, and a constraint "1 < 2" kept every configuration, as a bare name did.
    with pytest.raises(ValueError, match="compares numbers only: it holds for every trial or for none"):
        Expression(source, condition=True)


@pytest.mark.parametrize(
    "source, message",
    [
        ("a < b", "'a < b' is not allowed in 'a < b' (only numbers, parameter names, + - * / // % **, min(), max())"),
        ("a < 1 and b > 2", "is not allowed in 'a < 1 and b > 2' (only numbers"),
    ],
)
def test_comparisons_belong_to_conditions_only(source, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Expression(source)
    Expression(source, condition=True)  # the same text is a valid constraint


@pytest.mark.parametrize("source", ["learning_rate", "1", "2 * r", "a < 1 and b", "min(a, b) or c > 1", "-(a)"])
def test_a_condition_must_compare(source):
    # A bare name or number is true for (almost) every trial: as --pick or a constraint it would choose nothing.
    with pytest.raises(ValueError, match="is not a condition: compare it"):
        Expression(source, condition=True)
    Expression(source.split(" and ")[-1].split(" or ")[0])  # each is fine as arithmetic (derive:)


@pytest.mark.parametrize(
    "source, message",
    [
        ("'a' + r", "\"'a'\" is not allowed"),  # text literals
        ("True + r", "'True' is not allowed"),  # booleans are not numbers here
        ("1j * r", "'1j' is not allowed"),
        ("abs(r)", "'abs(r)' is not allowed"),  # only min and max
        ("r.real", "'r.real' is not allowed"),
        ("r[0]", "'r[0]' is not allowed"),
        ("r if r else 1", "is not allowed"),
        ("[r, 1]", "is not allowed"),
        ("lambda: r", "is not allowed"),
        ("r << 2", "'r << 2' is not allowed"),
        ("~r", "'~r' is not allowed"),
        ("not r", "'not r' is not allowed"),
        ("max(r, 2, key=abs)", "is not allowed"),
        ("max(*r, 2)", "is not allowed"),
        ("max", "'max' is a function: call it, e.g. max(a, b)"),
        ("min(r)", "'min(r)': min() takes two or more values, e.g. min(a, 1)"),
        ("max()", "max() takes two or more values"),
        ("r +", "cannot parse 'r +'"),
        ("r = 2", "cannot parse 'r = 2'"),
    ],
)
def test_everything_outside_the_language_is_refused_by_name(source, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Expression(source, condition=True)


def test_the_condition_message_lists_comparisons():
    with pytest.raises(
        ValueError,
        match=re.escape("(only numbers, parameter names, + - * / // % **, min(), max(), comparisons, and/or)"),
    ):
        Expression("a is b", condition=True)


def test_depth_and_length_limits_are_inclusive():
    Expression("-" * MAX_DEPTH + "r")  # 50 operators: the name sits at depth 50
    with pytest.raises(ValueError, match=f"nested deeper than {MAX_DEPTH} levels"):
        Expression("-" * (MAX_DEPTH + 1) + "r")
    Expression("r" + " + r" * MAX_DEPTH)  # a flat sum nests at the left: 50 operators reach depth 50
    with pytest.raises(ValueError, match=f"nested deeper than {MAX_DEPTH} levels"):
        Expression("r" + " + r" * (MAX_DEPTH + 1))
    source = "r" + " " * (MAX_LENGTH - 1)
    assert len(source) == MAX_LENGTH and Expression(source).evaluate({"r": 3}) == 3
    with pytest.raises(ValueError, match=f"longer than {MAX_LENGTH} characters"):
        Expression(source + " ")


def test_a_literal_over_the_bound_is_refused_when_parsed():
    Expression(str(2**1023))
    with pytest.raises(ValueError, match=re.escape("a value over 2**1024")):
        Expression(str(2**1024))


@pytest.mark.parametrize(
    "source, values, message",
    [
        ("r * 2", {"r": True}, "'r * 2': arithmetic on True, which is not a number"),  # bool is an int in Python
        ("min(r, 2)", {"r": "8"}, "'min(r, 2)': arithmetic on '8', which is not a number"),
        ("-r", {"r": None}, "'-r': arithmetic on None, which is not a number"),
        ("2 ** r", {"r": -65}, "'2 ** r': exponent -65 is over 64"),
        ("r ** 64", {"r": 2**17}, "'r ** 64': the result of r ** 64 is over 2**1024"),
        ("r % 0", {"r": 3}, "'r % 0': integer modulo by zero"),
        ("r // 0.0", {"r": 3}, "'r // 0.0': float floor division by zero"),
        ("r < 1", {"r": "x"}, "'r < 1': '<' not supported between instances of 'str' and 'int'"),
    ],
)
def test_evaluation_errors_name_the_expression(source, values, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):  # the whole message
        Expression(source, condition="<" in source).evaluate(values)


def test_powers_up_to_the_bounds_are_computed():
    assert Expression("2 ** 64").evaluate({}) == 2**64  # the largest exponent
    assert Expression("r ** 64").evaluate({"r": 2**15}) == 2**960
    assert Expression("r ** -64").evaluate({"r": 2}) == 2.0**-64
    with pytest.raises(ValueError, match=re.escape("a value over 2**1024")):  # 2**1024 itself is one bit over
        Expression("r ** 64").evaluate({"r": 2**16})


def test_a_name_without_a_value_is_a_key_error():
    # An inactive conditional parameter has no value: the caller decides what that means.
    with pytest.raises(KeyError, match="momentum"):
        Expression("momentum * 2").evaluate({"r": 1})


@pytest.mark.parametrize("pick", ["learning_rate", "1", "eval_loss and learning_rate < 1", "1 < 2"])
def test_pick_must_be_a_condition(pick, tmp_path):
    # --pick learning_rate held for every trial, so it "chose" the best one whatever the user meant.
    import optuna
    from conftest import study_dict

    from hpo.api import load
    from hpo.results.export import picked

    cfg = load(study_dict(tmp_path))
    study = optuna.create_study()
    for value in (0.5, 0.25):
        trial = study.ask({"learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)})
        study.tell(trial, value)
    assert picked(cfg, study, "learning_rate < 1") == 1  # a condition: the best of those meeting it
    with pytest.raises(ValueError, match=r"^--pick: .* (is not a condition: compare it|compares numbers only)"):
        picked(cfg, study, pick)
