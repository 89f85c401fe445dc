"""Models with true per-example gradients (no BatchNorm), as used in the DP-SGD literature."""

from __future__ import annotations

import math

from torch import nn

from adaclip._validate import require_one_of

MODELS = ("logistic", "mlp", "cnn", "scatter_cnn", "linear")


def tanh_cnn(num_classes: int = 10, in_channels: int = 1) -> nn.Sequential:
    """The end-to-end tanh CNN for 28x28 images (Papernot et al. 2021, Table 1; Tramèr & Boneh 2021).

    conv 16@8x8 stride 2 pad 3 -> maxpool 2 stride 1 -> conv 32@4x4 stride 2 -> maxpool 2 stride 1
    -> dense 32 -> dense classes, tanh activations; 26,010 parameters for 10 classes.
    """
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 8, stride=2, padding=3),
        nn.Tanh(),
        nn.MaxPool2d(2, 1),
        nn.Conv2d(16, 32, 4, stride=2),
        nn.Tanh(),
        nn.MaxPool2d(2, 1),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 32),
        nn.Tanh(),
        nn.Linear(32, num_classes),
    )


def scatter_cnn(num_classes: int = 10, in_channels: int = 81) -> nn.Sequential:
    """Tramèr & Boneh 2021's CNN on ScatterNet features of 28x28 images (``[81, 7, 7]``, already group-normalised).

    conv 16@3x3 stride 2 pad 1 -> conv 32@3x3 stride 1 pad 1 -> dense 32 -> dense classes, tanh activations
    (their ``MNIST_CNN`` for scattering inputs); 33,066 parameters for 10 classes.
    """
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Conv2d(16, 32, 3, stride=1, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 32),
        nn.Tanh(),
        nn.Linear(32, num_classes),
    )


def build_model(name: str, input_shape: tuple[int, ...], num_outputs: int, hidden: int = 1000) -> nn.Module:
    """``logistic`` (multinomial logistic regression), ``mlp`` (one hidden ReLU layer of ``hidden``
    units, 784-1000-10 as in Pichapati et al. 2019), ``cnn`` (:func:`tanh_cnn`, 28x28 images only),
    ``scatter_cnn`` (:func:`scatter_cnn`, ScatterNet features only) or ``linear`` (a linear regressor with one
    output)."""
    in_features = math.prod(input_shape)
    if name == "logistic":
        return nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_outputs))
    if name == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_outputs))
    if name == "cnn":
        if tuple(input_shape[-2:]) != (28, 28) or len(input_shape) != 3:
            raise ValueError(
                f"model 'cnn' needs [channels, 28, 28] images, got input shape {input_shape}; use 'logistic' or 'mlp'"
            )
        return tanh_cnn(num_outputs, input_shape[0])
    if name == "scatter_cnn":
        if tuple(input_shape[-2:]) != (7, 7) or len(input_shape) != 3:
            raise ValueError(
                f"model 'scatter_cnn' needs ScatterNet features [81, 7, 7], got input shape {input_shape}; "
                "use dataset fashion-mnist-scatternet"
            )
        return scatter_cnn(num_outputs, input_shape[0])
    if name == "linear":
        return nn.Sequential(nn.Flatten(), nn.Linear(in_features, 1), nn.Flatten(0))
    require_one_of("model", name, MODELS)
    raise AssertionError(f"MODELS lists {name!r} but build_model has no branch for it")
