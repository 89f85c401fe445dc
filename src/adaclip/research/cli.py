"""Command line: ``python -m adaclip train|prepare|sweep|aggregate``.

``train`` runs one model (``python -m adaclip train --dataset fashion-mnist --method adaclip --epsilon 3
--out runs/x.json``); the same command under ``torchrun --nproc_per_node N -m adaclip train ...`` trains
data-parallel on N processes (gloo on CPU, NCCL with ``--device cuda``; see :mod:`adaclip.engine.distributed`).
``prepare``, ``sweep`` and ``aggregate`` are the report pipeline's data, run and aggregation stages.

Every error the user can fix (a bad option, value, file or destination) is one line on stderr,
``error: ...`` naming the option or key, with exit status 2, and leaves no file behind; warnings (e.g.
an accountant falling back to RDP) are one line each, ``warning: ...``.  ``train --checkpoint PATH``
saves the run at the end of every epoch and ``--resume`` continues it (see :mod:`adaclip.research.train`).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn

from adaclip.engine import distributed as dist_utils
from adaclip.methods import METHODS, NONPRIVATE
from adaclip.privacy.accounting import ACCOUNTANTS
from adaclip.research.datasets import dataset_names
from adaclip.research.io import write_text_atomic
from adaclip.research.models import MODELS
from adaclip.research.params import SWEEPS, load_params
from adaclip.research.records import load_yaml, parse_yaml_value, read_records

COMMAND_MODULES = {
    "train": "adaclip.research.train",
    "prepare": "adaclip.research.data",
    "sweep": "adaclip.research.sweeps",
    "aggregate": "adaclip.research.report",
}
"""The module that does each command's work, imported only when that command runs (so that a pipeline
stage imports what its command needs, and ``dvc.yaml`` lists exactly that; a test checks it)."""


def _method_param(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--param takes KEY=VALUE, got {text!r}")
    try:
        return key, parse_yaml_value(value, f"--param {key}")
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


class _Parser(argparse.ArgumentParser):
    """``argparse`` with one-line errors (``error: ...``, exit status 2) instead of a usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


