"""Checkpoints of a private run in the layout of Opacus's ``PrivacyEngine.save_checkpoint``.

A checkpoint is one ``torch.save`` of a dict with Opacus's keys, ``module_state_dict``,
``privacy_accountant_state_dict`` (``{"history": [(sigma, q, steps)], "mechanism": ...}``),
``optimizer_state_dict``, ``noise_scheduler_state_dict`` and ``grad_clip_scheduler_state_dict``, and
one of adaclip's own, ``sampling_state_dict``.  Together they hold the whole privacy state of the run:

* the steps taken, in the accountant's history and in the optimizer's state, so epsilon after a
  resume counts every step (the two must agree when both are loaded);
* the clipping rule's state (AdaCliP's ``a``, ``v``, ``b``; quantile clipping's ``C_t``; ...), the noise
  generator's state and the privacy setting, in the optimizer's state
  (:meth:`adaclip.engine.optimizer.AdaptiveClipDPOptimizer.state_dict`, which refuses a checkpoint of
  another setting);
* the Poisson sampler's generator (:func:`adaclip.engine.sampling.loader_state_dict`).

With a ``seed`` at ``make_private``, a run saved at the end of an epoch and resumed from the checkpoint
takes exactly the steps of the uninterrupted run.  An epoch's batches are drawn when its iteration
starts, so a checkpoint taken within an epoch resumes with a freshly sampled epoch (a warning says
so): still Poisson batches at rate ``q``, so the accounting holds, but not the same batches.

Everything adaclip saves is tensors and plain values, so the checkpoint loads with
``torch.load(..., weights_only=True)``, the default here (Opacus loads with ``weights_only=False``,
which unpickles arbitrary objects; pass ``torch_load_kwargs={"weights_only": False}`` for a
``checkpoint_dict`` holding other objects, from a trusted file only).
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn
from torch.utils.data import DataLoader

from adaclip.engine.optimizer import AdaptiveClipDPOptimizer
from adaclip.engine.sampling import load_loader_state_dict, loader_state_dict

SAMPLING_KEY = "sampling_state_dict"
"""adaclip's key for the Poisson sampler's state (Opacus's loaders have none to save)."""


def build_checkpoint(
    *,
    module: nn.Module,
    accountant_state: dict[str, Any],
    optimizer: Any = None,
    loader: DataLoader[Any] | None = None,
    noise_scheduler: Any = None,
    grad_clip_scheduler: Any = None,
    checkpoint_dict: dict[str, Any] | None = None,
    module_state_dict_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The dict ``save_checkpoint`` writes: ``checkpoint_dict`` (the caller's own entries) with the run's states.

    Warns when ``optimizer`` has taken a number of steps that is not a whole number of ``loader``'s
    epochs (see the module docstring).
    """
    checkpoint = {} if checkpoint_dict is None else checkpoint_dict
    checkpoint["module_state_dict"] = module.state_dict(**(module_state_dict_kwargs or {}))
    checkpoint["privacy_accountant_state_dict"] = accountant_state
    if optimizer is not None:
        checkpoint["optimizer_state_dict"] = optimizer.state_dict()
    if noise_scheduler is not None:
        checkpoint["noise_scheduler_state_dict"] = noise_scheduler.state_dict()
    if grad_clip_scheduler is not None:
        checkpoint["grad_clip_scheduler_state_dict"] = grad_clip_scheduler.state_dict()
    if loader is not None:
        checkpoint[SAMPLING_KEY] = loader_state_dict(loader)
        if isinstance(optimizer, AdaptiveClipDPOptimizer) and optimizer.steps_taken % len(loader):
            warnings.warn(
                f"checkpoint saved after {optimizer.steps_taken} steps, within an epoch of {len(loader)}: a resumed "
                "run samples a fresh epoch (still Poisson at rate q; for an exact resume, save at the end of an epoch)",
                stacklevel=3,
            )
    return checkpoint


def restore_checkpoint(
    checkpoint: dict[str, Any],
    *,
    module: nn.Module,
    load_accountant_state: Any,
    optimizer: Any = None,
    loader: DataLoader[Any] | None = None,
    noise_scheduler: Any = None,
    grad_clip_scheduler: Any = None,
    module_load_dict_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Load ``checkpoint``'s states into the given objects, as ``load_checkpoint`` does; return what is left.

    ``load_accountant_state`` is the accountant's ``load_state_dict``.  As Opacus's ``load_checkpoint``, it
    returns the checkpoint without the optimizer's and the schedulers' states (and the sampler's): the
    module's and the accountant's states and the caller's own ``checkpoint_dict`` entries.  Warns, as Opacus
    does, when the checkpoint has an optimizer state but no optimizer is given, or the other way round.
    """
    if optimizer is None and checkpoint.get("optimizer_state_dict"):  # checked before anything is restored
        raise ValueError(
            "the checkpoint holds the optimizer's state (the rule's state, the noise generator and the steps "
            "taken): pass optimizer=... to load_checkpoint, or a resumed run would draw again the noise it has "
            "already released"
        )
    module.load_state_dict(checkpoint["module_state_dict"], **(module_load_dict_kwargs or {}))
    load_accountant_state(checkpoint["privacy_accountant_state_dict"])
    optimizer_state = checkpoint.pop("optimizer_state_dict", None)
    clip_scheduler_state = checkpoint.pop("grad_clip_scheduler_state_dict", None)
    if optimizer is not None and optimizer_state:
        if grad_clip_scheduler is not None and isinstance(optimizer, AdaptiveClipDPOptimizer):
            # a clip scheduler moved clip_norm (the noise follows it; sigma, which the accounting uses, did not)
            saved_clip = optimizer_state["privacy"]["setting"]["hyperparameters"].get("clip_norm")
            if saved_clip is not None and hasattr(optimizer.rule, "clip_norm"):
                optimizer.max_grad_norm = saved_clip
        optimizer.load_state_dict(optimizer_state)
    elif optimizer is not None and not optimizer_state:
        warnings.warn(
            "the checkpoint has no optimizer state: the optimizer given starts its rule's state and noise afresh",
            stacklevel=3,
        )
    noise_scheduler_state = checkpoint.pop("noise_scheduler_state_dict", None)
    if noise_scheduler is not None and noise_scheduler_state:
        noise_scheduler.load_state_dict(noise_scheduler_state)
    if grad_clip_scheduler is not None and clip_scheduler_state:
        grad_clip_scheduler.load_state_dict(clip_scheduler_state)
    sampling_state = checkpoint.pop(SAMPLING_KEY, None)
    if loader is not None and sampling_state is not None:
        load_loader_state_dict(loader, sampling_state)
    return checkpoint
