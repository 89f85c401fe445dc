"""ScatterNet features of Fashion-MNIST (Tramèr & Boneh 2021, "Differentially private learning needs
better features (or much more data)", ICLR 2021, arXiv 2011.11660).

Each 28x28 image ``x`` in ``[0, 1]`` goes through a 2-D scattering transform (Oyallon & Mallat 2015;
Bruna & Mallat 2013) with ``J = 2`` scales and ``L = 8`` orientations: the zeroth-order average,
``J L = 16`` first-order and ``L^2 J (J - 1) / 2 = 64`` second-order coefficients, each averaged over
``2^J x 2^J`` windows, give ``81 x 7 x 7 = 3969`` features.  The features are then normalised
per example with GroupNorm in ``groups`` groups of channels (27 in the paper: groups of 3 channels
over the 7x7 positions), without affine parameters.  Both steps are fixed functions of one example
alone (no statistic of the training set enters), so they release nothing and cost no privacy; they
are computed once, here, and the private models train on the result.

The transform is kymatio's (the library the paper used).  ``kymatio.torch`` (0.3.0) imports its 3-D
module, which needs ``scipy.special.sph_harm`` (removed in SciPy 1.15), so this module imports the
2-D torch frontend directly; it does not touch the 3-D code.

``python -m adaclip.research.features --data-dir data/prepared/fashion-mnist --out DIR`` writes
``features.pt`` (train and test features, labels and the settings) atomically.

The same bytes on every x86-64 CPU: torch computes the FFTs of the transform with Intel MKL, which picks its code
path by processor (an AVX-512 path on recent Intel CPUs, another on AMD's), and the paths round differently, so the
features (and every run trained on them) hashed differently from machine to machine.  The command line therefore
runs MKL in its conditional numerical reproducibility mode ``MKL_CBWR=COMPATIBLE`` (one code path on every x86-64
processor) unless ``MKL_CBWR`` is already set; MKL reads the variable at its first call, so it must be set before
any FFT runs in the process.  torch's own kernels (GroupNorm, the modulus, the averaging) gave the same bytes with
its AVX-512 and AVX2 kernels.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from adaclip._validate import require_int
from adaclip.research.data import IDX_PARTS, idx_arrays, locate_idx

FEATURES_FILE = "features.pt"
MKL_REPRODUCIBLE_VARIABLE = "MKL_CBWR"
MKL_REPRODUCIBLE_MODE = "COMPATIBLE"
"""MKL's conditional numerical reproducibility setting: one FFT code path, so the same bytes on every x86-64 CPU."""


def scattering(scales: int = 2, orientations: int = 8, shape: tuple[int, int] = (28, 28)) -> torch.nn.Module:
    """kymatio's 2-D scattering transform (torch frontend) with ``J = scales``, ``L = orientations``."""
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    transform: torch.nn.Module = ScatteringTorch2D(J=scales, shape=shape, L=orientations)
    return transform


def scatter_features(
    images: Tensor, *, scales: int = 2, orientations: int = 8, groups: int = 27, batch_size: int = 1000
) -> Tensor:
    """Group-normalised scattering features ``[n, K, h, w]`` of ``images`` ``[n, 28, 28]`` (values in ``[0, 1]``).

    ``K = 1 + J L + L^2 J (J - 1) / 2`` channels over ``28 / 2^J`` positions; GroupNorm without affine
    parameters (eps 1e-5, as ``torch.nn.GroupNorm``) normalises each example's ``groups`` channel groups.
    """
    require_int("scales", scales)
    require_int("orientations", orientations)
    require_int("groups", groups)
    transform = scattering(scales, orientations, (images.shape[-2], images.shape[-1]))
    channels = 1 + scales * orientations + orientations**2 * scales * (scales - 1) // 2
    if channels % groups:
        raise ValueError(f"groups={groups} must divide the {channels} scattering channels (27 for J = 2, L = 8)")
    parts = []
    with torch.no_grad():
        for start in tqdm(range(0, len(images), batch_size), desc="scattering", leave=False):
            batch = transform(images[start : start + batch_size].float())
            batch = batch.reshape(batch.shape[0], -1, *batch.shape[-2:])  # [n, (C,) K, h, w] -> [n, C K, h, w]
            parts.append(torch.nn.functional.group_norm(batch, groups))
    return torch.cat(parts)


def compute(
    data_dir: str | os.PathLike[str], *, scales: int, orientations: int, groups: int, limit: int = 0
) -> dict[str, object]:
    """Features and labels of the verified Fashion-MNIST IDX files in ``data_dir`` (the official train and test
    sets; only their first ``limit`` images if ``limit > 0``, for quick tests)."""
    arrays = idx_arrays(locate_idx("fashion-mnist", data_dir, download=False).resolve(), "fashion-mnist", True)
    result: dict[str, object] = {
        "scales": scales,
        "orientations": orientations,
        "groups": groups,
        "kymatio": metadata.version("kymatio"),
    }
    for split, (images, labels) in {"train": IDX_PARTS[:2], "test": IDX_PARTS[2:]}.items():
        pixels = torch.from_numpy(arrays[images][: limit or None].astype("float32") / 255)
        result[f"{split}_x"] = scatter_features(pixels, scales=scales, orientations=orientations, groups=groups)
        result[f"{split}_y"] = torch.from_numpy(arrays[labels][: limit or None].astype("int64"))
    return result


def save_atomic(features: dict[str, object], out_dir: str | os.PathLike[str]) -> Path:
    """Write ``features`` to ``out_dir/features.pt`` through a temporary file and a rename.

    The file gets the permissions a plain ``open`` would give (``0o666`` less the umask), not ``mkstemp``'s 0600.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{FEATURES_FILE}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(features, tmp)
        mask = os.umask(0o022)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, out / FEATURES_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out / FEATURES_FILE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adaclip.research.features", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="folder with the four Fashion-MNIST IDX .gz files")
    parser.add_argument("--out", type=Path, required=True, help="folder for features.pt")
    parser.add_argument("--scales", type=int, default=2, help="J (default 2)")
    parser.add_argument("--orientations", type=int, default=8, help="L (default 8)")
    parser.add_argument("--groups", type=int, default=27, help="GroupNorm groups (default 27)")
    parser.add_argument("--limit", type=int, default=0, help="0: every image (default); else the first LIMIT (tests)")
    args = parser.parse_args(argv)
    os.environ.setdefault(MKL_REPRODUCIBLE_VARIABLE, MKL_REPRODUCIBLE_MODE)
    try:
        require_int("--limit", args.limit, minimum=0)
        features = compute(
            args.data_dir, scales=args.scales, orientations=args.orientations, groups=args.groups, limit=args.limit
        )
        path = save_atomic(features, args.out)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    train_x = features["train_x"]
    assert isinstance(train_x, Tensor)
    print(
        f"wrote {path}: {len(train_x)} training and {len(features['test_x'])} test examples "
        f"of {tuple(train_x.shape[1:])}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