def parser() -> argparse.ArgumentParser:
    top = _Parser(prog="python -m adaclip", description="Differentially private training with adaptive clipping.")
    commands = top.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = commands.add_parser(
        "train",
        help="train one model and write its metrics record",
        description=(
            "Train one model and write a JSON metrics record. Options left out take the dataset's defaults; "
            "--config values are overridden by options given here."
        ),
    )
    train.add_argument("--config", type=Path, help="YAML file of TrainConfig keys (dataset, method, epsilon, ...)")
    train.add_argument("--dataset", choices=dataset_names())
    train.add_argument("--method", choices=[*METHODS, NONPRIVATE], help="clipping method (default adaclip)")
    train.add_argument("--model", choices=MODELS, help="default: the dataset's (cnn for images)")
    train.add_argument("--epsilon", type=float, help="target epsilon (default 3); sigma is calibrated for it")
    train.add_argument("--noise-multiplier", type=float, help="use this sigma instead of a target epsilon")
    train.add_argument("--delta", type=float, help="default: 1e-5, or N^-1.1 if 1e-5 >= 1/N")
    train.add_argument("--accountant", choices=ACCOUNTANTS, help="default prv")
    train.add_argument("--epochs", type=int)
    train.add_argument("--batch-size", type=int, help="expected (Poisson) batch size")
    train.add_argument("--lr", type=float, help="learning rate of SGD")
    train.add_argument("--momentum", type=float)
    train.add_argument("--seed", type=int, help="fixes split, init, sampling and noise (default 0)")
    train.add_argument("--train-size", type=int, help="subsample the training split to this many examples")
    train.add_argument(
        "--feature-spread", type=float, help="synthetic only: largest / smallest feature scale (default 100)"
    )
    train.add_argument("--data-dir", help="folder with the IDX .gz files (image datasets)")
    train.add_argument("--device", help="cpu (default) or cuda")
    train.add_argument(
        "--param",
        type=_method_param,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method parameter, e.g. --param initial_clip=0.5 (repeatable)",
    )
    train.add_argument(
        "--diagnostics",
        action="store_true",
        help="also record each step's cosine to the clean (non-private) gradient; a report diagnostic",
    )
    train.add_argument(
        "--check-replicas",
        action="store_true",
        help=(
            "under torchrun: assert every step that all ranks hold the same state and parameters "
            "(debugging; one broadcast per tensor)"
        ),
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar (or set TQDM_DISABLE=1)")
    train.add_argument(
        "--on-divergence",
        choices=["raise", "record"],
        help="a non-finite loss or metric: stop with an error (raise, default) or record diverged: true (record)",
    )
    train.add_argument("--out", type=Path, help="write the JSON record here (atomically)")
    train.add_argument(
        "--checkpoint",
        type=Path,
        help="save the run here (atomically) at the end of every epoch; must not exist unless --resume",
    )
    train.add_argument(
        "--resume", action="store_true", help="continue the run saved in --checkpoint (same options) to its end"
    )
    prepare = commands.add_parser(
        "prepare",
        help="the data stage: verified copies of the datasets in params.yaml",
        description=(
            "Copy every image dataset listed in the params file's data.datasets, checksum-verified, into --out."
        ),
    )
    prepare.add_argument("--params", type=Path, default=Path("params.yaml"))
    prepare.add_argument("--out", type=Path, default=Path("data/prepared"))
    sweep = commands.add_parser(
        "sweep",
        help="run one of the report's training sweeps",
        description="Run one sweep of the report (see adaclip.research.sweeps) and write its records as JSON lines.",
    )
    sweep.add_argument("name", choices=SWEEPS)
    sweep.add_argument("--params", type=Path, default=Path("params.yaml"))
    sweep.add_argument("--prepared", type=Path, default=Path("data/prepared"), help="the prepare stage's output folder")
    sweep.add_argument(
        "--features",
        type=Path,
        default=Path("data/features/fashion-mnist-scatternet"),
        help="the features stage's output folder",
    )
    sweep.add_argument("--tuning", type=Path, help="records of the tuning sweep (needed by every other sweep)")
    sweep.add_argument("--out", type=Path, required=True, help="JSON-lines file of run records (written atomically)")
    aggregate = commands.add_parser(
        "aggregate", help="summarise the sweeps into the report's numbers and headline metrics"
    )
    aggregate.add_argument("--params", type=Path, default=Path("params.yaml"))
    aggregate.add_argument("--runs", type=Path, default=Path("runs"), help="folder with <sweep>.jsonl for every sweep")
    aggregate.add_argument("--bench", type=Path, help="the benchmark's JSON records (optional)")
    aggregate.add_argument("--audit", type=Path, help="the audit's JSON results (optional)")
    aggregate.add_argument("--summary", type=Path, default=Path("reports/summary.json"))
    aggregate.add_argument(
        "--metrics", type=Path, default=Path("reports/metrics"), help="folder for the {method: value} headline files"
    )
    return top


def _aggregate(args: argparse.Namespace) -> None:
    from adaclip.research.report import headline_metrics, summarise

    params = load_params(args.params)
    sweeps = {name: read_records(args.runs / f"{name}.jsonl") for name in SWEEPS}
    bench = _read_json(args.bench) if args.bench is not None else None
    audit = _read_json(args.audit) if args.audit is not None else None
    summary = summarise(params, sweeps, bench, audit)
    metrics = headline_metrics(summary)
    for name, values in metrics.items():
        write_text_atomic(args.metrics / f"{name}.json", json.dumps(values, indent=1, sort_keys=True) + "\n")
    write_text_atomic(args.summary, json.dumps(summary, indent=1, sort_keys=True) + "\n")
    print(f"wrote {args.summary} and {len(metrics)} metrics files in {args.metrics}")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not JSON ({error.msg} at line {error.lineno}, column {error.colno})") from None


def _prepare(args: argparse.Namespace) -> None:
    from adaclip.research.datasets import prepare

    params = load_params(args.params)
    manifest = prepare(list(params.data.datasets), args.out)
    print(f"prepared {sorted(manifest)} in {args.out}")


def _sweep(args: argparse.Namespace) -> None:
    from adaclip.research.analysis import select
    from adaclip.research.sweeps import run_sweep, sweep_configs

    params = load_params(args.params)
    selected, tuning = None, []
    if args.name != "tuning":
        if args.tuning is None:
            raise ValueError(f"the {args.name} sweep needs --tuning runs/tuning.jsonl (the tuning sweep's records)")
        tuning = read_records(args.tuning)
        selected = select(tuning)
    records = run_sweep(
        sweep_configs(args.name, params, selected),
        args.out,
        workers=params.runtime.workers,
        prepared_dir=args.prepared,
        features_dir=args.features,
        keep_step_stats=args.name == "diagnostics",
        label=args.name,
        reuse=tuning,
    )
    print(f"{args.name}: {len(records)} runs written to {args.out}")


PRIVACY_OPTIONS = ("epsilon", "noise_multiplier", "delta")


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if args.config is not None:
        loaded = load_yaml(args.config)
        if not isinstance(loaded, dict):
            raise ValueError(f"--config {args.config} must hold a mapping of TrainConfig keys, got {loaded!r}")
        values.update(loaded)
    options = (
        "dataset",
        "method",
        "model",
        "epsilon",
        "noise_multiplier",
        "delta",
        "accountant",
        "epochs",
        "batch_size",
        "lr",
        "momentum",
        "seed",
        "train_size",
        "feature_spread",
        "data_dir",
        "device",
    )
    values.update({name: getattr(args, name) for name in options if getattr(args, name) is not None})
    if values.get("method") == NONPRIVATE:
        given = [f"--{name.replace('_', '-')}" for name in PRIVACY_OPTIONS if getattr(args, name) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} has no effect with --method nonprivate (it trains without privacy)")
    if args.noise_multiplier is not None and args.epsilon is None:
        values["epsilon"] = None
    if args.param:
        loaded_params = values.get("method_params", {})
        if not isinstance(loaded_params, dict):
            raise ValueError(f"method_params must be a mapping of the method's parameters, got {loaded_params!r}")
        values["method_params"] = {**loaded_params, **dict(args.param)}
    if args.on_divergence is not None:
        values["on_divergence"] = args.on_divergence
    if args.diagnostics:
        values["diagnostics"] = True
    if args.check_replicas:
        values["check_replicas"] = True
    if args.no_progress:
        values["progress"] = False
    return values


def _show_warning(message: Warning | str, category: type[Warning], *args: object, **kwargs: object) -> None:
    print(f"warning: {' '.join(str(message).split())}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning  # one line per warning; restored when the block ends
        return _run_command(args)


def _run_command(args: argparse.Namespace) -> int:
    if args.command in ("prepare", "sweep", "aggregate"):
        try:
            {"prepare": _prepare, "sweep": _sweep, "aggregate": _aggregate}[args.command](args)
        except (ValueError, TypeError, OSError) as error:
            print(f"error: {_one_line(error)}", file=sys.stderr)
            return 2
        return 0
    from adaclip.research.train import TrainConfig, run

    try:
        values = config_from_args(args)
        if dist_utils.launched_with_several_processes():
            dist_utils.init_from_environment(values.get("device", "cpu"))
        record = run(TrainConfig.from_dict(values), out=args.out, checkpoint=args.checkpoint, resume=args.resume)
    except (ValueError, TypeError, OSError) as error:
        where = f" (rank {dist_utils.rank()})" if dist_utils.world_size() > 1 else ""
        print(f"error{where}: {_one_line(error)}", file=sys.stderr)
        return 2
    finally:
        if dist_utils.is_initialized():
            dist_utils.destroy()
    if dist_utils.rank_from_environment() != 0:
        return 0
    metric = "test_accuracy" if "test_accuracy" in record else "test_mse"
    privacy = (
        "non-private"
        if record["epsilon"] is None
        else f"epsilon={record['epsilon']:.3f} delta={record['delta']:.2g} ({record['epsilon_accountant']})"
    )
    ranks = f" on {record['world_size']} ranks" if record["world_size"] > 1 else ""
    outcome = f"DIVERGED ({record['divergence']})" if record["diverged"] else f"{metric}={record[metric]:.4f}"
    print(f"{record['method']} on {record['dataset']}: {outcome}, {privacy}, {record['wall_time_s']:.1f} s{ranks}")
    return 0


def _one_line(error: BaseException) -> str:
    """The error's message on one line (a ``TypeError`` from a bad value keeps its type name)."""
    text = " ".join(str(error).split())
    if isinstance(error, FileNotFoundError) and error.filename is not None and str(error.filename) not in text:
        text = f"{error.filename}: {text}"
    return f"{type(error).__name__}: {text}" if isinstance(error, TypeError) else text


if __name__ == "__main__":
    sys.exit(main())
