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
import dataclasses
import json
import sys
import typing
import warnings
from pathlib import Path
from typing import Any, NoReturn

from adaclip.engine import distributed as dist_utils
from adaclip.methods import NONPRIVATE
from adaclip.research.config import TrainConfig
from adaclip.research.io import write_text_atomic
from adaclip.research.params import SWEEPS, load_params
from adaclip.research.records import load_yaml, parse_yaml_value, read_records

COMMAND_MODULES = {
    "train": "adaclip.research.train",
    "prepare": "adaclip.research.datasets",
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
    """The command line: ``train`` (its options generated from :class:`TrainConfig`'s fields), ``prepare``,
    ``sweep`` and ``aggregate``."""
    top = _Parser(prog="python -m adaclip", description="Differentially private training with adaptive clipping.")
    commands = top.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_train(commands)
    prepare = commands.add_parser(
        "prepare",
        help="the data stage: verified copies of the datasets in params.yaml",
        description=(
            "Copy every image dataset listed in the params file's data.datasets, checksum-verified, into --out."
        ),
    )
    prepare.add_argument("--params", type=Path, default=Path("params.yaml"))
    prepare.add_argument("--out", type=Path, default=Path("data/prepared"))
    _add_sweep(commands)
    _add_aggregate(commands)
    return top


def _add_train(commands: Any) -> None:
    train = commands.add_parser(
        "train",
        help="train one model and write its metrics record",
        description=(
            "Train one model and write a JSON metrics record. Options left out take the dataset's defaults; "
            "--config values are overridden by options given here."
        ),
    )
    train.add_argument("--config", type=Path, help="YAML file of TrainConfig keys (dataset, method, epsilon, ...)")
    for item in dataclasses.fields(TrainConfig):
        flag, kwargs = _train_option(item)
        train.add_argument(flag, **kwargs)
    train.add_argument("--out", type=Path, help="write the JSON record here (atomically)")
    train.add_argument(
        "--checkpoint",
        type=Path,
        help="save the run here (atomically) at the end of every epoch; must not exist unless --resume",
    )
    train.add_argument(
        "--resume", action="store_true", help="continue the run saved in --checkpoint (same options) to its end"
    )


_FIELD_TYPES = typing.get_type_hints(TrainConfig)


def _train_option(item: dataclasses.Field[Any]) -> tuple[str, dict[str, Any]]:
    """The ``train`` option of one :class:`TrainConfig` field: its flag and ``add_argument``'s keywords.  Every
    option defaults to ``None`` (left out: the config file's value, else the field's default, which the help
    names)."""
    option = item.metadata
    flag = option["flag"] or f"--{item.name.replace('_', '-')}"
    text = option["help"]
    if item.default is not dataclasses.MISSING and item.default is not None and not isinstance(item.default, bool):
        text += f" (default {item.default})"
    if item.name == "method_params":
        return flag, {"type": _method_param, "action": "append", "metavar": "KEY=VALUE", "help": text, "dest": "param"}
    if _FIELD_TYPES[item.name] is bool:  # a switch that sets the opposite of the field's default
        return flag, {"action": "store_const", "const": not item.default, "dest": item.name, "help": text}
    kwargs: dict[str, Any] = {"help": text}
    if option["choices"] is not None:
        kwargs["choices"] = list(option["choices"]() if callable(option["choices"]) else option["choices"])
    else:
        hint = _FIELD_TYPES[item.name]
        kwargs["type"] = next(t for t in (int, float, str) if t is hint or t in typing.get_args(hint))
    return flag, kwargs


def _add_sweep(commands: Any) -> None:
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


def _add_aggregate(commands: Any) -> None:
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
    """The ``train`` config: the ``--config`` file's keys, overridden by every option given."""
    values: dict[str, Any] = {}
    if args.config is not None:
        loaded = load_yaml(args.config)
        if not isinstance(loaded, dict):
            raise ValueError(f"--config {args.config} must hold a mapping of TrainConfig keys, got {loaded!r}")
        values.update(loaded)
    given = {
        item.name: getattr(args, item.name)
        for item in dataclasses.fields(TrainConfig)
        if item.name != "method_params" and getattr(args, item.name) is not None
    }
    values.update(given)
    if values.get("method") == NONPRIVATE:
        privacy = [f"--{name.replace('_', '-')}" for name in PRIVACY_OPTIONS if name in given]
        if privacy:
            raise ValueError(f"{', '.join(privacy)} has no effect with --method nonprivate (it trains without privacy)")
    if "noise_multiplier" in given and "epsilon" not in given:
        values["epsilon"] = None
    if args.param:
        loaded_params = values.get("method_params", {})
        if not isinstance(loaded_params, dict):
            raise ValueError(f"method_params must be a mapping of the method's parameters, got {loaded_params!r}")
        values["method_params"] = {**loaded_params, **dict(args.param)}
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
    from adaclip.research.train import run

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
