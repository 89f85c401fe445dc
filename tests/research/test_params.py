"""The params files: every profile loads into frozen sections; every bad edit is one line naming its key."""

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from adaclip.methods import METHODS
from adaclip.research.params import (
    Params,
    Task,
    check_notebook_parameters,
    load_params,
    params_from_mapping,
    scattering_channels,
    size_batch,
)

ROOT = Path(__file__).resolve().parents[2]
PROFILES = [ROOT / "params.yaml", ROOT / "profiles" / "paper.yaml", ROOT / "tests" / "fixtures" / "params-tiny.yaml"]
PER_METHOD_MAPS = {"lr", "scale", "method_params"}  # their keys are method names, which differ between tasks


def _keys(tree, prefix=""):
    """Every dotted key of a parsed params file; task names become ``*`` and per-method maps are leaves."""
    if not isinstance(tree, dict) or prefix.rsplit(".", 1)[-1] in PER_METHOD_MAPS:
        return {prefix}
    keys = set()
    for key, value in tree.items():
        name = "*" if prefix == "setting.tasks" else key
        keys |= _keys(value, f"{prefix}.{name}" if prefix else name)
    return keys


def _raw(path):
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.name)
def test_every_profile_loads_into_frozen_keyword_only_sections(path):
    params = load_params(path)
    assert isinstance(params, Params) and params.profile == _raw(path)["profile"]
    assert set(params.setting.tasks) == set(_raw(path)["setting"]["tasks"])
    assert all(isinstance(task, Task) for task in params.setting.tasks.values())
    assert isinstance(params.tuning.lr_factors, tuple)  # lists are frozen too
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.profile = "other"
    with pytest.raises(TypeError):
        Task("breast-cancer")  # keyword-only


def test_profiles_share_one_set_of_keys():
    quick, *others = [_keys(_raw(path)) for path in PROFILES]
    assert "setting.tasks.*.lr" in quick and "tuning.lr_factors" in quick
    for path, other in zip(PROFILES[1:], others, strict=True):
        assert other == quick, (path.name, sorted(other ^ quick))


@pytest.fixture
def tiny():
    return _raw(ROOT / "tests" / "fixtures" / "params-tiny.yaml")


def _task(p, name="breast-cancer"):
    return p["setting"]["tasks"][name]


