"""A table of bad inputs, as a new user would type them: each gets one line naming what is wrong, and nothing else.

Command-line rows run ``python -m adaclip train`` in process (``cli.main``) with ``--out`` under an empty
folder and assert exit status 2, exactly one line on stderr that starts with ``error:`` and names the
parameter, and that the folder is still empty (no record, no temporary file, no checkpoint).  Library
rows call the public functions and assert a ``ValueError`` or ``TypeError`` whose one-line message names
the parameter.  Rows are fast: validation fails before any training, and the few that load data use
scikit-learn's small tables.
"""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adaclip import epsilon, make_private, noise_multiplier_for
from adaclip.audit import audit_config
from adaclip.engine.sampling import TensorPoissonLoader, load_loader_state_dict
from adaclip.methods import AdaCliP, build_rule
from adaclip.research.cli import main
from adaclip.research.datasets import load_dataset
from adaclip.research.train import TrainConfig, run

BASE = ["--dataset", "breast-cancer", "--epochs", "1", "--no-progress"]
"""Options every row starts from, except the ``--config`` rows (whose file is the whole config)."""

# (row id, extra command-line arguments ({tmp} is the test's folder), text the one-line error must contain)
CLI_ROWS = [
    ("negative epsilon", ["--epsilon", "-5"], "epsilon must be"),
    ("zero epsilon", ["--epsilon", "0"], "epsilon must be"),
    ("nan epsilon", ["--epsilon", "nan"], "epsilon must be"),
    ("infinite epsilon", ["--epsilon", "inf"], "epsilon must be"),
    ("huge noise multiplier", ["--noise-multiplier", "1e300"], "noise_multiplier must be"),
    ("negative noise multiplier", ["--noise-multiplier", "-1"], "noise_multiplier must be"),
    ("zero noise multiplier", ["--noise-multiplier", "0"], "noise_multiplier must be"),
    ("epsilon and sigma", ["--epsilon", "3", "--noise-multiplier", "1"], "exactly one of epsilon"),
    ("delta of one", ["--delta", "1"], "delta must lie in (0, 1)"),
    ("negative delta", ["--delta=-1e-5"], "delta must lie in (0, 1), got -1e-05"),
    ("delta above 1/N", ["--delta", "0.01"], "delta=0.01 must be below 1/N"),
    ("nonprivate with epsilon", ["--method", "nonprivate", "--epsilon", "-5"], "--epsilon has no effect"),
    ("nonprivate with delta", ["--method", "nonprivate", "--delta", "1e-5"], "--delta has no effect"),
    ("nonprivate with sigma", ["--method", "nonprivate", "--noise-multiplier", "1"], "--noise-multiplier has no"),
    ("unknown method", ["--method", "dpsgd"], "argument --method"),
    ("unknown dataset", ["--dataset", "cifar"], "argument --dataset"),
    ("unknown accountant", ["--accountant", "gdp"], "argument --accountant"),
    ("unknown model", ["--model", "resnet"], "argument --model"),
    ("cnn on a table", ["--model", "cnn"], "model 'cnn' needs"),
    ("zero epochs", ["--epochs", "0"], "epochs must be"),
    ("epochs not a number", ["--epochs", "abc"], "argument --epochs"),
    ("fractional epochs", ["--epochs", "1.5"], "argument --epochs"),
    ("zero batch size", ["--batch-size", "0"], "batch_size must be"),
    ("batch above the data", ["--batch-size", "100000"], "batch_size=100000 exceeds"),
    ("negative lr", ["--lr", "-1"], "lr must be"),
    ("infinite lr", ["--lr", "inf"], "lr must be"),
    ("momentum of one", ["--momentum", "1"], "momentum must lie"),
    ("negative seed", ["--seed", "-1"], "seed must be"),
    ("zero train size", ["--train-size", "0"], "train_size must be"),
    ("train size above the data", ["--train-size", "100000"], "train_size must lie"),
    ("negative method parameter", ["--param", "beta1=-1"], "beta1 must lie"),
    ("unknown method parameter", ["--param", "clip=1"], "unknown parameter(s) ['clip']"),
    ("parameter without a value", ["--param", "initial_clip"], "--param takes KEY=VALUE"),
    ("parameter of malformed YAML", ["--param", "initial_clip=[1"], "--param initial_clip: malformed YAML"),
    ("parameter of the wrong type", ["--param", "initial_clip=big"], "initial_clip must be"),
    ("infeasible quantile split", ["--method", "quantile", "--param", "count_noise_std=0.01"], "count_noise_std"),
    ("data dir that does not exist", ["--dataset", "fashion-mnist", "--data-dir", "{tmp}/nowhere"], "data_dir"),
    ("data dir for a table", ["--data-dir", "/usr/share/datasets"], "data_dir is for the datasets read from files"),
    ("device name", ["--device", "cudafoo"], "device must be"),
    ("unknown divergence policy", ["--on-divergence", "ignore"], "argument --on-divergence"),
    ("replica check in one process", ["--check-replicas"], "check_replicas compares the ranks"),
    ("config file missing", ["--config", "{tmp}/missing.yaml"], "missing.yaml: no such file"),
    ("config of malformed YAML", ["--config", "{tmp}/malformed.yaml"], "malformed.yaml: malformed YAML at line 3"),
    ("config not a mapping", ["--config", "{tmp}/list.yaml"], "must hold a mapping of TrainConfig keys"),
    ("config method_params a list", ["--config", "{tmp}/params_list.yaml"], "method_params must be a mapping"),
    ("config method_params a string", ["--config", "{tmp}/params_string.yaml"], "method_params must be a mapping"),
    ("config data_dir a number", ["--config", "{tmp}/data_dir.yaml"], "data_dir must be a folder path"),
    ("config unknown key", ["--config", "{tmp}/unknown.yaml"], "unknown config key(s) ['learning_rate']"),
    ("config epochs a word", ["--config", "{tmp}/epochs.yaml"], "epochs must be an int"),
    ("config progress a word", ["--config", "{tmp}/progress.yaml"], "progress must be true or false"),
    ("config nonprivate with method_params", ["--config", "{tmp}/nonprivate.yaml"], "takes no method_params"),
    ("out onto a folder", ["--out", "{tmp}/folder"], "is a directory"),
    ("out under a file", ["--out", "{tmp}/file.txt/run.json"], "is a file, not a folder"),
    ("out in a read-only place", ["--out", "/proc/adaclip-bad-input/run.json"], "cannot write in /proc"),
    ("checkpoint that exists", ["--checkpoint", "{tmp}/old.pt"], "already exists: pass --resume"),
    ("resume without a checkpoint", ["--resume"], "resume needs a checkpoint"),
    ("resume of a missing checkpoint", ["--checkpoint", "{tmp}/none.pt", "--resume"], "nothing to resume"),
    ("resume of a foreign file", ["--checkpoint", "{tmp}/file.txt", "--resume"], "cannot be read"),
]

