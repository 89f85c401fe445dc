"""The pipeline's params files, their validation, and dvc.yaml's dependency lists."""

import copy
import json
from pathlib import Path

import pytest
import yaml

from adaclip.research.params import check_notebook_parameters, load_params, validate_params

ROOT = Path(__file__).resolve().parents[2]
PROFILES = [ROOT / "params.yaml", ROOT / "profiles" / "paper.yaml", ROOT / "tests" / "fixtures" / "params-tiny.yaml"]


def _keys(tree, prefix=""):
    if not isinstance(tree, dict):
        return {prefix}
    keys = set()
    for key, value in tree.items():
        if prefix.endswith("setting.datasets"):
            keys |= {f"{prefix}.*.{k}" for k in value}  # dataset names differ between profiles
        else:
            keys |= _keys(value, f"{prefix}.{key}" if prefix else key)
    return keys


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.name)
def test_every_profile_is_valid(path):
    params = load_params(path)
    assert params["profile"] in {"quick", "paper", "tiny"}


def test_profiles_share_one_set_of_keys():
    quick, *others = [_keys(yaml.safe_load(p.read_text())) for p in PROFILES]
    for other in others:
        assert other == quick


@pytest.fixture
def params():
    return copy.deepcopy(load_params(ROOT / "params.yaml"))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda p: p["accuracy"].update(epsilon=[1.0]),
            r"unknown key\(s\) \['accuracy.epsilon'\]; 'accuracy' accepts \['epsilons', 'seeds'\]",
        ),
        (lambda p: p.update(acuracy={}), r"unknown section\(s\) \['acuracy'\]"),
        (lambda p: p["clip"].pop("seeds"), r"missing key\(s\) \['clip.seeds'\]"),
        (lambda p: p["accuracy"].update(epsilons=[0.0]), r"accuracy.epsilons must be a non-empty list of numbers > 0"),
        (
            lambda p: p["setting"].update(methods=["adaclip", "nonprivate"]),
            r"setting.methods must be a non-empty list of",
        ),
        (
            lambda p: p["setting"]["datasets"]["fashion-mnist"].update(epoch=3),
            r"'setting.datasets.fashion-mnist.epoch'",
        ),
        (lambda p: p["size"].update(dataset="mnist"), r"size.dataset='mnist' needs an entry in setting.datasets"),
        (
            lambda p: p["data"].update(datasets=["breast-cancer", "diabetes"]),
            r"\['fashion-mnist'\] must also be listed in data.datasets",
        ),
        (lambda p: p["runtime"].update(workers=0), r"runtime.workers must be an int >= 1"),
        (lambda p: p["setting"].update(accountant="gdp"), r"setting.accountant must be one of"),
    ],
)
def test_validation_names_the_key_and_the_fix(params, edit, message):
    edit(params)
    with pytest.raises(ValueError, match=message):
        validate_params(params)


def test_notebook_parameter_check_rejects_a_misspelt_name():
    namespace = {"params_file": "p.yaml", "reports_dir": "r", "In": [], "_oh": {}, "json": json, "print_it": print}
    check_notebook_parameters(namespace, {"params_file", "reports_dir"})
    with pytest.raises(ValueError, match=r"unknown notebook parameter\(s\) \['report_dir'\]; this notebook accepts"):
        check_notebook_parameters({**namespace, "report_dir": "x"}, {"params_file", "reports_dir"})
