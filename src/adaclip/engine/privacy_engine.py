"""``PrivacyEngine``: the interface of ``opacus.PrivacyEngine``, with adaclip's clipping rules behind it.

Opacus code ports by changing two lines, the import and the engine's construction (which picks the
clipping method; the default, ``"fixed"``, is Opacus's own DP-SGD)::

    from adaclip import PrivacyEngine                   # was: from opacus import PrivacyEngine

    privacy_engine = PrivacyEngine(method="adaclip")    # was: PrivacyEngine()
    model, optimizer, data_loader = privacy_engine.make_private(
        module=model, optimizer=optimizer, data_loader=data_loader, noise_multiplier=1.1, max_grad_norm=1.0
    )
    ...                                                 # the training loop is unchanged
    epsilon = privacy_engine.get_epsilon(delta=1e-5)    # or privacy_engine.accountant.get_epsilon(delta=1e-5)

``make_private`` and ``make_private_with_epsilon`` take Opacus's arguments with Opacus's meaning
(:mod:`adaclip.engine.opacus_arguments`) and hand everything to :func:`adaclip.make_private`; its
own options (``seed``, ``per_example``, ``distributed``, ...) and the rule's parameters go as further
keywords, here or at the engine's construction.  A model wrapped in ``DistributedDataParallel`` or
Opacus's ``DPDDP`` is trained in adaclip's data-parallel mode, as Opacus infers it from the wrapper
(:mod:`adaclip.engine.ddp`).  ``save_checkpoint`` / ``load_checkpoint`` and ``accountant.state_dict()``
have Opacus's signatures and carry the run's whole privacy state (:mod:`adaclip.engine.checkpoint`).
"""

from __future__ import annotations

import functools
import math
import os
from collections import OrderedDict
from typing import IO, Any, BinaryIO, get_args

import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from adaclip._validate import require_one_of
from adaclip.engine.checkpoint import build_checkpoint, restore_checkpoint
from adaclip.engine.opacus_arguments import require_opacus_default
from adaclip.engine.optimizer import AdaptiveClipDPOptimizer
from adaclip.engine.private import make_private
from adaclip.engine.sampling import PoissonDataLoader
from adaclip.methods import method_parameters
from adaclip.privacy.accounting import Accountant, epsilon

_MECHANISMS: dict[str, Accountant] = {name: name for name in get_args(Accountant)}

MadePrivate = (
    tuple[GradSampleModule, AdaptiveClipDPOptimizer, PoissonDataLoader]
    | tuple[GradSampleModule, AdaptiveClipDPOptimizer, nn.Module, PoissonDataLoader]
)
"""What ``make_private`` returns: module, optimizer and loader; with the criterion before the loader for
``grad_sample_mode="ghost"``, as Opacus does."""


