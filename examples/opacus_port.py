"""Opacus's MNIST example, ported to adaclip, with checkpoints that resume a run exactly.

The port changes two lines of an Opacus script: the import (``from adaclip import PrivacyEngine``) and the
engine's construction, which picks the clipping method (``"fixed"``, the default, is Opacus's DP-SGD).
The model, the training loop, ``save_checkpoint`` / ``load_checkpoint`` and ``get_epsilon`` are Opacus's.

The data are MNIST-shaped synthetic images (labels from a random linear teacher), so the script runs
anywhere in seconds.  Each epoch ends with a checkpoint; rerun with more ``--epochs`` and the same
``--checkpoint`` and it resumes where it stopped, to the same parameters and epsilon as a run that was
never interrupted (the last line prints both)::

    python examples/opacus_port.py --epochs 1 --checkpoint run.pt   # stops after one epoch
    python examples/opacus_port.py --epochs 2 --checkpoint run.pt   # resumes: epoch 2 only
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adaclip import PrivacyEngine  # was: from opacus import PrivacyEngine


class SampleConvNet(nn.Module):
    """The convolutional network of Opacus's MNIST example."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 8, 2, padding=3)
        self.conv2 = nn.Conv2d(16, 32, 4, 2)
        self.fc1 = nn.Linear(32 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2, 1)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2, 1)
        return self.fc2(F.relu(self.fc1(x.view(-1, 32 * 4 * 4))))


def synthetic_mnist(examples: int, seed: int = 0) -> TensorDataset:
    """``examples`` images of shape ``[1, 28, 28]`` with ten classes given by a random linear teacher."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(examples, 1, 28, 28, generator=generator)
    teacher = torch.randn(28 * 28, 10, generator=generator)
    return TensorDataset(images, (images.view(examples, -1) @ teacher).argmax(dim=1))


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader) -> float:
    """One epoch of Opacus's training loop; the mean loss."""
    model.train()
    losses = []
    for images, labels in loader:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return sum(losses) / max(len(losses), 1)


def fingerprint(model: nn.Module) -> str:
    """A short digest of the parameters' bytes: equal digests, equal parameters."""
    digest = hashlib.sha256()
    for parameter in model.parameters():
        digest.update(parameter.detach().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2, help="epochs in all, those of a resumed checkpoint included")
    parser.add_argument("--checkpoint", type=Path, default=Path("opacus_port.pt"), help="saved after every epoch")
    parser.add_argument("--method", default="fixed", help="clipping method: fixed (DP-SGD), adaclip, quantile, ...")
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--sigma", type=float, default=1.0, help="noise multiplier")
    parser.add_argument("--max-per-sample-grad-norm", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0, help="fixes the sampling and the noise (exact resumes)")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    model = SampleConvNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    train_loader = DataLoader(synthetic_mnist(args.examples), batch_size=args.batch_size)

    privacy_engine = PrivacyEngine(method=args.method, seed=args.seed)  # was: PrivacyEngine()
    model, optimizer, train_loader = privacy_engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=train_loader,
        noise_multiplier=args.sigma,
        max_grad_norm=args.max_per_sample_grad_norm,
    )

    first_epoch = 1
    if args.checkpoint.exists():
        saved = privacy_engine.load_checkpoint(path=args.checkpoint, module=model, optimizer=optimizer)
        first_epoch = saved["epoch"] + 1
        print(f"resumed after epoch {saved['epoch']} from {args.checkpoint}")
    for epoch in range(first_epoch, args.epochs + 1):
        loss = train_epoch(model, optimizer, train_loader)
        epsilon = privacy_engine.get_epsilon(delta=args.delta)
        print(f"epoch {epoch}: loss {loss:.4f}, epsilon {epsilon:.4f} at delta {args.delta:g}")
        privacy_engine.save_checkpoint(
            path=args.checkpoint, module=model, optimizer=optimizer, checkpoint_dict={"epoch": epoch}
        )
    epsilon = privacy_engine.get_epsilon(delta=args.delta)
    print(f"final: epochs {args.epochs}, epsilon {epsilon:.6f}, parameters {fingerprint(model)}")


if __name__ == "__main__":
    main()
