"""Models, the one-run trainer, its config and defaults, and the command line."""

import dataclasses
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from opacus.validators import ModuleValidator

from adaclip.methods import METHODS
from adaclip.privacy.accounting import epsilon
from adaclip.research.cli import main, parser
from adaclip.research.config import resolve
from adaclip.research.defaults import load_defaults
from adaclip.research.models import MODELS, build_model
from adaclip.research.train import TrainConfig, TrainingDiverged, run

SRC = str(Path(__file__).resolve().parents[2] / "src")

TINY = {"dataset": "synthetic", "train_size": 400, "epochs": 2, "batch_size": 40, "epsilon": 3.0, "progress": False}


def without_timings(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("wall_time_s", "examples_per_s")}


def test_models_shapes_parameters_and_no_batchnorm():
    cnn = build_model("cnn", (1, 28, 28), 10)
    assert sum(p.numel() for p in cnn.parameters()) == 26010  # Papernot et al. 2021's tanh CNN
    assert build_model("mlp", (1, 28, 28), 10)(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    assert (
        sum(p.numel() for p in build_model("mlp", (1, 28, 28), 10).parameters()) == 784 * 1000 + 1000 + 1000 * 10 + 10
    )
    assert build_model("logistic", (30,), 2)(torch.zeros(5, 30)).shape == (5, 2)
    assert build_model("linear", (10,), 1)(torch.zeros(5, 10)).shape == (5,)
    assert build_model("scatter_cnn", (81, 7, 7), 10)(torch.zeros(3, 81, 7, 7)).shape == (3, 10)
    for name in MODELS:
        shape = {"cnn": (1, 28, 28), "scatter_cnn": (81, 7, 7)}.get(name, (10,))
        assert ModuleValidator.validate(build_model(name, shape, 2), strict=True) == []
    with pytest.raises(ValueError, match="28, 28"):
        build_model("cnn", (30,), 2)
    with pytest.raises(ValueError, match="model must be one of"):
        build_model("resnet", (30,), 2)


@pytest.mark.parametrize("method", [*METHODS, "nonprivate"])
def test_tiny_run_per_method_learns_and_reports_privacy(method, tmp_path):
    record = run({**TINY, "method": method}, out=tmp_path / "run.json")
    assert json.loads((tmp_path / "run.json").read_text())["test_accuracy"] == record["test_accuracy"]
    assert record["per_epoch"][-1]["train_loss"] < record["per_epoch"][0]["train_loss"]
    assert record["test_accuracy"] > 0.53  # chance is about 0.5 (1000 test examples: standard error 0.016); 20 steps
    assert len(record["per_epoch"]) == 2 and record["steps"] == 2 * 10
    if method == "nonprivate":
        assert record["epsilon"] is None and record["noise_multiplier"] is None
    else:
        assert 0.99 * 3.0 <= record["epsilon"] <= 3.0
        assert record["delta"] == 1e-5 and record["accountant"] == "prv" and record["sample_rate"] == 0.1
        assert len(record["step_stats"]["clipped_fraction"]) == 20
    assert set(record["versions"]) >= {"torch", "opacus", "dp-accounting", "python"}


def test_same_config_and_seed_give_the_same_record():
    first, second = run({**TINY, "method": "adaclip"}), run({**TINY, "method": "adaclip"})
    assert without_timings(first) == without_timings(second)
    assert without_timings(run({**TINY, "method": "adaclip", "seed": 1})) != without_timings(first)


def test_regression_run_reports_mse():
    record = run({"dataset": "diabetes", "method": "fixed", "epochs": 3, "progress": False})
    assert "test_mse" in record and "test_accuracy" not in record
    assert record["test_mse"] < 1.0  # better than predicting the training mean (variance 1)


def test_quantile_defaults_stay_feasible_on_small_batches():
    record = run({"dataset": "breast-cancer", "method": "quantile", "epsilon": 1.0, "epochs": 2, "progress": False})
    assert record["method_params"]["count_noise_std"] == pytest.approx(max(32 / 20, record["noise_multiplier"]))


@pytest.mark.parametrize(
    "change, match",
    [
        ({"learning_rate": 0.1}, "unknown config key"),
        ({"epsilon": 0.0}, "epsilon"),
        ({"epsilon": None}, "exactly one"),
        ({"noise_multiplier": 1.0}, "exactly one"),
        ({"delta": 0.01}, "1/N"),
        ({"batch_size": 401}, "batch_size"),
        ({"epochs": 0}, "epochs"),
        ({"method": "dpsgd"}, "method"),
        ({"model": "cnn"}, "28, 28"),
        ({"accountant": "gdp"}, "accountant"),
        ({"method_params": {"kappa": -1}}, "kappa"),
        ({"method_params": {"clip": 1}}, "unknown parameter"),
    ],
)
def test_bad_configs_are_rejected_by_name(change, match):
    with pytest.raises(ValueError, match=match):
        run({**TINY, **change})


def test_invalid_config_writes_no_record(tmp_path):
    with pytest.raises(ValueError):
        run({**TINY, "epochs": -1}, out=tmp_path / "x.json")
    assert not list(tmp_path.iterdir())


def test_cli_trains_and_writes_the_record(tmp_path, capsys):
    out = tmp_path / "runs" / "x.json"
    code = main(
        [
            "train",
            "--dataset",
            "synthetic",
            "--method",
            "auto",
            "--epsilon",
            "2",
            "--epochs",
            "1",
            "--train-size",
            "300",
            "--batch-size",
            "30",
            "--param",
            "r=0.05",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    record = json.loads(out.read_text())
    assert record["method"] == "auto" and record["method_params"] == {"r": 0.05} and record["epsilon"] <= 2.0
    assert "test_accuracy=" in capsys.readouterr().out


def test_cli_config_file_and_overrides(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        "dataset: synthetic\nmethod: fixed\ntrain_size: 300\nbatch_size: 30\nepochs: 1\nprogress: false\n"
    )
    out = tmp_path / "x.json"
    assert main(["train", "--config", str(config), "--noise-multiplier", "2.0", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["noise_multiplier"] == 2.0 and record["method"] == "fixed" and record["target_epsilon"] is None


def test_cli_bad_input_is_one_line_and_nonzero(capsys):
    assert main(["train", "--dataset", "synthetic", "--epsilon", "-1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: epsilon must be") and "\n" not in err


def test_cli_help_lists_every_option():
    text = parser()._subparsers._group_actions[0].choices["train"].format_help()
    for option in (
        "--dataset",
        "--method",
        "--model",
        "--epsilon",
        "--noise-multiplier",
        "--delta",
        "--accountant",
        "--epochs",
        "--batch-size",
        "--lr",
        "--seed",
        "--train-size",
        "--param",
        "--config",
        "--out",
        "--no-progress",
    ):
        assert option in text
    labels_and_mappings = {"method_params", "progress", "momentum", "data_dir", "device", "task"}  # task: a label
    assert set(TrainConfig.__dataclass_fields__) - labels_and_mappings <= {
        o.lstrip("-").replace("-", "_") for o in text.split() if o.startswith("--")
    }


def test_diagnostics_compare_the_released_step_with_the_clean_gradient():
    """No clipping (huge C) and almost no noise: the released step is the clean gradient (cosine 1).

    With clipping and noise the cosine falls; the diagnostic reads the un-noised gradient of the same batch.
    """
    base = {
        "dataset": "synthetic",
        "method": "fixed",
        "epochs": 1,
        "progress": False,
        "epsilon": None,
        "accountant": "rdp",
        "diagnostics": True,
    }
    clean = run({**base, "noise_multiplier": 1e-9, "method_params": {"clip_norm": 1e6}})["step_stats"]
    assert min(clean["cosine_release"]) > 0.999999 and min(clean["cosine_noise_free"]) > 0.999999
    noisy = run({**base, "noise_multiplier": 1.0, "method_params": {"clip_norm": 0.01}})["step_stats"]
    assert max(noisy["cosine_release"]) < 0.99
    assert len(noisy["cosine_release"]) == len(noisy["noise_power"]) == len(noisy["snr"])


def test_device_names_are_parsed_and_a_missing_gpu_is_named():
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda' or 'cuda:i', got 'cudafoo'"):
        run(TrainConfig(dataset="diabetes", method="fixed", epochs=1, device="cudafoo", progress=False))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA device"):
            run(TrainConfig(dataset="diabetes", method="fixed", epochs=1, device="cuda", progress=False))


# --- diverged runs ------------------------------------------------------------------------------------------------

DIVERGING = {"dataset": "diabetes", "method": "adaclip", "lr": 1e20, "epochs": 2, "progress": False}


def strict_json(text: str) -> dict:
    def refuse(token: str) -> None:
        raise AssertionError(f"non-strict JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def test_a_diverged_run_stops_with_a_named_error_and_writes_nothing(tmp_path):
    with pytest.raises(TrainingDiverged, match=r"training diverged: the training loss is inf at epoch 1"):
        run(DIVERGING, out=tmp_path / "x.json")
    assert not list(tmp_path.iterdir())


def test_a_diverged_run_can_be_recorded_as_strict_json(tmp_path):
    record = run({**DIVERGING, "on_divergence": "record"}, out=tmp_path / "x.json")
    saved = strict_json((tmp_path / "x.json").read_text())
    assert saved["diverged"] is True and saved["divergence"].startswith("the training loss is inf at epoch 1")
    assert saved["test_mse"] is None and saved["val_mse"] is None and saved["per_epoch"][-1]["train_loss"] is None
    # epsilon is what the steps actually taken spent
    assert 0 < saved["epsilon"] < 3.0 and saved["steps"] == record["steps"] < 2 * int(1 / saved["sample_rate"])


def test_a_nonprivate_diverged_run_exits_nonzero_on_the_command_line(capsys):
    assert main(["train", "--dataset", "diabetes", "--method", "nonprivate", "--lr", "1e6", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: training diverged") and "\n" not in err


def test_records_are_strict_json_and_name_a_nonfinite_value():
    from adaclip.research.records import to_json

    with pytest.raises(ValueError, match=r"non-finite number at per_epoch\[0\]\.test_mse"):
        to_json({"per_epoch": [{"test_mse": float("nan")}]})


# --- epsilon before training, and the accountant that answered ----------------------------------------------------


def test_with_a_given_sigma_epsilon_is_computed_before_any_training(monkeypatch):
    from adaclip.research import train

    def refuse(**kwargs):
        raise ValueError("the accountant refused")

    built = []
    monkeypatch.setattr(train, "account", refuse)
    monkeypatch.setattr(train, "build_model", lambda *args: built.append(args))
    with pytest.raises(ValueError, match="the accountant refused"):
        run({**TINY, "epsilon": None, "noise_multiplier": 0.5})
    assert not built


def test_a_small_sigma_trains_and_records_the_fallback_accountant(tmp_path):
    """``--noise-multiplier 0.1`` trained, then died in the epsilon computation and lost the record."""
    with pytest.warns(UserWarning, match="PRV accountant would discretise"):
        record = run(
            {"dataset": "breast-cancer", "method": "fixed", "epsilon": None, "noise_multiplier": 0.1, "epochs": 20},
            out=tmp_path / "x.json",
        )
    assert record["epsilon_accountant"] == "rdp" and "grid points" in record["accounting_fallback"]
    assert strict_json((tmp_path / "x.json").read_text())["epsilon"] == record["epsilon"] > 100


def test_a_huge_target_epsilon_trains_with_one_line_warnings(tmp_path, capsys):
    """``--epsilon 1000`` raised MemoryError: now RDP calibrates it, and says so on one line per warning."""
    out = tmp_path / "x.json"
    args = ["train", "--dataset", "breast-cancer", "--method", "fixed", "--epsilon", "1000", "--epochs", "1"]
    assert main([*args, "--no-progress", "--out", str(out)]) == 0
    warnings_printed = capsys.readouterr().err.strip().splitlines()
    assert warnings_printed and all(line.startswith("warning: the PRV accountant would") for line in warnings_printed)
    record = strict_json(out.read_text())
    assert record["epsilon_accountant"] == "rdp" and record["epsilon"] <= 1000


# --- checkpoints and resume ---------------------------------------------------------------------------------------

KILLER = """
import os, signal, sys
import adaclip.research.train as train
from adaclip.engine.optimizer import AdaptiveClipDPOptimizer
import torch

saved, steps_after = [], [0]
original_save = train._save_checkpoint


def save(*args, **kwargs):
    original_save(*args, **kwargs)
    saved.append(True)


def counting(step):
    def wrapped(self, *args, **kwargs):
        result = step(self, *args, **kwargs)
        if saved:
            steps_after[0] += 1
            if steps_after[0] == 3:  # three steps into the second epoch: kill -9
                os.kill(os.getpid(), signal.SIGKILL)
        return result
    return wrapped


train._save_checkpoint = save
AdaptiveClipDPOptimizer.step = counting(AdaptiveClipDPOptimizer.step)
torch.optim.SGD.step = counting(torch.optim.SGD.step)
from adaclip.research.cli import main
sys.exit(main(sys.argv[1:]))
"""


def train_args(method: str, checkpoint, out) -> list[str]:
    return [
        "train",
        "--dataset",
        "synthetic",
        "--method",
        method,
        "--train-size",
        "400",
        "--batch-size",
        "40",
        "--epochs",
        "3",
        "--momentum",
        "0.5",
        "--no-progress",
        "--checkpoint",
        str(checkpoint),
        "--out",
        str(out),
    ]


@pytest.mark.parametrize("method", ["adaclip", "nonprivate"])
def test_a_killed_run_resumes_to_the_same_parameters_and_epsilon(method, tmp_path):
    """The fault test: kill -9 a run three steps after its first checkpoint, resume it, compare bitwise."""
    killed = subprocess.run(
        [sys.executable, "-c", KILLER, *train_args(method, tmp_path / "a.pt", tmp_path / "a.json")],
        env={**os.environ, "PYTHONPATH": SRC, "TQDM_DISABLE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (tmp_path / "a.json").exists()
    assert torch.load(tmp_path / "a.pt", weights_only=True)["progress"]["epoch"] == 1
    assert main([*train_args(method, tmp_path / "a.pt", tmp_path / "a.json"), "--resume"]) == 0
    assert main(train_args(method, tmp_path / "b.pt", tmp_path / "b.json")) == 0

    resumed, uninterrupted = (strict_json((tmp_path / f"{x}.json").read_text()) for x in "ab")
    assert resumed["resumed_at_epoch"] == 1 and uninterrupted["resumed_at_epoch"] is None
    assert resumed["epsilon"] == uninterrupted["epsilon"] and resumed["steps"] == uninterrupted["steps"]
    assert resumed["per_epoch"] == uninterrupted["per_epoch"]
    final = {x: torch.load(tmp_path / f"{x}.pt", weights_only=True)["model"] for x in "ab"}
    assert final["a"].keys() == final["b"].keys()
    assert all(torch.equal(final["a"][k], final["b"][k]) for k in final["a"])
    if method != "nonprivate":
        expected = epsilon(noise_multiplier=resumed["noise_multiplier"], sample_rate=0.1, steps=30, delta=1e-5)
        assert resumed["epsilon"] == expected  # every step counted, not only those after the resume


def test_checkpoint_misuse_is_refused_before_training(tmp_path):
    checkpoint = tmp_path / "c.pt"
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        run(TINY, checkpoint=checkpoint, resume=True)
    with pytest.raises(ValueError, match="resume needs a checkpoint"):
        run(TINY, resume=True)
    run({**TINY, "epochs": 1}, checkpoint=checkpoint)
    with pytest.raises(ValueError, match="already exists: pass --resume"):
        run({**TINY, "epochs": 1}, checkpoint=checkpoint)
    with pytest.raises(ValueError, match=r"another config: epochs: saved 1, here 2"):
        run({**TINY, "epochs": 2}, checkpoint=checkpoint, resume=True)
    checkpoint.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read"):
        run({**TINY, "epochs": 1}, checkpoint=checkpoint, resume=True)


# --- YAML, the command line and the output files -------------------------------------------------------------------


def test_yaml_numbers_without_a_decimal_point_are_numbers(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("dataset: synthetic\ntrain_size: 300\nbatch_size: 30\nepochs: 1\ndelta: 1e-5\nprogress: false\n")
    out = tmp_path / "x.json"
    assert (
        main(["train", "--config", str(config), "--method", "adaclip", "--param", "h1=1e-12", "--out", str(out)]) == 0
    )
    record = json.loads(out.read_text())
    assert record["delta"] == 1e-5 and record["method_params"]["h1"] == 1e-12


def test_malformed_yaml_is_one_line_naming_the_file_and_place(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("dataset: synthetic\nmethod_params: {initial_clip: [1\n")
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {config}: malformed YAML at line 3") and "\n" not in err


def test_records_follow_the_umask_and_stale_temporaries_are_cleaned(tmp_path):
    from adaclip.research.io import write_text_atomic

    stale = tmp_path / ".x.json.999999999.abc.tmp"  # a writer that died (no such process)
    live = tmp_path / f".x.json.{os.getpid()}.def.tmp"  # a writer still running
    stale.write_text("half")
    live.write_text("half")
    previous = os.umask(0o027)
    try:
        write_text_atomic(tmp_path / "x.json", "{}")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "x.json").stat().st_mode) == 0o640
    assert not stale.exists() and live.exists()


def test_a_config_is_frozen_keyword_only_and_checks_itself_when_built():
    config = TrainConfig(dataset="synthetic", epsilon=np.float32(2.0), seed=np.int64(3), momentum=0)
    assert (config.epsilon, config.seed, config.momentum) == (2.0, 3, 0.0)
    assert type(config.epsilon) is float and type(config.seed) is int and type(config.momentum) is float
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.epochs = 3
    with pytest.raises(TypeError):
        TrainConfig("synthetic")
    for bad, match in (
        ({"seed": True}, "seed must be an int >= 0, got True"),
        ({"momentum": 1.0}, r"momentum must lie in \[0.0, 1.0\)"),
        ({"device": "tpu"}, "device must be 'cpu', 'cuda' or 'cuda:i'"),
        ({"progress": 1}, "progress must be true or false"),
        ({"data_dir": "x"}, "data_dir is for the datasets read from files"),
        ({"feature_spread": 0.5}, r"feature_spread is the spread of feature scales of \['synthetic'\], a number >= 1"),
        ({"epsilon": None}, "exactly one"),
    ):
        with pytest.raises(ValueError, match=match):
            TrainConfig(dataset="synthetic", **bad)


def test_resolve_fills_the_shipped_defaults_into_a_new_config():
    shipped = yaml.safe_load((Path(SRC) / "adaclip" / "research" / "defaults.yaml").read_text())
    config = TrainConfig(dataset="fashion-mnist", method="quantile")
    resolved = resolve(config)
    image = shipped["fashion-mnist"]
    assert (resolved.model, resolved.epochs, resolved.batch_size) == (image["model"], image["epochs"], 256)
    assert resolved.lr == image["method_lr"]["quantile"] and config.lr is None  # the given config is unchanged
    assert resolve(TrainConfig(dataset="diabetes", method="psac")).lr == shipped["diabetes"]["lr"]
    baseline = resolve(TrainConfig(dataset="diabetes", method="nonprivate", delta=1e-6))
    assert baseline.lr == shipped["diabetes"]["nonprivate_lr"] and baseline.delta is None and baseline.epsilon is None
    with pytest.raises(ValueError, match="kappa"):  # the rule's hyperparameters, once the batch size is known
        resolve(TrainConfig(dataset="diabetes", method="adaclip", method_params={"kappa": -1}))


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda d: d.clear(), "must map dataset names to their defaults"),
        (lambda d: d["diabetes"].update(lr=0), r"defaults.yaml: diabetes.lr must be a number > 0 .*, got 0$"),
        (lambda d: d["synthetic"].update(model="resnet"), r"synthetic.model must be one of"),
        (lambda d: d["synthetic"]["method_lr"].update(dpsgd=0.1), r"unknown method\(s\) \['dpsgd'\]"),
        (lambda d: d["synthetic"].pop("epochs"), r"synthetic must have exactly the keys \['batch_size', 'epochs'"),
    ],
)
def test_a_bad_defaults_file_is_refused_naming_the_key(edit, match):
    path = Path(SRC) / "adaclip" / "research" / "defaults.yaml"
    values = yaml.safe_load(path.read_text())
    assert load_defaults(yaml.safe_dump(values), "defaults.yaml")["mnist"].lr == values["mnist"]["lr"]
    values = {name: {**entry, "method_lr": dict(entry["method_lr"])} for name, entry in values.items()}
    edit(values)
    with pytest.raises(ValueError, match=match):
        load_defaults(yaml.safe_dump(values), "defaults.yaml")


def test_the_train_options_are_the_config_fields_with_their_defaults():
    train = parser()._subparsers._group_actions[0].choices["train"]
    options = {action.dest: action for action in train._actions}
    for item in dataclasses.fields(TrainConfig):
        action = options["param" if item.name == "method_params" else item.name]
        assert action.default is None  # left out: the --config file's value, else the field's default
        if item.default not in (None, dataclasses.MISSING) and not isinstance(item.default, bool):
            assert f"(default {item.default})" in action.help
    args = train.parse_args(["--no-progress", "--diagnostics", "--noise-multiplier", "2", "--param", "clip_norm=3"])
    assert (args.progress, args.diagnostics, args.noise_multiplier, args.param) == (
        False,
        True,
        2.0,
        [("clip_norm", 3)],
    )
