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
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from adaclip.methods import METHODS
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
    assert set(fields["Provides-Extra"]) == {"cli", "research", "docs", "dev"}
    torch = core["torch"].specifier
    assert "2.6.0" in torch and "2.5.1" not in torch, f"Opacus 1.6 needs torch>=2.6, got {torch}"
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
    assert "adaclip/research/anchors.yaml" in names  # package data: the published anchors the report reads
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
    # the report stage converts the notebooks to HTML; the README tells readers to open them in JupyterLab
    assert {"nbconvert", "jupyterlab"} <= research
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


LOCK = ROOT / "requirements.txt"


def locked() -> dict[str, tuple[str, list[str]]]:
    """The lock's pins: canonical name -> (version, hashes)."""
    pins: dict[str, tuple[str, list[str]]] = {}
    name = ""
    for line in LOCK.read_text().splitlines():
        for token in line.split("#")[0].replace("\\", " ").split():
            if token.startswith("--hash=sha256:"):
                pins[name][1].append(token.removeprefix("--hash="))
            else:
                assert "==" in token, f"requirements.txt: {token!r} is neither a pin nor a hash"
                name, _, version = token.partition("==")
                name = canonicalize_name(name)
                pins[name] = (version, [])
    return pins


def test_the_lock_pins_every_requirement_of_every_extra_exactly_and_hashed():
    pins = locked()
    assert all(hashes for _, hashes in pins.values()), "every package of the lock has a hash"
    project = PYPROJECT["project"]
    requirements = [Requirement(text) for text in project["dependencies"]]
    requirements += [Requirement(t) for extra in project["optional-dependencies"].values() for t in extra]
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        if name == "adaclip":
            continue
        assert name in pins, f"{requirement} is not in requirements.txt"
        assert requirement.specifier.contains(pins[name][0], prereleases=True), f"{requirement}: lock has {pins[name]}"
    assert pins["torch"][0] in ("2.13.0", "2.13.0+cpu"), "torch is pinned to 2.13.0"


def test_the_lock_is_complete_every_locked_package_finds_its_requirements_in_it():
    pins = locked()
    checked = 0
    for name, (version, _) in pins.items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        if installed != version:
            continue  # this environment is not the locked one for this package: nothing to read
        checked += 1
        for text in metadata.requires(name) or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                assert canonicalize_name(requirement.name) in pins, f"{name} needs {requirement}, not in the lock"
    assert checked >= len(pins) // 2, "the test environment is not the locked one"


def test_make_environment_and_ci_install_from_the_hashed_lock():
    makefile = (ROOT / "Makefile").read_text()
    assert "pip install --quiet --require-hashes -r requirements.txt" in makefile
    assert "--require-hashes" in (ROOT / "environment.yml").read_text()
    assert "-r requirements.txt" in (ROOT / "environment.yml").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M), "CI runs the README's test command"
    for block in ("install", "wheel", "quickstart"):
        assert f".ci/readme.py {block}" in ci


def readme_block(name: str) -> str:
    match = re.search(rf"<!-- ci: {name} -->\n```[a-z]*\n(.*?)\n```", README, re.S)
    assert match, f"README.md has no block marked <!-- ci: {name} -->"
    return match.group(1)


README = (ROOT / "README.md").read_text()


def test_the_readme_is_a_door():
    assert len(README) <= 8000, f"README.md has {len(README)} characters"
    install = readme_block("install")
    assert "pip install --require-hashes -r requirements.txt" in install and "-e ." in install
    assert "pip install adaclip" not in README, "adaclip is on no package index"
    wheel = readme_block("wheel")
    assert "pip wheel" in wheel and "[research]" in wheel
    # each of the two commands with its measured time and hardware on its own line
    for command in ("make test", "make reproduce"):
        (line,) = [line for line in README.splitlines() if line.startswith(command + " ")]
        assert re.search(r"\d+(\.\d+)? (s|min) on \d+ CPU cores", line), line
    assert readme_block("quickstart").count("PrivacyEngine") >= 2


def test_the_readme_quickstart_runs_as_written(capsys: pytest.CaptureFixture[str]):
    # in this process (CI runs it again, against the installed wheel, in a fresh interpreter)
    exec(compile(readme_block("quickstart"), "README.md (quickstart)", "exec"), {"__name__": "__main__"})
    epsilon = float(re.fullmatch(r"epsilon = (\S+)", capsys.readouterr().out.strip()).group(1))
    assert 0 < epsilon <= 3.0


def test_the_version_the_changelog_and_the_citation_agree():
    version = version_in_source()
    headings = re.findall(r"^## \[([^\]]+)\]", (ROOT / "CHANGELOG.md").read_text(), re.M)
    released = [Version(h) for h in headings if h != "Unreleased"]
    if Version(version).is_devrelease:
        assert headings[0] == "Unreleased", "a development version has its changes under [Unreleased]"
        assert Version(version).release > max(released).release, f"{version} comes after {max(released)}"
    else:
        assert headings[0] == version, f"the newest CHANGELOG section is [{headings[0]}], the version {version}"
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert citation["version"] == version
    assert citation["authors"] and citation["date-released"]
    assert [a["name"] for a in PYPROJECT["project"]["authors"]] == [a["name"] for a in citation["authors"]]


def test_the_citation_and_the_metadata_name_every_method():
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    abstract = " ".join(citation["abstract"].split())
    description = PYPROJECT["project"]["description"]
    for method in METHODS.values():
        label = method.label.split(" (")[0]
        assert label.lower() in abstract.lower(), f"CITATION.cff's abstract omits {label}"
    references = " ".join(r["title"] for r in citation["references"])
    for title_word in (
        "AdaCliP",
        "adaptive clipping",
        "Automatic clipping",
        "GeoClip",
        "per-sample",
        "MacAdam",
        "AdamBC",
    ):
        assert title_word.lower() in references.lower(), f"CITATION.cff cites no paper for {title_word}"
    assert "AdaCliP" in description and "DP-AdamBC" in description