class EngineAccountant:
    """The accountant of a :class:`PrivacyEngine`'s run, shaped like an Opacus accountant.

    It reads the steps the engine's optimizer has taken: ``get_epsilon(delta)``, ``mechanism()``,
    ``history`` (``[(noise_multiplier, sample_rate, steps)]``), ``len()``, and ``state_dict()`` /
    ``load_state_dict()`` with Opacus's keys (``history``, ``mechanism``).  The epsilon is the
    optimizer's (:meth:`AdaptiveClipDPOptimizer.get_epsilon`).  A history loaded before the run is made
    private is answered from until then, and becomes the optimizer's step count when it is.
    """

    def __init__(self, mechanism: Accountant) -> None:
        self._mechanism: Accountant = mechanism
        self.optimizer: AdaptiveClipDPOptimizer | None = None
        self._loaded: tuple[float, float, int] | None = None

    def mechanism(self) -> Accountant:
        """``"prv"``, ``"rdp"`` or ``"pld"``."""
        return self._mechanism

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """``[(noise_multiplier, sample_rate, steps)]`` so far (empty before the first step)."""
        optimizer = self.optimizer
        if optimizer is None:
            return [] if self._loaded is None else [self._loaded]
        if optimizer.steps_taken == 0:
            return []
        return [(optimizer.noise_multiplier, optimizer.sample_rate, optimizer.steps_taken)]

    def __len__(self) -> int:
        return len(self.history)

    def get_epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta`` (0 before the first step)."""
        if self.optimizer is not None:
            return self.optimizer.get_epsilon(delta)
        if self._loaded is None:
            return 0.0
        sigma, sample_rate, steps = self._loaded
        return epsilon(
            noise_multiplier=sigma, sample_rate=sample_rate, steps=steps, delta=delta, accountant=self._mechanism
        )

    def state_dict(self, destination: dict[str, Any] | None = None) -> dict[str, Any]:
        """``{"history": ..., "mechanism": ...}`` as Opacus's accountants give it (into ``destination`` if given)."""
        state: dict[str, Any] = OrderedDict() if destination is None else destination
        state["history"] = list(self.history)
        state["mechanism"] = self.mechanism()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (or an Opacus accountant's of the same mechanism).

        The history must be of one noise multiplier and one sample rate, those of this engine's run
        once it is made private: its steps become the optimizer's step count, so that epsilon counts
        them.  ``ValueError`` otherwise, and for a history with fewer steps than the attached optimizer has
        taken: the model has seen those steps, so forgetting them would under-count epsilon (restore an
        earlier model with :meth:`PrivacyEngine.load_checkpoint`, which rewinds model and history together).
        """
        self._load(state_dict, rewind=False)

    def _load(self, state_dict: dict[str, Any], *, rewind: bool) -> None:
        if not isinstance(state_dict, dict) or not {"history", "mechanism"} <= state_dict.keys():
            raise ValueError(
                f"state_dict must hold 'history' and 'mechanism' (an accountant's state_dict()), got {state_dict!r}"
            )
        if state_dict["mechanism"] != self._mechanism:
            raise ValueError(
                f"state_dict is of the {state_dict['mechanism']!r} accountant, this engine's is {self._mechanism!r}"
            )
        settings = {(float(sigma), float(rate)) for sigma, rate, _ in state_dict["history"]}
        if len(settings) > 1:
            raise ValueError(
                f"the history has several (noise_multiplier, sample_rate) settings {sorted(settings)}: a run of "
                "this engine has one; continue it with the settings it was saved with"
            )
        steps = sum(int(count) for _, _, count in state_dict["history"])
        if not rewind and self.optimizer is not None and steps < self.optimizer.steps_taken:
            raise ValueError(
                f"the history counts {steps} steps but the model has taken {self.optimizer.steps_taken}: loading it "
                "would under-count epsilon; use PrivacyEngine.load_checkpoint to rewind the model with its history"
            )
        self._loaded = (*settings.pop(), steps) if settings and steps else None
        if self.optimizer is not None:
            self._apply_loaded(self.optimizer)

    def attach(self, optimizer: AdaptiveClipDPOptimizer) -> None:
        """Account ``optimizer``'s steps (after a loaded history's, which it then continues)."""
        self._apply_loaded(optimizer)
        self.optimizer = optimizer

    def _apply_loaded(self, optimizer: AdaptiveClipDPOptimizer) -> None:
        if self._loaded is None:
            optimizer.steps_taken = 0
            return
        sigma, sample_rate, steps = self._loaded
        here = (optimizer.noise_multiplier, optimizer.sample_rate)
        if not all(math.isclose(a, b, rel_tol=1e-12) for a, b in zip((sigma, sample_rate), here, strict=True)):
            raise ValueError(
                f"the loaded history is of noise_multiplier={sigma!r}, sample_rate={sample_rate!r}; this run's are "
                f"{here[0]!r} and {here[1]!r}: resume with the settings the run was saved with"
            )
        optimizer.steps_taken = steps


class PrivacyEngine:
    """``opacus.PrivacyEngine`` with an adaclip clipping method (see the module docstring).

    Args:
        method: the clipping method (:data:`adaclip.methods.METHODS`); the default, ``"fixed"``, is Opacus's
            DP-SGD, as for :func:`adaclip.make_private`: an adaptive rule runs only when asked for.
        accountant: ``"prv"`` (default, as Opacus), ``"rdp"`` or ``"pld"`` (dp-accounting's privacy loss
            distributions).  Opacus's ``"gdp"`` is refused: its central-limit approximation underestimates
            epsilon under Poisson subsampling.
        secure_mode: only ``False``: noise comes from torch's floating-point PRNG (use ``seed=`` for
            reproducible runs).
        **options: passed to every :func:`adaclip.make_private` call: rule parameters (e.g. ``h2=0.05``)
            and adaclip's options (``seed``, ``per_example``, ...).

    One engine accounts one run: a second ``make_private`` on the same engine is refused.
    """

    def __init__(
        self, *, method: str = "fixed", accountant: str = "prv", secure_mode: bool = False, **options: Any
    ) -> None:
        method_parameters(method)  # an unknown method is named here, with the list
        if accountant == "gdp":
            raise ValueError(
                "accountant='gdp' is not offered: Opacus's GDP accountant (a central-limit approximation) "
                "underestimates epsilon under Poisson subsampling; use 'prv' (default), 'rdp' or 'pld'"
            )
        mechanism = _MECHANISMS[require_one_of("accountant", accountant, _MECHANISMS)]
        require_opacus_default("secure_mode", secure_mode)
        for name in ("method", "accountant", "module", "optimizer", "data_loader"):
            if name in options:
                raise ValueError(f"{name} cannot be an engine option")
        self.method = method
        self.options = options
        self.accountant = EngineAccountant(mechanism)
        self.data_loader: PoissonDataLoader | None = None
        """The private loader of the run (its sampler's state goes into checkpoints)."""

    def make_private(
        self,
        *,
        module: nn.Module,
        optimizer: Optimizer,
        data_loader: DataLoader[Any],
        noise_multiplier: float,
        max_grad_norm: float | list[float] | None = None,
        criterion: nn.Module | None = None,
        batch_first: bool = True,
        loss_reduction: str = "mean",
        poisson_sampling: bool = True,
        clipping: str = "flat",
        grad_sample_mode: str | None = None,
        **kwargs: Any,
    ) -> MadePrivate:
        """Opacus's ``make_private``: the private module, optimizer and Poisson ``DataLoader``.

        ``max_grad_norm`` is the first step's clip bound, under the rule's own name (``None``: the
        rule's default; refused for a method without one, AUTO-S).  ``grad_sample_mode``: ``"hooks"``
        (Opacus's per-example gradients, ``per_example="materialise"``) or ``"ghost"`` (adaclip's
        book-keeping path; the criterion is then returned too, unchanged, as Opacus returns its
        wrapper); ``None`` takes the book-keeping path.  ``clipping``: ``"flat"`` or ``"per_layer"`` (then
        ``max_grad_norm`` may list one bound per trainable parameter, or give one bound split equally;
        :mod:`adaclip.methods.per_layer`).  ``poisson_sampling`` must be ``True``.
        ``kwargs``: rule parameters and :func:`adaclip.make_private`'s options.
        """
        return self._make_private(
            module=module,
            optimizer=optimizer,
            data_loader=data_loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            criterion=criterion,
            batch_first=batch_first,
            loss_reduction=loss_reduction,
            poisson_sampling=poisson_sampling,
            clipping=clipping,
            grad_sample_mode=grad_sample_mode,
            **kwargs,
        )

    def make_private_with_epsilon(
        self,
        *,
        module: nn.Module,
        optimizer: Optimizer,
        data_loader: DataLoader[Any],
        target_epsilon: float,
        target_delta: float,
        epochs: int,
        max_grad_norm: float | list[float] | None = None,
        criterion: nn.Module | None = None,
        batch_first: bool = True,
        loss_reduction: str = "mean",
        poisson_sampling: bool = True,
        clipping: str = "flat",
        grad_sample_mode: str | None = None,
        **kwargs: Any,
    ) -> MadePrivate:
        """:meth:`make_private` with the noise multiplier calibrated to spend ``target_epsilon`` at
        ``target_delta`` over ``epochs`` epochs of ``int(1 / q)`` steps, with the engine's accountant."""
        return self._make_private(
            module=module,
            optimizer=optimizer,
            data_loader=data_loader,
            target_epsilon=target_epsilon,
            target_delta=target_delta,
            epochs=epochs,
            max_grad_norm=max_grad_norm,
            criterion=criterion,
            batch_first=batch_first,
            loss_reduction=loss_reduction,
            poisson_sampling=poisson_sampling,
            clipping=clipping,
            grad_sample_mode=grad_sample_mode,
            **kwargs,
        )

    def _make_private(
        self,
        *,
        max_grad_norm: float | list[float] | None,
        criterion: nn.Module | None,
        batch_first: bool,
        grad_sample_mode: str | None,
        **arguments: Any,
    ) -> MadePrivate:
        if self.accountant.optimizer is not None:
            raise ValueError(
                "this PrivacyEngine already made a run private and accounts it: use a new PrivacyEngine for "
                "another run (the epsilons of runs over the same data add up)"
            )
        given_twice = sorted(self.options.keys() & arguments.keys())
        if given_twice:
            raise ValueError(f"{given_twice} given both to PrivacyEngine(...) and to make_private: give them once")
        if "method" in arguments or "accountant" in arguments:
            raise ValueError("method and accountant are chosen when the engine is built: PrivacyEngine(method=...)")
        opacus: dict[str, Any] = {"batch_first": batch_first}
        if max_grad_norm is not None:
            opacus["max_grad_norm"] = max_grad_norm
        if grad_sample_mode is not None:
            opacus["grad_sample_mode"] = grad_sample_mode
        module, optimizer, loader = make_private(
            method=self.method,
            accountant=self.accountant.mechanism(),
            **self.options,
            **arguments,
            **opacus,
        )
        self.accountant.attach(optimizer)
        self.data_loader = loader
        if grad_sample_mode == "ghost":
            return module, optimizer, nn.CrossEntropyLoss() if criterion is None else criterion, loader
        return module, optimizer, loader

    def get_epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta``, with the engine's accountant (0 before the first step)."""
        return self.accountant.get_epsilon(delta)

    def _refuse_data_parallel(self, what: str) -> None:
        """Checkpoints hold one rank's Poisson sampler: loaded on every rank, all ranks would draw the same pattern
        over their shares and the batch would no longer be Poisson over all N (the accounting's assumption)."""
        optimizer = self.accountant.optimizer
        if optimizer is not None and optimizer.distributed:
            raise ValueError(
                f"{what} is not supported in data-parallel mode (each rank samples its own share of the batch, and "
                "a checkpoint holds one rank's sampler): train to the end, or resume by retraining from the start"
            )

    def save_checkpoint(
        self,
        *,
        path: str | os.PathLike[str] | BinaryIO | IO[bytes],
        module: nn.Module,
        optimizer: Optimizer | None = None,
        noise_scheduler: Any = None,
        grad_clip_scheduler: Any = None,
        checkpoint_dict: dict[str, Any] | None = None,
        module_state_dict_kwargs: dict[str, Any] | None = None,
        torch_save_kwargs: dict[str, Any] | None = None,
    ) -> None:
        """Opacus's ``save_checkpoint``: ``torch.save`` the states of the module, the accountant, the optimizer and
        the schedulers given, and of the engine's Poisson sampler, into ``path``.

        The optimizer's state holds the rule's state, the noise generator and the steps taken
        (:mod:`adaclip.engine.checkpoint`); ``checkpoint_dict`` adds the caller's own entries.  Save at the end
        of an epoch for an exact resume (a warning says when a checkpoint falls within one).
        """
        self._refuse_data_parallel("save_checkpoint")
        checkpoint = build_checkpoint(
            module=module,
            accountant_state=self.accountant.state_dict(),
            optimizer=optimizer,
            loader=self.data_loader,
            noise_scheduler=noise_scheduler,
            grad_clip_scheduler=grad_clip_scheduler,
            checkpoint_dict=checkpoint_dict,
            module_state_dict_kwargs=module_state_dict_kwargs,
        )
        torch.save(checkpoint, path, **(torch_save_kwargs or {}))

    def load_checkpoint(
        self,
        *,
        path: str | os.PathLike[str] | BinaryIO | IO[bytes],
        module: nn.Module,
        optimizer: Optimizer | None = None,
        noise_scheduler: Any = None,
        grad_clip_scheduler: Any = None,
        module_load_dict_kwargs: dict[str, Any] | None = None,
        torch_load_kwargs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Opacus's ``load_checkpoint``: restore :meth:`save_checkpoint`'s file into the objects given and this
        engine's accountant and sampler; return the checkpoint as Opacus does (the module's and the accountant's
        states and the caller's own ``checkpoint_dict`` entries).

        Call it after :meth:`make_private`, with the module and optimizer it returned, as with Opacus; the
        run then continues exactly where it was saved, and epsilon counts the steps before the checkpoint.
        ``torch_load_kwargs`` go to ``torch.load``, which reads with ``weights_only=True`` unless told
        otherwise (Opacus reads with ``False``; adaclip's states need no unpickling).
        """
        if self.accountant.optimizer is None:
            raise ValueError(
                "load_checkpoint restores a run into the objects make_private returns: call make_private first, "
                "then load_checkpoint(path=..., module=model, optimizer=optimizer)"
            )
        self._refuse_data_parallel("load_checkpoint")
        checkpoint = torch.load(path, **{"weights_only": True, **(torch_load_kwargs or {})})
        rest = restore_checkpoint(
            checkpoint,
            module=module,
            load_accountant_state=functools.partial(self.accountant._load, rewind=True),
            optimizer=optimizer,
            loader=self.data_loader,
            noise_scheduler=noise_scheduler,
            grad_clip_scheduler=grad_clip_scheduler,
            module_load_dict_kwargs=module_load_dict_kwargs,
        )
        saved_steps = sum(int(count) for _, _, count in rest["privacy_accountant_state_dict"]["history"])
        if self.accountant.optimizer.steps_taken != saved_steps:
            raise ValueError(
                f"the checkpoint's accountant counts {saved_steps} steps but its optimizer state "
                f"{self.accountant.optimizer.steps_taken}: the file is inconsistent, do not resume from it"
            )
        return rest

    @classmethod
    def get_compatible_module(cls, module: nn.Module) -> nn.Module:
        """``module`` with the layers that mix examples replaced (Opacus's ``ModuleValidator.fix``), validated."""
        fixed: nn.Module = ModuleValidator.fix(module)
        ModuleValidator.validate(fixed, strict=True)
        return fixed

    def is_compatible(self, *, module: nn.Module, optimizer: Optimizer | None, data_loader: Any) -> bool:
        """Whether Opacus's ``ModuleValidator`` accepts ``module`` (the optimizer and loader are not checked)."""
        return bool(ModuleValidator.is_valid(module))

    def validate(self, *, module: nn.Module, optimizer: Optimizer | None, data_loader: Any) -> None:
        """Raise Opacus's ``UnsupportedModuleError`` if ``module`` cannot give per-example gradients."""
        ModuleValidator.validate(module, strict=True)
