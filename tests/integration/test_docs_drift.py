"""The README and the documentation name only what exists, and quote only the numbers the report holds.

Every page (``README.md`` and ``docs/**/*.md``; not the changelog, which is history) is read for what it names:

* DVC stages: a backticked name in a "stage" column of a table, next to the word "stage", after
  ``dvc repro``, or of the form ``sweep@name``, must be a stage of ``dvc.yaml`` (``name@item`` for its
  ``foreach`` items);
* methods: ``method="x"`` and ``--method x`` must name a registered method (or ``nonprivate`` on the command line);
* parameters: ``-S 'a.b=...'`` and backticked ``a.b`` whose first part is a key of ``params.yaml`` must be a key
  path of ``params.yaml``; a backticked ``name=`` must be a parameter of a function or class in ``src/adaclip``,
  and a backticked ``--option`` an option of the command line;
* files: a backticked or linked path of the repository (``src/...``, ``tests/...``, ``reports/...``, a name
  ending in ``.py``, ``.ipynb``, ``.yaml``, ...) must exist; a page's relative links are resolved from the page;
* modules: a backticked ``adaclip.x.y`` must be a module or a name in one;
* results: a quoted result (``89.6 ± 0.1``, ``−2.3 [−2.5, −2.0]``) must be in the generated report
  (``reports/README.md``, ``reports/tables/``, ``reports/probes/``), and so must a ratio (``2.8×``) or a
  percentage with decimals (``87.3 %``); every number of the README's results block must be in
  ``reports/README.md``.

Each check is a function of a page's text, so the tests below also feed it a deliberately stale page and
require each kind of stale reference to be reported.
"""

import argparse
import ast
import importlib
import re
from functools import cache
from pathlib import Path

import pytest
import yaml

from adaclip.methods import METHODS

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted([ROOT / "README.md", *(p for p in (ROOT / "docs").rglob("*.md") if p.name != "changelog.md")])
REPORT_TEXTS = [ROOT / "reports" / "README.md", *sorted((ROOT / "reports").glob("tables/*.md"))]
REPORT_TEXTS += sorted((ROOT / "reports").glob("probes/*.md"))
# how a page names a repository file: a known top-level folder, or a file name with one of these endings
REPO_FOLDERS = ("src/", "tests/", "reports/", "docs/", "notebooks/", "benchmarks/", "probes/", "profiles/", ".ci/")
FILE_ENDINGS = (".py", ".ipynb", ".yaml", ".yml", ".toml", ".cff", ".lock", ".json", ".png", ".svg", ".html")
# files the pages name that live elsewhere: Opacus's example, outputs the reader writes, DVC's work folders
NOT_IN_REPOSITORY = re.compile(
    r"^(examples/mnist\.py|out/.*|runs/.*|run\.(pt|json|yaml)|.*\.timings\.jsonl|\.dvc/.*|site/.*|dist/.*|"
    r"data/(raw|prepared|features)(/.*)?|\.venv(/.*)?|mkdocs\.yml)$"
)
MINUS = str.maketrans({"−": "-", "–": "-"})


def backticked(text: str) -> list[str]:
    return re.findall(r"`([^`\n]+)`", text)


@cache
def dvc_stages() -> frozenset[str]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    names = set()
    for name, stage in stages.items():
        items = stage.get("foreach")
        names.update([f"{name}@{item}" for item in items] if isinstance(items, list) else [])
        names.add(name)
    return frozenset(names)


@cache
def params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


@cache
def source_parameters() -> frozenset[str]:
    """Every parameter name of every function in src/adaclip (the names a ``name=`` can refer to)."""
    names = set()
    for path in (ROOT / "src" / "adaclip").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                arguments = node.args
                names.update(a.arg for a in [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs])
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)  # dataclass fields (configs built from keywords)
    return frozenset(names)


@cache
def command_line_options() -> frozenset[str]:
    """Every option of every ``adaclip`` command, read from the parser the command line builds (the ``train``
    options are generated from the fields of ``TrainConfig``)."""
    from adaclip.research.cli import parser

    commands = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    return frozenset(
        option
        for command in commands.choices.values()
        for action in command._actions
        for option in action.option_strings
        if option.startswith("--")
    )


# parameters of Opacus and torch that the pages name as theirs
OUTSIDE_PARAMETERS = frozenset({"wrap_model", "scale_grad_by_freq", "track_running_stats", "weights_only"})


