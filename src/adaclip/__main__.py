"""Command line: ``python -m adaclip train --dataset fashion-mnist --method adaclip --epsilon 3 --out runs/x.json``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from adaclip.accounting import ACCOUNTANTS
from adaclip.data import DATASETS
from adaclip.models import MODELS
from adaclip.train import ALL_METHODS, TrainConfig, run


def _method_param(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--param takes KEY=VALUE, got {text!r}")
    return key, yaml.safe_load(value)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m adaclip", description="Differentially private training with adaptive clipping.")
    commands = top.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train one model and write its metrics record", description="Train one model and write a JSON metrics record. Options left out take the dataset's defaults; --config values are overridden by options given here.")
    train.add_argument("--config", type=Path, help="YAML file of TrainConfig keys (dataset, method, epsilon, ...)")
    train.add_argument("--dataset", choices=DATASETS)
    train.add_argument("--method", choices=ALL_METHODS, help="clipping method (default adaclip)")
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
    train.add_argument("--data-dir", help="folder with the IDX .gz files (image datasets)")
    train.add_argument("--device", help="cpu (default) or cuda")
    train.add_argument("--param", type=_method_param, action="append", default=[], metavar="KEY=VALUE", help="method parameter, e.g. --param initial_clip=0.5 (repeatable)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar (or set TQDM_DISABLE=1)")
    train.add_argument("--out", type=Path, help="write the JSON record here (atomically)")
    return top


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if args.config is not None:
        loaded = yaml.safe_load(args.config.read_text())
        if not isinstance(loaded, dict):
            raise ValueError(f"--config {args.config} must hold a mapping of TrainConfig keys")
        values.update(loaded)
    options = ("dataset", "method", "model", "epsilon", "noise_multiplier", "delta", "accountant", "epochs", "batch_size", "lr", "momentum", "seed", "train_size", "data_dir", "device")
    values.update({name: getattr(args, name) for name in options if getattr(args, name) is not None})
    if args.noise_multiplier is not None and args.epsilon is None:
        values["epsilon"] = None
    if args.param:
        values["method_params"] = {**values.get("method_params", {}), **dict(args.param)}
    if args.no_progress:
        values["progress"] = False
    return values


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        record = run(TrainConfig.from_dict(config_from_args(args)), out=args.out)
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    metric = "test_accuracy" if "test_accuracy" in record else "test_mse"
    privacy = "non-private" if record["epsilon"] is None else f"epsilon={record['epsilon']:.3f} delta={record['delta']:.2g} ({record['accountant']})"
    print(f"{record['method']} on {record['dataset']}: {metric}={record[metric]:.4f}, {privacy}, {record['wall_time_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