CONFIGS = {
    "malformed.yaml": "dataset: breast-cancer\nmethod_params: {initial_clip: [1\n",
    "list.yaml": "- dataset\n- breast-cancer\n",
    "params_list.yaml": "dataset: breast-cancer\nmethod_params: [1, 2]\n",
    "params_string.yaml": "dataset: breast-cancer\nmethod_params: initial_clip=1\n",
    "data_dir.yaml": "dataset: fashion-mnist\ndata_dir: 5\n",
    "unknown.yaml": "dataset: breast-cancer\nlearning_rate: 0.1\n",
    "epochs.yaml": "dataset: breast-cancer\nepochs: ten\nprogress: false\n",
    "progress.yaml": "dataset: breast-cancer\nepochs: 1\nprogress: nope\n",
    "nonprivate.yaml": "dataset: breast-cancer\nmethod: nonprivate\nmethod_params: {initial_clip: 1}\n",
}


def prepared_folder(tmp_path: Path) -> tuple[Path, set[str]]:
    """The inputs some rows point at, and the names present before the command runs."""
    for name, text in CONFIGS.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "folder").mkdir()
    (tmp_path / "file.txt").write_text("not a folder, not a checkpoint")
    (tmp_path / "old.pt").write_bytes(b"an earlier run's checkpoint")
    return tmp_path, {p.name for p in tmp_path.iterdir()}


@pytest.mark.parametrize("row, extra, expected", CLI_ROWS, ids=[row for row, _, _ in CLI_ROWS])
def test_bad_command_line_input_is_one_line_exit_2_and_leaves_nothing(row, extra, expected, tmp_path, capsys):
    folder, before = prepared_folder(tmp_path)
    args = [part.replace("{tmp}", str(folder)) for part in extra]
    out = [] if "--out" in args else ["--out", str(folder / "out" / "run.json")]
    base = [] if "--config" in args else BASE
    with pytest.raises(SystemExit) as stopped:
        raise SystemExit(main(["train", *base, *out, *args]))
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error"), lines
    assert expected in lines[0]
    assert {p.name for p in folder.iterdir()} == before and not list((folder / "folder").iterdir())


# (row id, the whole command line after ``python -m adaclip``, text the one-line error must contain)
PIPELINE_ROWS = [
    (
        "malformed tuning records",
        ["sweep", "accuracy", "--params", "{fixtures}/params-tiny.yaml", "--tuning", "{tmp}/file.txt"],
        "file.txt, line 1: not a JSON record",
    ),
    ("missing params file", ["prepare", "--params", "{tmp}/none.yaml", "--out", "{tmp}/out"], "none.yaml"),
    ("unknown sweep", ["sweep", "everything"], "argument name: invalid choice"),
]


