"""Models, the one-run trainer and the command line."""

import json

import pytest
import torch
from opacus.validators import ModuleValidator

from adaclip.research.cli import main, parser
from adaclip.research.models import MODELS, build_model
from adaclip.research.train import ALL_METHODS, TrainConfig, run

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


@pytest.mark.parametrize("method", ALL_METHODS)
def test_tiny_run_per_method_learns_and_reports_privacy(method, tmp_path):
    record = run({**TINY, "method": method}, out=tmp_path / "run.json")
    assert json.loads((tmp_path / "run.json").read_text())["test_accuracy"] == record["test_accuracy"]
    assert record["per_epoch"][-1]["train_loss"] < record["per_epoch"][0]["train_loss"]
    assert record["test_accuracy"] > 0.55  # chance is about 0.5; 20 noisy steps
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
    assert set(TrainConfig.__dataclass_fields__) - {"method_params", "progress", "momentum", "data_dir", "device"} <= {
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