def stage_references(text: str) -> set[str]:
    found = set(re.findall(r"`([a-z_]+@[a-z_]+)`", text))
    commands = backticked(text) + [line.strip() for line in text.splitlines()]
    found.update(m[1] for c in commands if (m := re.match(r"dvc repro(?: -f)? ([a-z_@]+)", c)))
    for line in text.splitlines():
        found.update(re.findall(r"stage `([a-z_@]+)`", line))
        found.update(re.findall(r"`([a-z_@]+)` stage", line))
    found.update(table_column(text, "stage"))
    return found


def table_column(text: str, header: str) -> set[str]:
    """The backticked names in the column called ``header`` of every Markdown table of ``text``."""
    found: set[str] = set()
    column = None
    for line in text.splitlines():
        if not line.startswith("|"):
            column = None
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if column is None:
            column = cells.index(header) if header in cells else -1
        elif column >= 0 and column < len(cells) and not set(cells[column]) <= set("-: "):
            found.update(n for n in backticked(cells[column]) if re.fullmatch(r"[a-z_@]+", n))
    return found


def method_references(text: str) -> set[str]:
    return set(re.findall(r"method=[\"']([a-z_0-9]+)[\"']", text)) | set(re.findall(r"--method ([a-z_0-9]+)", text))


def param_references(text: str) -> set[str]:
    found = set(re.findall(r"-S '([a-z_.]+)=", text))
    found.update(name for name in backticked(text) if re.fullmatch(r"[a-z_]+(\.[a-z_0-9]+)+", name))
    return {name for name in found if name.partition(".")[0] in params()}


def keyword_references(text: str) -> set[str]:
    return {name for span in backticked(text) for name in re.findall(r"(?<![\w.'-])([a-z_][a-z0-9_]*)=(?!=)", span)}


