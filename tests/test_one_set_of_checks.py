"""``adaclip._validate`` is the only place an argument is checked, and the long functions stay short.

The first test reads every module under ``src/`` except ``_validate.py`` and fails on the shapes that
hand-written argument checks took before they moved there: helper definitions (``def _check``, ``_number``,
``_integer``, ``_one_of``, ``_flag``, ``_positive``, ``_seed``, ``_is_real``, ``_validate``), ``isinstance`` int
checks written out (``isinstance(x, bool) or not isinstance(x, int)``; ``isinstance(x, (int, float))``, which
accepts ``True`` and refuses NumPy floats), inline ``lambda`` range checks, and error messages built in the
shape of ``_validate``'s (``"... must be an int >= ..."``, ``"... must be one of ..."``, ``"... must lie in (0,
1)"``, ``"... must be below 1/N"``).  Each pattern is tested against a copy of the code it replaced, so a
pattern that stops matching fails too.
"""

import ast
import inspect
import re
import textwrap
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "adaclip"

HAND_WRITTEN_CHECKS = {
    "a private check helper": re.compile(
        r"def _(check|number|integer|one_of|flag|positive|positive_int|seed|is_real|validate)\("
    ),
    "an int check written out": re.compile(
        r"isinstance\((\w+), bool\) or not isinstance\(\1, (int|numbers\.Integral)\)"
        r"|not isinstance\((\w+), int\) or isinstance\(\3, bool\)"
    ),
    "a number check that accepts True": re.compile(r"isinstance\(\w+, \(int, float\)\) and"),
    "an inline range check": re.compile(r"lambda \w+: (is_finite\(\w+\) and|isinstance\(\w+, str\) and \w+ in)"),
    "a message in _validate's shape": re.compile(
        r"ValueError\(\s*f?\"[^\"]*must (be an int >=|be a finite number|be one of \{|be true or false|"
        r"lie in \(0, 1\)|be below 1/N)"
    ),
}

OLD_CHECKS = {  # what each pattern replaced, copied from the modules before the checks moved to _validate
    "a private check helper": "def _one_of(name: str, value: Any, options: tuple[str, ...]) -> str:",
    "an int check written out": "if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:",
    "a number check that accepts True": "if not (isinstance(sample_rate, (int, float)) and 0 < sample_rate <= 1):",
    "an inline range check": 'field(metadata=_checked(lambda v: is_finite(v) and 0 <= v < 1, "a number in [0, 1)"))',
    "a message in _validate's shape": 'raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")',
}


def hand_written_checks(text: str) -> list[str]:
    return [what for what, pattern in HAND_WRITTEN_CHECKS.items() if pattern.search(text)]


@pytest.mark.parametrize("what", list(OLD_CHECKS))
def test_each_pattern_finds_the_check_it_replaced(what):
    assert what in hand_written_checks(OLD_CHECKS[what])


def test_validate_holds_every_argument_check():
    modules = [path for path in SRC.rglob("*.py") if path.name != "_validate.py"]
    assert len(modules) > 40
    found = {
        f"{path.relative_to(SRC)}:{number}: {what}": line.strip()
        for path in modules
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        for what in hand_written_checks(line)
    }
    found.update(
        {
            f"{path.relative_to(SRC)}: {what} (over lines)": ""
            for path in modules
            for what in hand_written_checks(path.read_text(encoding="utf-8"))
            if what == "a message in _validate's shape"
        }
    )
    assert not found, f"argument checks outside adaclip._validate (use its require_* / is_*): {found}"


MAX_BODY_LINES = 60


def body_lines(source: str) -> int:
    """Lines of the body of the function defined in ``source``, its docstring left out (a long docstring is
    documentation, not logic)."""
    node = ast.parse(textwrap.dedent(source)).body[0]
    assert isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    body = node.body[1:] if ast.get_docstring(node) is not None else node.body
    return body[-1].end_lineno - body[0].lineno + 1


def long_functions():
    from adaclip.engine import private
    from adaclip.privacy import accounting
    from adaclip.research import cli, config, train

    return {
        "train.run": train.run,
        "train._build": train._build,
        "train._train_epoch": train._train_epoch,
        "train._end_epoch": train._end_epoch,
        "config.resolve": config.resolve,
        "private.make_private": private.make_private,
        "private._check_arguments": private._check_arguments,
        "cli.parser": cli.parser,
        "cli.config_from_args": cli.config_from_args,
        "accounting._calibrate": accounting._calibrate.__wrapped__,
    }


def test_the_functions_that_were_long_stay_under_60_lines():
    lengths = {name: body_lines("".join(inspect.getsourcelines(f)[0])) for name, f in long_functions().items()}
    too_long = {name: length for name, length in lengths.items() if length >= MAX_BODY_LINES}
    assert not too_long, f"functions of {MAX_BODY_LINES} lines or more (split them): {too_long}"


def test_the_length_measure_counts_the_body_without_the_docstring():
    source = 'def f(x):\n    """doc\n    more doc"""\n' + "    x += 1\n" * 70
    assert body_lines(source) == 70
    assert body_lines("    def g(self):\n        return 1\n") == 1
