"""The documentation site: it builds with warnings as errors, documents every public name, fetches nothing.

The site is built once for this module (``mkdocs build --strict``, a few seconds), into a temporary folder.
"Documented" means that the built site has an anchor for the name, at the path users import it from or at
the object's home module (where the API reference renders it; the package pages link to it there).
"""

import importlib
import inspect
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from adaclip.methods import METHODS

ROOT = Path(__file__).resolve().parents[2]
ANCHOR = re.compile(r'\bid="(adaclip(?:\.\w+)+)"')
# tags whose src/href the browser fetches while showing a page (a plain <a href> is a link, not a fetch)
FETCHED = re.compile(r"<(?:script|img|iframe|source|link)\b[^>]*?\b(?:src|href)=\"((?:https?:)?//[^\"]+)\"")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr[-5000:]}"
    return out


def anchors(site: Path) -> set[str]:
    return {anchor for page in site.rglob("*.html") for anchor in ANCHOR.findall(page.read_text())}


def public_functions_and_classes(module: ModuleType) -> list[str]:
    return [
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and (inspect.isfunction(value) or inspect.isclass(value))
        and value.__module__ == module.__name__
    ]


def public_names() -> dict[str, list[str]]:
    """Module -> the names it makes public: packages' ``__all__``, the accounting and audit modules' own."""
    names = {
        package: list(importlib.import_module(package).__all__)
        for package in ("adaclip", "adaclip.methods", "adaclip.engine", "adaclip.audit")
    }
    accounting = importlib.import_module("adaclip.privacy.accounting")
    names[accounting.__name__] = public_functions_and_classes(accounting)
    audit = importlib.import_module("adaclip.audit")
    for info in pkgutil.iter_modules(audit.__path__, prefix=f"{audit.__name__}."):
        names[info.name] = public_functions_and_classes(importlib.import_module(info.name))
    return names


def homes(module: str, name: str) -> set[str]:
    """Where ``module.name`` may be documented: there, or in the module that defines it."""
    value = getattr(importlib.import_module(module), name)
    places = {f"{module}.{name}"}
    if inspect.isfunction(value) or inspect.isclass(value):
        places.add(f"{value.__module__}.{value.__qualname__}")
    else:  # data (e.g. METHODS): any adaclip module whose namespace holds this very object
        places |= {
            f"{other.__name__}.{name}"
            for other in list(sys.modules.values())
            if other is not None and other.__name__.startswith("adaclip") and vars(other).get(name) is value
        }
    return places


def test_every_public_name_is_in_the_api_reference(site: Path):
    documented = anchors(site)
    checked = public_names()
    assert sum(map(len, checked.values())) > 40, "the public names were not collected"
    missing = [
        f"{module}.{name}"
        for module, names in checked.items()
        for name in names
        if not homes(module, name) & documented
    ]
    assert not missing, f"public names without an entry in the built API reference: {missing}"


def test_every_method_has_a_page_with_its_rule(site: Path):
    for name, method in METHODS.items():
        page = site / "methods" / f"{name}.html"
        assert page.exists(), f"method {name!r} has no page docs/methods/{name}.md"
        rule = f"{method.rule.__module__}.{method.rule.__qualname__}"
        assert f'id="{rule}"' in page.read_text(), f"docs/methods/{name}.md does not render {rule}"


def test_the_site_fetches_nothing_from_the_network(site: Path):
    fetched = {url for page in site.rglob("*.html") for url in FETCHED.findall(page.read_text())}
    assert not fetched, f"pages load remote resources: {sorted(fetched)}"
    remote_css = [css.name for css in site.rglob("*.css") if re.search(r"url\((['\"]?)(https?:)?//", css.read_text())]
    assert not remote_css, f"stylesheets load remote resources: {remote_css}"