@pytest.mark.parametrize("row, argv, expected", PIPELINE_ROWS, ids=[row for row, _, _ in PIPELINE_ROWS])
def test_bad_pipeline_input_is_one_line_exit_2_and_leaves_nothing(row, argv, expected, tmp_path, capsys):
    folder, before = prepared_folder(tmp_path)
    fixtures = Path(__file__).parent / "fixtures"
    args = [part.replace("{tmp}", str(folder)).replace("{fixtures}", str(fixtures)) for part in argv]
    if args[0] == "sweep" and "--out" not in args:
        args += ["--out", str(folder / "out" / "runs.jsonl")]
    with pytest.raises(SystemExit) as stopped:
        raise SystemExit(main(args))
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error") and expected in lines[0], lines
    assert {p.name for p in folder.iterdir()} == before


def test_the_table_covers_at_least_forty_bad_inputs():
    rows = [row for row, *_ in [*CLI_ROWS, *PIPELINE_ROWS, *LIBRARY_ROWS]]
    assert len(rows) >= 40 and len(set(rows)) == len(rows)


# --- the library ------------------------------------------------------------------------------------------------


def _private(**overrides):
    model = nn.Linear(3, 2)
    data = TensorDataset(torch.randn(100, 3), torch.randint(0, 2, (100,)))
    arguments = {
        "module": model,
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
        "data_loader": DataLoader(data, batch_size=10),
        "method": "adaclip",
        "noise_multiplier": 1.0,
        "delta": 1e-3,
        **overrides,
    }
    return make_private(**arguments)


def _loaded_with_a_plain_state_dict():
    _, optimizer, _ = _private()
    optimizer.load_state_dict(optimizer.original_optimizer.state_dict())


def _loader_of_another_rate():
    loader = TensorPoissonLoader(TensorDataset(torch.zeros(10, 1)), 0.5, generator=torch.Generator())
    load_loader_state_dict(loader, {"num_examples": 10, "sample_rate": 0.2, "generator": None})


def _adaclip_step_with_a_float32_state():
    rule = AdaCliP(noise_multiplier=1.0, expected_batch_size=4.0)
    noise = torch.randn(rule.noise_size(5), dtype=torch.float64)
    rule.step(torch.randn(4, 5, dtype=torch.float64), rule.init_state(5), noise)


# (row id, call, exception type, text the one-line message must contain)
LIBRARY_ROWS = [
    ("make_private optimizer None", lambda: _private(optimizer=None), TypeError, "optimizer must be"),
    ("make_private huge sigma", lambda: _private(noise_multiplier=1e300), ValueError, "noise_multiplier must be"),
    ("make_private nonfinite policy", lambda: _private(nonfinite="skip"), ValueError, "nonfinite must be one of"),
    ("make_private delta above 1/N", lambda: _private(delta=np.float32(0.5)), ValueError, "must be below 1/N"),
    ("make_private unknown parameter", lambda: _private(clip=1.0), ValueError, "unknown parameter(s) ['clip']"),
    (
        "epsilon huge sigma",
        lambda: epsilon(noise_multiplier=1e300, sample_rate=0.01, steps=10, delta=1e-5),
        ValueError,
        "noise_multiplier must be",
    ),
    (
        "calibration negative target",
        lambda: noise_multiplier_for(target_epsilon=-1.0, sample_rate=0.01, steps=10, delta=1e-5),
        ValueError,
        "target_epsilon must be",
    ),
    (
        "rule with a negative clip",
        lambda: build_rule("fixed", noise_multiplier=1.0, expected_batch_size=4, clip_norm=-1),
        ValueError,
        "clip_norm must be",
    ),
    ("state of another dtype", _adaclip_step_with_a_float32_state, ValueError, "state.mean is torch.float32"),
    ("plain optimizer state dict", _loaded_with_a_plain_state_dict, ValueError, "no privacy state"),
    ("sampling state of another rate", _loader_of_another_rate, ValueError, "sample_rate=0.2"),
    ("TrainConfig of a list", lambda: TrainConfig.from_dict([1, 2]), ValueError, "a config must be a mapping"),
    ("run of a string config", lambda: run("breast-cancer"), ValueError, "config must be a TrainConfig"),
    ("data_dir for a table", lambda: load_dataset("diabetes", data_dir="."), ValueError, "data_dir is for"),
    ("audit trials", lambda: audit_config({"trials": 2}), ValueError, "audit.trials must be"),
]


@pytest.mark.parametrize("row, call, error, expected", LIBRARY_ROWS, ids=[row for row, *_ in LIBRARY_ROWS])
def test_bad_library_input_is_a_named_one_line_error(row, call, error, expected):
    with pytest.raises(error) as raised:
        call()
    message = str(raised.value)
    assert expected in message and "\n" not in message, message


def test_numpy_scalars_are_good_input_everywhere(tmp_path):
    """The issue's ``np.float32`` delta was refused with "must lie in (0, 1)"."""
    record = run(
        {
            "dataset": "breast-cancer",
            "method": "fixed",
            "epochs": 1,
            "delta": np.float32(1e-5),
            "epsilon": np.float64(2.0),
            "batch_size": np.int64(32),
            "progress": False,
        },
        out=tmp_path / "run.json",
    )
    assert isinstance(record["delta"], float) and record["epsilon"] <= 2.0
    assert os.listdir(tmp_path) == ["run.json"]
