"""The package as users install it: the wheel's metadata, and the library with only its core dependencies.

The wheel is built from a copy of the sources (``pip wheel --no-deps --no-build-isolation --no-index``:
nothing downloaded).  "Only the core dependencies" is checked in a fresh interpreter (``python -I``)
that imports ``adaclip`` from the unpacked wheel while the import system sees nothing but the standard
library and the distributions that the core requirements pull in (torch, Opacus, NumPy, SciPy,
dp-accounting and their own requirements): every other installed package, the extras' included, is
hidden as if it were not installed (``import yaml`` raises ``ModuleNotFoundError``).  There
``make_private`` must train a small model, and a research import must fail with the one-line message
that names the extra.
"""

import ast
import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from email.parser import Parser
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from adaclip.research import CLI_EXTRA

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "adaclip"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CORE = {"torch", "opacus", "numpy", "scipy", "dp-accounting"}
CORE_IMPORTS = {"torch", "opacus", "numpy", "scipy", "dp_accounting"}
RESEARCH_EXTRA = {"papermill": "papermill", "kymatio": "kymatio"}
LIBRARY = ["__init__.py", "_validate.py", "methods", "engine", "privacy"]


def version_in_source() -> str:
    tree = ast.parse((SRC / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [t.id for t in node.targets if isinstance(t, ast.Name)] == ["__version__"]:
            return ast.literal_eval(node.value)
    raise AssertionError("src/adaclip/__init__.py assigns no __version__")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = tmp_path_factory.mktemp("dist")
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
    result = subprocess.run([*command, "-w", str(out), str(source)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    (built,) = out.glob("adaclip-*.whl")
    return built


def wheel_metadata(wheel: Path) -> tuple[list[str], dict[str, list[str]]]:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (path,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        message = Parser().parsestr(archive.read(path).decode())
    fields: dict[str, list[str]] = {}
    for key, value in message.items():
        fields.setdefault(key, []).append(value)
    return names, fields


def test_the_wheel_requires_only_the_core_dependencies(wheel: Path):
    _, fields = wheel_metadata(wheel)
    requirements = [Requirement(text) for text in fields["Requires-Dist"]]
    core = {canonicalize_name(r.name): r for r in requirements if r.marker is None}
    assert set(core) == CORE
    opacus = core["opacus"].specifier
    assert "1.6.0" in opacus and "1.6.9" in opacus and "1.7.0" not in opacus, f"opacus needs <1.7, got {opacus}"
    assert set(fields["Provides-Extra"]) == {"cli", "research", "docs"}
    for requirement in requirements:
        if requirement.marker is not None:
            assert "extra ==" in str(requirement.marker), f"{requirement} is not behind an extra"


def test_the_wheel_has_one_version_the_license_the_types_and_the_console_script(wheel: Path):
    assert "version" not in PYPROJECT["project"] and "version" in PYPROJECT["project"]["dynamic"]
    names, fields = wheel_metadata(wheel)
    assert fields["Version"] == [version_in_source()]
    assert wheel.name.startswith(f"adaclip-{version_in_source()}-")
    assert fields["License-Expression"] == ["Apache-2.0"]
    assert "adaclip/py.typed" in names
    assert "adaclip/research/defaults.yaml" in names  # the trainer reads its defaults from it
    (license_file,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
    with zipfile.ZipFile(wheel) as archive:
        assert "Apache License" in archive.read(license_file).decode()
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = archive.read(entry_points).decode()
    assert re.search(r"^\[console_scripts\]\nadaclip = adaclip\.research\.cli:main$", scripts, re.M), scripts


def test_the_console_script_target_is_the_command_line():
    from adaclip.research.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0


def test_the_extras_bring_what_the_research_modules_import():
    extras = PYPROJECT["project"]["optional-dependencies"]
    cli = {canonicalize_name(Requirement(text).name) for text in extras["cli"]}
    assert cli == {canonicalize_name(name) for name in CLI_EXTRA.values()}
    assert "adaclip[cli]" in extras["research"], "the research extra includes the command line's"
    research_files = sorted((SRC / "research").glob("*.py"))
    research_imports = third_party_imports(research_files) - CORE_IMPORTS
    assert research_imports == set(CLI_EXTRA) | set(RESEARCH_EXTRA), (
        "adaclip.research.CLI_EXTRA (or, for the pipeline stages, RESEARCH_EXTRA here) must list what it imports"
    )
    research = {canonicalize_name(Requirement(text).name) for text in extras["research"]}
    assert {canonicalize_name(name) for name in RESEARCH_EXTRA.values()} <= research
    loaded = third_party_imports(research_files, top_level_only=True)
    assert not loaded & set(RESEARCH_EXTRA), "the pipeline-only packages are imported inside the stage functions"
    library_files = [
        p for name in LIBRARY for p in ([SRC / name] if name.endswith(".py") else (SRC / name).rglob("*.py"))
    ]
    assert third_party_imports(library_files) <= CORE_IMPORTS, "the library imports only its core dependencies"


def third_party_imports(paths: list[Path], *, top_level_only: bool = False) -> set[str]:
    """Third-party modules the files import; with ``top_level_only``, only the imports that run at module load."""
    found = set()
    for path in paths:
        tree = ast.parse(path.read_text())
        for node in tree.body if top_level_only else ast.walk(tree):
            if isinstance(node, ast.Import):
                found.update(alias.name.partition(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.partition(".")[0])
    # _typeshed: the standard library's typing-only stubs (imported under TYPE_CHECKING)
    ignored = ("adaclip", "__future__", "_typeshed")
    return {name for name in found if name not in sys.stdlib_module_names and name not in ignored}


def core_closure() -> set[str]:
    """Every installed distribution that the core requirements pull in, without extras."""
    seen: set[str] = set()
    todo = list(CORE)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        for text in metadata.requires(name) or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return seen


CORE_ONLY_SCRIPT = """
import importlib.abc, json, sys, sysconfig

STDLIB = tuple(sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib"))
VISIBLE = json.loads(sys.argv[2])  # {"modules": top-level import names, "distributions": names}
MODULES, DISTRIBUTIONS = set(VISIBLE["modules"]), set(VISIBLE["distributions"])


def canonical(name):
    return name.lower().replace("_", "-").replace(".", "-")


class OnlyVisible(importlib.abc.MetaPathFinder):
    # one finder of the import system, blind to every package outside the standard library and the visible
    # set (modules and distribution metadata)
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        spec = self.finder.find_spec(name, path, target)
        if spec is None or name.partition(".")[0] in MODULES:
            return spec
        origin = spec.origin or ""
        standard = origin in ("built-in", "frozen") or origin.startswith(STDLIB) and "-packages" not in origin
        return spec if standard else None

    def find_distributions(self, *args, **kwargs):
        found = getattr(self.finder, "find_distributions", lambda *a, **k: [])(*args, **kwargs)
        return [d for d in found if canonical(d.metadata["Name"]) in DISTRIBUTIONS]

    def __getattr__(self, name):
        return getattr(self.finder, name)


sys.meta_path[:] = [OnlyVisible(finder) for finder in sys.meta_path]
sys.path.insert(0, sys.argv[1])

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import adaclip

torch.manual_seed(0)
data = TensorDataset(torch.randn(64, 6), torch.randint(0, 3, (64,)))
model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
before = [p.detach().clone() for p in model.parameters()]
model, optimizer, loader = adaclip.make_private(
    module=model,
    optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
    data_loader=DataLoader(data, batch_size=16),
    method="adaclip",
    noise_multiplier=1.0,
    delta=1e-3,
    seed=0,
)
for x, y in loader:
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
try:
    import adaclip.research.cli
    research = None
except ModuleNotFoundError as error:
    research = str(error)
print(json.dumps({
    "adaclip": adaclip.__file__,
    "epsilon": optimizer.get_epsilon(),
    "moved": any(not torch.equal(a, b) for a, b in zip(before, model.parameters())),
    "research": research,
}))
"""


def test_the_library_works_with_only_the_core_dependencies(wheel: Path, tmp_path: Path):
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    closure = core_closure()
    assert not closure & {canonicalize_name(d) for d in CLI_EXTRA.values()}, "an extra's package is a core dependency"
    modules = [
        m for m, dists in metadata.packages_distributions().items() if {canonicalize_name(d) for d in dists} & closure
    ]
    visible = {"modules": sorted({"adaclip", *sys.stdlib_module_names, *modules}), "distributions": sorted(closure)}
    script = tmp_path / "core_only.py"
    script.write_text(CORE_ONLY_SCRIPT)
    result = subprocess.run(
        [sys.executable, "-I", str(script), str(site), json.dumps(visible)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])

    assert Path(report["adaclip"]).is_relative_to(site), "adaclip must come from the wheel, not the source tree"
    assert report["moved"] and 0 < report["epsilon"] < float("inf")
    message = report["research"]
    assert message is not None, "adaclip.research imported without its extra"
    assert "\n" not in message and "pip install 'adaclip[cli]'" in message
    assert all(distribution in message for distribution in CLI_EXTRA.values()), message