def option_references(text: str) -> set[str]:
    """Options of a backticked ``adaclip ...`` command, or a backticked option alone."""
    spans = [s for s in backticked(text) if re.match(r"(adaclip|python -m adaclip) |--[a-z-]+$", s)]
    return {option for span in spans for option in re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", span)}


def path_references(text: str) -> set[str]:
    found = set()
    for token in backticked(text) + re.findall(r"\]\(([^)#\s]+)", text):
        token = token.strip()
        if " " in token or re.search(r"[<>{}*$]|://|^[a-z]+:", token):
            continue
        if token.startswith(REPO_FOLDERS) or token.endswith(FILE_ENDINGS):
            found.add(token.rstrip("/"))
    return found


def module_references(text: str) -> set[str]:
    return {name for name in backticked(text) if re.fullmatch(r"adaclip(\.[A-Za-z_][A-Za-z0-9_]*)+", name)}


def quoted_results(text: str) -> set[str]:
    text = text.translate(MINUS)
    found = set(re.findall(r"\d+(?:\.\d+)? ± \d+(?:\.\d+)?", text))
    found.update(re.findall(r"[+-]?\d+(?:\.\d+)? \[[+-]?\d+(?:\.\d+)?, [+-]?\d+(?:\.\d+)?\]", text))
    return found


def quoted_numbers(text: str) -> set[str]:
    """Ratios (``2.8×``) and percentages with decimals (``89.6 %``): the report's kind of number."""
    return set(re.findall(r"(?<![\d.])(\d+(?:\.\d+)?)×", text)) | set(re.findall(r"(?<![\d.])(\d+\.\d+) ?%", text))


def params_has(path: str) -> bool:
    node = params()
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def module_exists(name: str) -> bool:
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            module = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        target = module
        for attribute in parts[cut:]:
            if not hasattr(target, attribute):
                return False
            target = getattr(target, attribute)
        return True
    return False


def path_exists(token: str, page: Path) -> bool:
    if NOT_IN_REPOSITORY.match(token):
        return True
    return any((base / token).exists() for base in (ROOT, page.parent, ROOT / "reports"))


@cache
def report_text() -> str:
    return "\n".join(path.read_text() for path in REPORT_TEXTS).translate(MINUS)


def stale_references(text: str, page: Path) -> list[str]:
    """What ``text`` (the page at ``page``) names that does not exist, one line each."""
    problems = [f"stage {s!r} is not in dvc.yaml" for s in sorted(stage_references(text) - dvc_stages())]
    methods = {*METHODS, "nonprivate"}
    problems += [f"method {m!r} is not registered" for m in sorted(method_references(text) - methods)]
    problems += [f"parameter {p!r} is not in params.yaml" for p in sorted(param_references(text)) if not params_has(p)]
    keywords = source_parameters() | OUTSIDE_PARAMETERS
    problems += [f"keyword {k}= is no parameter in src/adaclip" for k in sorted(keyword_references(text) - keywords)]
    options = command_line_options()
    problems += [f"option {o} is not an option of the command line" for o in sorted(option_references(text) - options)]
    problems += [f"file {p!r} does not exist" for p in sorted(path_references(text)) if not path_exists(p, page)]
    problems += [f"module {m!r} does not exist" for m in sorted(module_references(text)) if not module_exists(m)]
    report = report_text()
    problems += [f"result {r!r} is not in the report" for r in sorted(quoted_results(text)) if r not in report]
    reported = {n.lstrip("+-") for n in numbers(report)}
    problems += [
        f"number {n!r} (a ratio or a percentage) is not in the report" for n in sorted(quoted_numbers(text) - reported)
    ]
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_page_names_only_what_exists(page: Path):
    assert stale_references(page.read_text(), page) == []


STALE_PAGE = """
The stages: `prepare` → `lr_search` stage → `sweep@clip`; `dvc repro clipping` reruns one.

| stage | what |
|---|---|
| `sweep@accuracy` | fine |
| `sweeps` | renamed |

```python
make_private(..., method="adaclip_v2")
```
`adaclip train --method dpsgd`, `dvc exp run -S 'accuracy.seedz=[0,1]'`; `tuning.lrs` sets the grid.
`make_private(clip_limit=1.0)`; `adaclip train --epoch 3`. See `src/adaclip/privacy/auditing.py`,
[the table](reports/tables/old.md) and `adaclip.methods.nonexistent`.
DP-SGD reached 91.2 ± 0.1 % and AdaCliP −9.9 [−9.8, −9.7] points; GeoClip 93.21 % at 31.7× the cost.
"""


def test_a_deliberately_stale_page_is_caught():
    problems = "\n".join(stale_references(STALE_PAGE, ROOT / "docs" / "stale.md"))
    for expected in [
        "stage 'lr_search'",
        "stage 'sweep@clip'",
        "stage 'clipping'",
        "stage 'sweeps'",
        "method 'adaclip_v2'",
        "method 'dpsgd'",
        "parameter 'accuracy.seedz'",
        "parameter 'tuning.lrs'",
        "keyword clip_limit=",
        "option --epoch ",
        "file 'src/adaclip/privacy/auditing.py'",
        "file 'reports/tables/old.md'",
        "module 'adaclip.methods.nonexistent'",
        "result '91.2 ± 0.1'",
        "result '-9.9 [-9.8, -9.7]'",
        "number '93.21'",
        "number '31.7'",
    ]:
        assert expected in problems, f"{expected!r} not reported in:\n{problems}"
    assert "sweep@accuracy" not in problems and "'prepare'" not in problems


def readme_results(text: str) -> str:
    match = re.search(r"<!-- results:.*?-->\n(.*?)<!-- /results -->", text, re.S)
    assert match, "README.md has no results block (<!-- results: ... --> ... <!-- /results -->)"
    return match.group(1)


def numbers(text: str) -> set[str]:
    """The numbers of a text, signs kept, as written (``−2.3`` is ``-2.3``)."""
    return set(re.findall(r"(?<![\w.])[+-]?\d+(?:\.\d+)?(?![\w.]*\w)", text.translate(MINUS)))


def unreported_numbers(results: str, report: str) -> set[str]:
    unsigned = {n.lstrip("+-") for n in numbers(report)}
    return {n for n in numbers(results) if n not in numbers(report) and n.lstrip("+-") not in unsigned}


def test_every_number_of_the_readme_results_is_in_the_report():
    results = readme_results((ROOT / "README.md").read_text())
    assert len(numbers(results)) >= 10, "the results block quotes the report's numbers"
    assert unreported_numbers(results, (ROOT / "reports" / "README.md").read_text()) == set()


def test_a_retyped_number_in_the_results_is_caught():
    report = "DP-SGD reached 89.6 ± 0.1 % (AdaCliP -2.3 [-2.5, -2.0])."
    assert unreported_numbers("DP-SGD 89.6 ± 0.1 %, AdaCliP −2.3 [−2.5, −2.0]", report) == set()
    assert unreported_numbers("DP-SGD 89.7 ± 0.1 %, AdaCliP −2.3 [−2.6, −2.0]", report) == {"89.7", "-2.6"}