# (id, edit of the tiny profile's mapping, the message's pattern: each names the dotted key)
BAD_EDITS = [
    ("unknown key", lambda p: p["accuracy"].update(epsilon=[1.0]), r"unknown key\(s\) \['accuracy.epsilon'\]"),
    ("unknown section", lambda p: p.update(acuracy={}), r"unknown key\(s\) \['acuracy'\]"),
    ("unknown task key", lambda p: _task(p).update(epoch=3), r"\['setting.tasks.breast-cancer.epoch'\]"),
    ("missing key", lambda p: p["tuning"].pop("seeds"), r"missing key\(s\) \['tuning.seeds'\]"),
    ("missing task key", lambda p: _task(p).pop("momentum"), r"\['setting.tasks.breast-cancer.momentum'\]"),
    ("section not a mapping", lambda p: p.update(size=[1]), r"^size must be a mapping"),
    ("wrong type", lambda p: p["accuracy"].update(epsilons="3"), r"^accuracy.epsilons must be a non-empty list"),
    ("empty list", lambda p: p["accuracy"].update(seeds=[]), r"^accuracy.seeds must be a non-empty list"),
    ("number as string", lambda p: p["setting"].update(delta="1e-5"), r"^setting.delta must be a number in \(0, 1\)"),
    ("bool for an int", lambda p: p["runtime"].update(workers=True), r"^runtime.workers must be an int >= 1"),
    ("bool for epochs", lambda p: _task(p).update(epochs=True), r"^setting.tasks.breast-cancer.epochs must be an int"),
    ("bool for a seed", lambda p: p["tuning"].update(seeds=[False]), r"^tuning.seeds must be a non-empty list of ints"),
    (
        "non-private grid smaller than a private one",
        lambda p: p["tuning"].update(nonprivate_lr_factors=[1.0]),
        r"^tuning.nonprivate_lr_factors has 1 values: the non-private baseline needs at least",
    ),
    ("float for an int", lambda p: p["theory"].update(steps=1.5), r"^theory.steps must be an int >= 1"),
    ("momentum 1", lambda p: _task(p).update(momentum=1.0), r"^setting.tasks.breast-cancer.momentum must be"),
    ("bad device", lambda p: p["runtime"].update(device="gpu"), r"^runtime.device must be 'cpu', 'cuda'"),
    ("bad accountant", lambda p: p["setting"].update(accountant="gdp"), r"^setting.accountant must be one of"),
    ("bad method", lambda p: p["setting"].update(methods=["nonprivate"]), r"^setting.methods must be a non-empty"),
    ("bad dataset", lambda p: _task(p).update(dataset="cifar"), r"^setting.tasks.breast-cancer.dataset must be one of"),
    ("batch > N", lambda p: _task(p).update(batch_size=456), r"setting.tasks.breast-cancer.batch_size=456 exceeds"),
    ("train_size > N", lambda p: _task(p).update(train_size=456), r"setting.tasks.breast-cancer.train_size=456"),
    (
        "delta = 1/N",
        lambda p: p["setting"].update(delta=1 / 455),
        r"^setting.delta=.* below 1/N .*N=455 .*breast-cancer",
    ),
    ("task method not in setting", lambda p: p["setting"].update(methods=["fixed"]), r"breast-cancer.methods \["),
    ("missing lr centre", lambda p: _task(p)["lr"].pop("auto"), r"setting.tasks.breast-cancer.lr needs .* 'auto'"),
    ("missing nonprivate lr", lambda p: _task(p)["lr"].pop("nonprivate"), r"breast-cancer.lr needs .* 'nonprivate'"),
    (
        "lr of no method",
        lambda p: _task(p)["lr"].update(fixd=1.0),
        r"setting.tasks.breast-cancer.lr has unknown .*fixd",
    ),
    (
        "missing scale centre",
        lambda p: _task(p)["scale"].pop("adaclip"),
        r"breast-cancer.scale needs .*'adaclip'.*initial_clip",
    ),
    ("scale of AUTO-S", lambda p: _task(p)["scale"].update(auto=1.0), r"breast-cancer.scale has unknown method.*auto"),
    ("zero lr", lambda p: _task(p)["lr"].update(fixed=0.0), r"^setting.tasks.breast-cancer.lr must be a mapping"),
    (
        "unknown method parameter",
        lambda p: _task(p)["method_params"].update(geoclip={"rnak": 4}),
        r"setting.tasks.breast-cancer.method_params.geoclip: unknown parameter\(s\) \['rnak'\]",
    ),
    (
        "scale parameter in method_params",
        lambda p: _task(p)["method_params"].update(fixed={"clip_norm": 2.0}),
        r"setting.tasks.breast-cancer.method_params.fixed.clip_norm is the tuning grid's scale axis",
    ),
    (
        "method_params of no method",
        lambda p: _task(p)["method_params"].update(dpsgd={}),
        r"setting.tasks.breast-cancer.method_params has unknown method",
    ),
    (
        "scatter_cnn on tabular data",
        lambda p: _task(p).update(model="scatter_cnn"),
        r"breast-cancer.model='scatter_cnn'",
    ),
    ("cnn on tabular data", lambda p: _task(p).update(model="cnn"), r"setting.tasks.breast-cancer.model='cnn' needs"),
    ("linear on classification", lambda p: _task(p).update(model="linear"), r"breast-cancer.model='linear' does not"),
    ("logistic on regression", lambda p: _task(p, "diabetes").update(model="logistic"), r"diabetes.model='logistic'"),
    (
        "dataset not prepared",
        lambda p: p["data"].update(datasets=["diabetes"]),
        r"setting.tasks.breast-cancer.dataset='breast-cancer' needs 'breast-cancer' in data.datasets",
    ),
    ("main task unknown", lambda p: p["setting"].update(main_task="mnist"), r"^setting.main_task='mnist' must be one"),
    ("size task unknown", lambda p: p["size"].update(task="mnist"), r"^size.task='mnist' must be one of setting.tasks"),
    ("size n > N", lambda p: p["size"].update(train_sizes=[200, 456]), r"^size.train_sizes\[1\]=456 exceeds the 455"),
    (
        "size n changes the steps",
        lambda p: p["size"].update(train_sizes=[20]),  # round(64 * 20 / 455) = 3: 6 steps per epoch, not 7
        r"^size.train_sizes\[0\]=20: .* gives 6 steps per epoch, not the task's 7",
    ),
    ("size n > task's N", lambda p: _task(p).update(train_size=300), r"^size.train_sizes\[1\]=400 exceeds the 300"),
    ("diagnostics task", lambda p: p["diagnostics"].update(tasks=["mnist"]), r"^diagnostics.tasks \['mnist'\] must be"),
    (
        "groups",
        lambda p: p["features"].update(groups=10),
        r"^features.groups=10 must divide the 81 scattering channels",
    ),
    (
        "accounting B > N",
        lambda p: p["accounting"].update(expected_batch_size=2000),
        r"^accounting.expected_batch_size",
    ),
    ("audit key", lambda p: p["audit"].update(trails=3), r"^audit: unknown audit key\(s\) \['trails'\]"),
    ("audit missing", lambda p: p["audit"].pop("seed"), r"^audit: missing audit key\(s\) \['seed'\]"),
]


