"""An Opacus ``DPOptimizer`` whose clipping and noise come from a :mod:`adaclip.methods.base` rule.

The module (an Opacus ``GradSampleModule``, or :class:`adaclip.engine.bookkeeping.BookkeepingGradSampleModule`)
leaves per-example gradient information on the parameters after backward: ``p.grad_sample``, or,
for book-keeping linear layers, the layer's inputs and output gradients.  At each ``step`` this
optimizer takes the step's standard-normal noise, one call to its seeded generator (drawn ahead, while
the caller ran the forward and backward pass: :mod:`adaclip.engine.noise`), and either

* ``per_example="fast"`` (default), for rules with the norm interface
  (:func:`adaclip.methods.base.supports_norm_path`): computes the per-example (transformed) norms and
  the rule's weighted sum ``sum_i c_i g_i`` part by part (:mod:`adaclip.engine.per_example`), never the
  ``[n, d]`` matrix; or
* ``per_example="materialise"`` (and for every rule without the norm interface): flattens the
  per-example gradients into one ``[n, d]`` matrix and hands it to ``rule.clipped_sum``.

Both give the rule's :class:`~adaclip.methods.base.ClippedSum` (the same up to float rounding).  With
``distributed=True`` it is all-reduced over the ranks (:mod:`adaclip.engine.distributed`).  The rule's
``release`` then adds the noise once and updates its state; the optimizer writes the released
noisy mean gradient into ``p.grad`` and lets the wrapped optimizer update the parameters; it counts
the steps it has taken and reports the accountant's epsilon for them.

Non-finite per-example gradients follow ``nonfinite``: ``"drop"`` (default) gives such an example
weight 0 on both paths and counts it in ``last_stats["nonfinite_dropped"]`` (see
:mod:`adaclip.methods.base`: the sensitivity and the accounting are unchanged); ``"raise"`` stops with a
:class:`~adaclip.methods.base.NonFiniteGradientError` before anything is released.  Whatever the policy,
a release or a new rule state that is not finite (a custom rule that ignores the policy) raises
``FloatingPointError`` before it reaches the parameters.

**Checkpoints.**  :meth:`~AdaptiveClipDPOptimizer.state_dict` holds, besides the wrapped optimizer's state,
everything the privacy of a resumed run depends on: the steps taken (so that :meth:`get_epsilon` after
:meth:`~AdaptiveClipDPOptimizer.load_state_dict` reports the *total* epsilon), the rule state, the noise
generator's state and the privacy setting (sigma, ``q``, accountant, rule and hyperparameters), which a
load checks against its own.  The loader's sampling generator is saved with
:func:`adaclip.engine.sampling.loader_state_dict`.  Everything is tensors and plain values, so
``torch.load(..., weights_only=True)`` reads it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import torch
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from adaclip._validate import require_one_of, require_positive
from adaclip.engine.bookkeeping import layer_capture
from adaclip.engine.distributed import (
    all_reduce_clipped_sum,
    assert_replicas_equal,
    check_same_noise,
    is_initialized,
    state_tensors,
)
from adaclip.engine.noise import NoiseDraws
from adaclip.engine.per_example import (
    Part,
    Transform,
    collect_parts,
    materialise,
    per_example_norms,
    per_layer_clipped_sum,
    subspace_norms,
    weighted_sum,
    zero_examples,
)
from adaclip.methods import METHODS, PerLayerClip, clip_bound, method_parameters
from adaclip.methods.base import (
    ClippedSum,
    ClipRule,
    NonFiniteGradientError,
    Stats,
    drop_nonfinite,
    release_counted,
    supports_norm_path,
)
from adaclip.privacy.accounting import Accountant, Spent, account

PerExample = Literal["fast", "materialise"]
PER_EXAMPLE_PATHS: tuple[PerExample, ...] = ("fast", "materialise")
NonFinite = Literal["drop", "raise"]
NONFINITE_POLICIES: tuple[NonFinite, ...] = ("drop", "raise")


def check_step_options(*, per_example: object, nonfinite: object, distributed: object, check_replicas: object) -> None:
    """The options :class:`AdaptiveClipDPOptimizer` and :func:`~adaclip.engine.private.make_private` share."""
    require_one_of("per_example", per_example, PER_EXAMPLE_PATHS)
    require_one_of("nonfinite", nonfinite, NONFINITE_POLICIES)
    if distributed and not is_initialized():
        raise ValueError(
            "distributed=True needs an initialised torch.distributed process group: launch with torchrun and call "
            "torch.distributed.init_process_group (or adaclip.engine.distributed.init_from_environment) first"
        )
    if check_replicas and not distributed:
        raise ValueError("check_replicas=True compares ranks and needs distributed=True")


class AdaptiveClipDPOptimizer(DPOptimizer):
    """DP optimizer driven by a :class:`~adaclip.methods.base.ClipRule`.

    Args:
        optimizer: the wrapped optimizer (e.g. ``torch.optim.SGD``) over a ``GradSampleModule``'s parameters.
        rule: the clipping rule; its ``noise_multiplier`` is the total sigma the accountant sees.
        sample_rate: the Poisson sampling rate ``q = B / N`` of the data loader.
        accountant: ``"prv"``, ``"pld"`` or ``"rdp"`` (see :mod:`adaclip.privacy.accounting`).
        delta: default delta for :meth:`get_epsilon`.
        generator: ``torch.Generator`` on the parameters' device for the noise (``None``: torch's global RNG).
        loss_reduction: ``"mean"`` (``p.grad`` is the noisy mean gradient) or ``"sum"`` (``B`` times it).
        per_example: ``"fast"`` (norms and weighted sums, where the rule allows) or ``"materialise"``
            (the ``[n, d]`` matrix and ``rule.clipped_sum``); see the module docstring.
        distributed: all-reduce each step's clipped sum over the default ``torch.distributed`` process
            group before the release; every rank must then pass a ``generator`` seeded identically
            (``make_private(..., distributed=True)`` arranges this and the sharded sampling).
        check_replicas: debug mode for ``distributed``: after every release, assert that the new rule
            state, the released gradient and the parameters the step started from are bitwise equal
            on every rank (:class:`adaclip.engine.distributed.ReplicaDivergence` otherwise); one broadcast
            per tensor.  Whether the ranks draw the same noise is checked once, always, at construction.
        nonfinite: ``"drop"`` (default) or ``"raise"``: what happens to an example whose per-example gradient
            is not finite (see the module docstring).
        draw_noise_ahead: draw the next step's noise in a worker thread once a step has released (CPU generators
            only; the same numbers as drawing at each step, :class:`adaclip.engine.noise.NoiseDraws`).

    A step releases one *logical* (Poisson) batch.  Its examples may arrive in pieces: clipped sums
    are sums over examples, so the optimizer adds up the pieces' clipped sums and releases once,
    with the noise and the normaliser ``B`` of the whole batch; the result equals that of one big
    batch.  Pieces are physical batches of Opacus's ``BatchMemoryManager`` (virtual steps: each
    but the last ``step()`` only accumulates) or several backward passes before one ``step()``
    (each earlier pass is accumulated when the next forward pass starts, see :meth:`attach_module`).
    Either way only the running sum, one ``[d]`` vector, is carried between pieces.  All pieces
    must come from one batch of the private loader: :meth:`begin_logical_batch` refuses a new batch
    while an earlier one is pending.

    ``noise_multiplier`` is the rule's and read-only (Opacus's noise schedulers raise).
    ``max_grad_norm`` is the clip bound in force for the next step (see the property); Opacus's clip
    schedulers set it for the rules with a fixed ``clip_norm`` and raise for the others.  Noise comes
    from torch's PRNG in floating point; Opacus's ``secure_mode`` (defence against floating-point
    attacks, Mironov 2012) is not offered.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        rule: ClipRule,
        sample_rate: float,
        accountant: Accountant = "prv",
        delta: float | None = None,
        generator: torch.Generator | None = None,
        loss_reduction: str = "mean",
        per_example: PerExample = "fast",
        distributed: bool = False,
        check_replicas: bool = False,
        nonfinite: NonFinite = "drop",
        draw_noise_ahead: bool = True,
    ) -> None:
        if distributed and generator is None:
            raise ValueError(
                "distributed=True needs a noise generator seeded identically on every rank (generator=...), so that "
                "the noise enters the global sum once; make_private(..., distributed=True) sets one up"
            )
        check_step_options(
            per_example=per_example, nonfinite=nonfinite, distributed=distributed, check_replicas=check_replicas
        )
        super().__init__(
            optimizer,
            noise_multiplier=rule.noise_multiplier,
            max_grad_norm=clip_bound(rule),
            expected_batch_size=rule.expected_batch_size,
            loss_reduction=loss_reduction,
            generator=generator,
        )
        self.rule = rule
        self.nonfinite: NonFinite = nonfinite
        self.per_example: PerExample = per_example
        self.distributed = distributed
        self.check_replicas = check_replicas
        if distributed and self.params:
            reference = self.params[0]
            dim = sum(p.numel() for p in self.params)
            check_same_noise(generator, rule.noise_size(dim), reference.dtype, reference.device)  # type: ignore[arg-type]
        self.uses_norm_path = per_example == "fast" and supports_norm_path(rule)
        self.sample_rate = sample_rate
        self.accountant = accountant
        self.delta = delta
        self.steps_taken = 0
        self.rule_state: Any = None
        self.last_stats: Stats = {}
        self.last_clipped: ClippedSum | None = None
        """The last step's clipped sum (the rule's data-dependent input), for diagnostics such as the
        noise-free release ``rule.release(last_clipped, previous_state, zeros)``; never released itself."""
        self.accounting: Spent | None = None
        """What the last :meth:`get_epsilon` computed, with the accountant that answered (RDP if it fell back)."""
        self._accounted_for: tuple[int, float] | None = None
        self._accumulated: ClippedSum | None = None
        """The running clipped sum of the logical batch's earlier pieces (virtual steps, earlier passes)."""
        self._module_hook: RemovableHandle | None = None
        self.noise_draws = NoiseDraws(ahead=draw_noise_ahead)
        self._initialised = True

    def pre_step(self, closure: Any = None) -> bool:
        """Clip, noise and average the per-example gradients with the rule; write them into ``p.grad``.

        After ``signal_skip_step(True)`` (as ``BatchMemoryManager`` sends for every physical batch but
        a logical batch's last) it only adds this batch's clipped sum to the logical batch's and returns
        ``False``: no release, no parameter update (see the class docstring).

        Runs with autocast disabled: called inside a ``torch.autocast`` block, the norms and sums that
        the sensitivity bound rests on would otherwise be computed in reduced precision.
        """
        params = self.params
        if len(params) == 0:
            return True
        reference = params[0]
        if self.generator is not None and self.generator.device.type != reference.device.type:
            raise ValueError(
                f"the noise generator is on {self.generator.device} but the parameters are on {reference.device}: "
                "move the model to its device before make_private"
            )
        skip = bool(self._check_skip_next_step())
        with torch.autocast(reference.device.type, enabled=False):
            if skip:  # a virtual step: this physical batch is one piece of the logical batch (no release)
                self._accumulate_pass(params, reference)
            else:
                self._private_step(params, reference)
        self._is_last_step_skipped = skip
        return not skip

    def _private_step(self, params: list[nn.Parameter], reference: torch.Tensor) -> None:
        clipped = self._pass_sum(params, reference)
        if self._accumulated is not None:  # earlier pieces of this logical batch
            clipped, self._accumulated = _add(self._accumulated, clipped), None
        dim = clipped.vector.numel()
        noise_size = self.rule.noise_size(dim)
        noise = self.noise_draws.draw(self.generator, noise_size, reference.dtype, reference.device)
        if self.distributed:
            clipped = all_reduce_clipped_sum(clipped)
        if self.nonfinite == "raise" and clipped.nonfinite_dropped:
            raise NonFiniteGradientError(
                f"{clipped.nonfinite_dropped:.0f} example(s) of the batch at step {self.steps_taken + 1} have a "
                "non-finite per-example gradient (NaN or inf) and nonfinite='raise': check the data and the loss, "
                "or use nonfinite='drop' to drop such examples (counted in the step statistics)"
            )
        self.last_clipped = clipped
        noisy_mean, new_state, stats = release_counted(self.rule, clipped, self.rule_state, noise)
        self._check_finite(noisy_mean, new_state)
        self.rule_state, self.last_stats = new_state, stats
        if self.check_replicas:
            parameters = {f"parameter {i}": p for i, p in enumerate(params)}
            assert_replicas_equal(
                {"released gradient": noisy_mean, **state_tensors(self.rule_state), **parameters}, reference.device
            )
        if self.loss_reduction == "sum":
            noisy_mean = noisy_mean * self.expected_batch_size
        for p, flat in zip(params, torch.split(noisy_mean, [p.numel() for p in params]), strict=True):
            p.grad = flat.view_as(p)
        self.steps_taken += 1
        self.noise_draws.draw_next(self.generator, noise_size, reference.dtype, reference.device)
        if self.step_hook:
            self.step_hook(self)
        self._clear_per_example()  # released: these examples must not enter another release

    def _norm_path_sum(self, parts: list[Part], dim: int) -> ClippedSum:
        """The rule's clipped sum from per-example (transformed) norms and ``sum_i c_i g_i``, without ``[n, d]``.

        Non-finite examples get weight 0 and their data is zeroed before the weighted sum.  Per-layer
        clipping takes the norms and weights of each layer (:func:`per_layer_clipped_sum`).
        """
        if isinstance(self.rule, PerLayerClip):
            return per_layer_clipped_sum(self.rule, parts, self.rule_state, dim)
        subspace = self.rule.subspace_norm(self.rule_state)
        if subspace is not None:
            norms = subspace_norms(parts, subspace)
        else:
            shift_scale = self.rule.norm_transform(self.rule_state)
            norms = per_example_norms(parts, None if shift_scale is None else Transform.of(*shift_scale))
        weights, dropped = drop_nonfinite(norms, self.rule.example_weights(norms, self.rule_state))
        if dropped is not None:
            zero_examples(parts, dropped)
        return self.rule.clipped_sum_from_weights(weighted_sum(parts, weights, dim), weights, self.rule_state, dropped)

    def _check_finite(self, released: torch.Tensor, state: Any) -> None:
        """Refuse a non-finite release or state before it reaches the parameters (one host synchronisation).

        A sum with a NaN or infinite term is not finite, so finite sums clear every tensor at the cost of one
        pass; only a non-finite sum (a non-finite entry, or a sum that overflows) is checked entry by entry.
        """
        named = {"the released gradient": released, **{f"state.{k}": v for k, v in state_tensors(state).items()}}
        sums = [t.sum().to(released.device, torch.float64) for t in named.values()]
        if math.isfinite(float(sums[0] if len(sums) == 1 else torch.stack(sums).sum())):
            return
        bad = [name for name, t in named.items() if not bool(torch.isfinite(t).all())]
        if bad:
            raise FloatingPointError(
                f"{type(self.rule).__name__} produced a non-finite {', '.join(bad)} at step {self.steps_taken + 1}; "
                "nothing was applied. Every rule in adaclip.methods drops non-finite examples; a custom rule "
                "must too (adaclip.methods.base.drop_nonfinite), and sigma and the clip scale must be finite"
            )

    # --- pieces of a logical batch, Opacus interoperation ---------------------------------------------

    def _pass_sum(self, params: list[nn.Parameter], reference: torch.Tensor) -> ClippedSum:
        """The clipped sum of the pending backward pass, with the rule's current state (initialised on first use)."""
        pending = max(_pending_passes(p) for p in params)
        if pending > 1:
            raise RuntimeError(
                f"per-example gradients of {pending} backward passes are pending: call optimizer.zero_grad() after "
                "every optimizer.step(); for several backward passes per step (pieces of one batch) call "
                "optimizer.attach_module(module) (make_private does)"
            )
        parts = collect_parts(params)
        dim = sum(p.numel() for p in params)
        if self.rule_state is None:
            self.rule_state = self.rule.init_state(dim, device=reference.device, dtype=reference.dtype)
        if self.uses_norm_path:
            return self._norm_path_sum(parts, dim)
        return self.rule.clipped_sum(materialise(parts), self.rule_state)

    def _accumulate_pass(self, params: list[nn.Parameter], reference: torch.Tensor) -> None:
        """Add the pending pass's clipped sum to the logical batch's running sum and drop its per-example gradients."""
        clipped = self._pass_sum(params, reference)
        self._accumulated = clipped if self._accumulated is None else _add(self._accumulated, clipped)
        self._clear_per_example()

    def _clear_per_example(self) -> None:
        for p in self.params:
            p.grad_sample = None
            capture = layer_capture(p)
            if capture is not None:
                capture.reset()

    def _has_pending(self) -> bool:
        """Whether per-example gradients or a running clipped sum wait for a release."""
        return self._accumulated is not None or any(_pending_passes(p) > 0 for p in self.params)

    def attach_module(self, module: nn.Module) -> None:
        """Allow several backward passes per ``step()``, as pieces of one logical batch (``make_private`` calls this).

        Registers a forward pre-hook on ``module``: when a forward pass starts while the per-example
        gradients of a finished backward pass are pending, they are clipped (with the rule's current
        state) and added to the logical batch's running sum, and dropped; so memory stays bounded by
        one piece.  ``step()`` adds the last pass and releases the whole batch once.
        """
        if self._module_hook is not None:
            self._module_hook.remove()
        self._module_hook = module.register_forward_pre_hook(self._before_forward)

    def _before_forward(self, module: nn.Module, inputs: Any) -> None:
        params = self.params
        if params and any(_pending_passes(p) > 0 for p in params):
            reference = params[0]
            with torch.no_grad(), torch.autocast(reference.device.type, enabled=False):
                self._accumulate_pass(params, reference)

    def begin_logical_batch(self) -> None:
        """Refuse a new batch of the private loader while an earlier batch waits for its release.

        The private loader calls this before handing out each batch (with ``num_workers=0``, when
        ``make_private`` built it; with worker processes the sampler runs ahead and the check is off).
        Gradients of two batches in one release would be accounted as one Poisson batch.
        """
        if self._has_pending():
            raise RuntimeError(
                "the private loader is handing out a new batch while per-example gradients of the previous one "
                "are pending: call optimizer.step() once per batch (optimizer.zero_grad() drops a batch); a step "
                "releases and accounts one Poisson batch. To split a batch for memory, run backward on its pieces "
                "before one step, or use opacus.utils.batch_memory_manager.BatchMemoryManager"
            )

    @property
    def accumulated_iterations(self) -> int:
        """Backward passes whose per-example gradients are pending, as Opacus counts them (0 when none).

        Opacus's accountant hook (``accountant.get_optimizer_hook_fn``) multiplies the sampling rate by
        it.  At each release it is 1: earlier pieces of the batch were already clipped into the running
        sum, and all pieces make up one Poisson batch of rate ``q``.
        """
        counts = {_pending_passes(p) for p in self.params} - {0}
        if len(counts) > 1:
            raise ValueError(f"parameters have per-example gradients of different numbers of passes {sorted(counts)}")
        return counts.pop() if counts else 0

    @property
    def noise_multiplier(self) -> float:
        """The rule's noise multiplier: the total sigma the accountant counts, fixed for the run.

        Read-only: assigning it (as ``opacus.schedulers`` noise schedulers do) raises ``ValueError``,
        because neither the rule's noise nor the accounting would follow.
        """
        return float(self.rule.noise_multiplier)

    @noise_multiplier.setter
    def noise_multiplier(self, value: float) -> None:
        if not getattr(self, "_initialised", False):
            return  # DPOptimizer.__init__ assigns it; the rule holds it
        raise ValueError(
            "noise_multiplier is fixed for the run (the rule's sigma, which the accountant counts): noise schedulers "
            "are not supported; choose it with make_private(noise_multiplier=...) or target_epsilon="
        )

    @property
    def max_grad_norm(self) -> float:
        """The clip bound in force for the next step.

        The rule's ``clip_norm`` where it has a fixed one (DP-SGD, DP-PSAC, DP-AdamBC); the current scalar
        bound of a rule that adapts one by a private quantile (quantile clipping's ``C_t``, the global scale
        of AdaCliP's quantile-scale estimator; ``initial_clip`` before the first step); ``initial_clip``,
        the first step's bound only, for the other AdaCliP estimators, GeoClip and DP-MacAdam (they clip
        ``(g - a) / b`` to norm 1 with per-coordinate ``b``); 1 for AUTO-S (every normalised gradient has
        norm below 1).  The bound each step used is in
        ``last_stats["clip_norm"]`` for the rules with a scalar one.

        Assigning it (as ``opacus.schedulers`` clip schedulers do) sets ``clip_norm`` for the rules that
        have one (the noise follows: ``sigma * clip_norm``) and raises ``ValueError`` for the others.
        """
        state_bound = getattr(self.rule_state, "clip_norm", None)
        if state_bound is not None:
            return float(state_bound)
        return clip_bound(self.rule)

    @max_grad_norm.setter
    def max_grad_norm(self, value: float) -> None:
        if not getattr(self, "_initialised", False):
            return  # DPOptimizer.__init__ assigns it; the rule holds it
        if not hasattr(self.rule, "clip_norm"):
            fixed = [name for name in METHODS if "clip_norm" in method_parameters(name)]
            raise ValueError(
                f"max_grad_norm cannot be set for {type(self.rule).__name__}, which has no fixed clip_norm: clip "
                f"schedulers work with the methods {fixed}"
            )
        self.rule.clip_norm = require_positive("max_grad_norm", value)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear ``p.grad`` (to ``None`` by default, as ``torch.optim`` does), ``p.grad_sample``,
        ``p.summed_grad`` and the book-keeping captures; and the logical batch's running clipped sum
        unless the last step was a virtual one (as Opacus keeps ``p.summed_grad`` then)."""
        if not self._is_last_step_skipped:
            self._accumulated = None
        for p in self.params:
            p.grad_sample = None
            p.summed_grad = None
            capture = layer_capture(p)
            if capture is not None:
                capture.reset()
        self.original_optimizer.zero_grad(set_to_none)

    def get_epsilon(self, delta: float | None = None) -> float:
        """Epsilon spent by the steps taken so far, at ``delta`` (default: the one given at construction).

        After :meth:`load_state_dict` the steps include those taken before the checkpoint.  An
        accountant call costs milliseconds to seconds, so call this once per epoch, not per step;
        repeated calls for the same number of steps and delta reuse the last answer, which
        :attr:`accounting` holds with the accountant that computed it.
        """
        delta = self.delta if delta is None else delta
        if delta is None:
            raise ValueError("delta is needed: pass get_epsilon(delta=...) or make_private(..., delta=...)")
        if self.steps_taken == 0:
            return 0.0
        key = (self.steps_taken, delta)
        if self._accounted_for != key or self.accounting is None:
            self.accounting = account(
                noise_multiplier=self.rule.noise_multiplier,
                sample_rate=self.sample_rate,
                steps=self.steps_taken,
                delta=delta,
                accountant=self.accountant,
            )
            self._accounted_for = key
        return self.accounting.epsilon

    # --- checkpoints ------------------------------------------------------------------------------

    def privacy_setting(self) -> dict[str, Any]:
        """What the accounting of a checkpoint depends on; :meth:`load_state_dict` requires it to be equal."""
        return {
            "rule": type(self.rule).__name__,
            "noise_multiplier": float(self.rule.noise_multiplier),
            "expected_batch_size": float(self.rule.expected_batch_size),
            "hyperparameters": self.rule.hyperparameters(),
            "sample_rate": float(self.sample_rate),
            "accountant": self.accountant,
        }

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state plus the privacy state (see the module docstring).

        Refused in the middle of a logical batch (virtual steps or earlier backward passes pending): the
        running clipped sum holds per-example information that must be released or dropped, never saved.
        """
        if self._has_pending():
            raise ValueError(
                "a logical batch is partly accumulated (virtual steps or backward passes pending): checkpoint after "
                "optimizer.step() has released it, e.g. at the end of an epoch"
            )
        state = self.rule_state
        return {
            "optimizer": self.original_optimizer.state_dict(),
            "privacy": {
                "setting": self.privacy_setting(),
                "steps_taken": self.steps_taken,
                "rule_state": None if state is None else dataclasses.asdict(state),
                "noise_generator": None if self.generator is None else self.noise_draws.generator_state(self.generator),
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output, so that training continues exactly and epsilon counts every step.

        Refuses a state dict without the privacy state (e.g. a plain ``torch.optim`` one, which would
        reset the steps and so epsilon to 0) and one saved under a different privacy setting.
        """
        if not isinstance(state_dict, dict) or "privacy" not in state_dict or "optimizer" not in state_dict:
            raise ValueError(
                "state_dict holds no privacy state (steps taken, rule state, noise generator): it was not saved by "
                "AdaptiveClipDPOptimizer.state_dict(), and loading it would restart epsilon at 0"
            )
        privacy = state_dict["privacy"]
        saved, own = privacy["setting"], self.privacy_setting()
        differing = sorted(key for key in own if saved.get(key) != own[key])
        if differing:
            details = "; ".join(f"{key}: saved {saved.get(key)!r}, here {own[key]!r}" for key in differing)
            raise ValueError(f"the checkpoint was saved under another privacy setting ({details})")
        if (privacy["noise_generator"] is None) != (self.generator is None):
            raise ValueError(
                "the checkpoint and this optimizer disagree on a seeded noise generator: make_private both with a seed"
            )
        self.original_optimizer.load_state_dict(state_dict["optimizer"])
        self.steps_taken = int(privacy["steps_taken"])
        self.rule_state = self._restored_rule_state(privacy["rule_state"])
        self.noise_draws.discard()  # a draw made ahead came from the state being replaced
        if self.generator is not None:
            self.generator.set_state(privacy["noise_generator"])
        self.accounting, self._accounted_for = None, None

    def _restored_rule_state(self, saved: dict[str, Any] | None) -> Any:
        """The rule state from its saved fields, on the parameters' device and dtype."""
        if saved is None:
            return None
        reference = self.params[0]
        template = self.rule.init_state(
            sum(p.numel() for p in self.params), device=reference.device, dtype=reference.dtype
        )
        names = {f.name for f in dataclasses.fields(template)}
        if set(saved) != names:
            raise ValueError(f"the checkpoint's rule state has fields {sorted(saved)}, this rule's {sorted(names)}")
        values = {
            name: value.to(device=reference.device, dtype=getattr(template, name).dtype)
            if isinstance(value, torch.Tensor)
            else value
            for name, value in saved.items()
        }
        for name, value in values.items():
            expected = getattr(template, name)
            if isinstance(expected, torch.Tensor) and value.shape != expected.shape:
                raise ValueError(
                    f"the checkpoint's state.{name} has shape {tuple(value.shape)}, this model needs "
                    f"{tuple(expected.shape)}"
                )
        return dataclasses.replace(template, **values)


def _pending_passes(p: nn.Parameter) -> int:
    """How many finished backward passes left per-example gradients on ``p`` (Opacus's list, or the capture's)."""
    capture = layer_capture(p)
    if capture is not None and capture.pairs:
        return int(capture.completed_passes)
    grad_sample = getattr(p, "grad_sample", None)
    if isinstance(grad_sample, torch.Tensor):
        return 1
    return len(grad_sample) if isinstance(grad_sample, list) else 0


def _add(first: ClippedSum, second: ClippedSum) -> ClippedSum:
    """The clipped sum of two disjoint sets of examples: the field-wise sum."""
    return ClippedSum(vector=first.vector + second.vector, counts=first.counts + second.counts)