@pytest.mark.parametrize(("edit", "message"), [b[1:] for b in BAD_EDITS], ids=[b[0] for b in BAD_EDITS])
def test_a_bad_edit_is_one_line_naming_the_dotted_key(tiny, edit, message):
    params_from_mapping(copy.deepcopy(tiny))  # the unedited profile is valid
    edit(tiny)
    with pytest.raises(ValueError, match=message) as error:
        params_from_mapping(tiny)
    assert "\n" not in str(error.value)


def test_load_params_names_the_file_and_the_yaml_position(tmp_path, tiny):
    tiny["tuning"]["seeds"] = [-1]
    bad = tmp_path / "p.yaml"
    bad.write_text(yaml.safe_dump(tiny))
    with pytest.raises(ValueError, match=rf"^{bad}: tuning.seeds must be a non-empty list of ints >= 0"):
        load_params(bad)
    bad.write_text("profile: [unclosed\n")
    with pytest.raises(ValueError, match=rf"^{bad}: malformed YAML at line 2"):
        load_params(bad)


def test_scattering_channels_and_the_size_sweep_batch():
    assert scattering_channels(2, 8) == 81  # Tramèr & Boneh's 81 x 7 x 7 features
    assert scattering_channels(1, 8) == 1 + 8
    assert scattering_channels(3, 4) == 1 + 12 + 16 * 3
    assert size_batch(8192, 55000, 1000) == 149  # 148.9
    assert size_batch(64, 455, 182) == 26 and size_batch(65, 455, 182) == 26  # 25.6 and exactly 26
    assert size_batch(64, 455, 1) == 1  # at least one expected example


def test_every_registered_scale_parameter_is_a_parameter_of_its_rule():
    """The tuning grid sets each method's ``scale_parameter``: it must be one of the rule's keyword parameters."""
    from adaclip.methods import method_parameters

    for name, entry in METHODS.items():
        assert entry.scale_parameter is None or entry.scale_parameter in method_parameters(name), name
        assert not entry.step_per_scale or entry.scale_parameter is not None, name


def test_notebook_parameter_check_rejects_a_misspelt_name():
    namespace = {"params_file": "p.yaml", "reports_dir": "r", "In": [], "_oh": {}, "json": json, "print_it": print}
    check_notebook_parameters(namespace, {"params_file", "reports_dir"})
    with pytest.raises(ValueError, match=r"unknown notebook parameter\(s\) \['report_dir'\]; this notebook accepts"):
        check_notebook_parameters({**namespace, "report_dir": "x"}, {"params_file", "reports_dir"})
