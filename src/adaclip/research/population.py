"""A population: ``K`` configurations of one linear model trained together on the same batches.

Each *member* is one configuration (method, learning rate, momentum, the rule's parameters, sigma or a
target epsilon, seed) of multinomial logistic regression or linear regression
(:func:`adaclip.research.models.build_model`'s ``logistic`` and ``linear``).  All members see the same
batch at every step (common random numbers for the sampling); each draws its own noise from its own
generator, keeps its own rule state and momentum, and is accounted on its own.  The weights are
stacked, ``W`` ``[K, out, in]`` and ``b`` ``[K, out]``, so the batch is read once for all ``K``:

* forward: ``z = x W^T + b`` for every member is one product ``x [n, in] @ [in, K out]``;
* per-example gradients of a linear layer factorise, ``g_ki = (delta_ki x_i^T, delta_ki)`` with the
  per-example output gradient ``delta_ki`` (``softmax(z_ki) - onehot(y_i)`` for the cross-entropy,
  ``2 (z_ki - y_i)`` for the squared error), so the norms are
  ``||g_ki||^2 = ||delta_ki||^2 (||x_i||^2 + 1)`` (``||x_i||`` once for all members) and, for rules that
  clip ``(g - a) / b`` (AdaCliP), the three-term expansion of
  :mod:`adaclip.engine.per_example` with all members' ``1/S^2`` and ``A/S^2`` stacked into one
  ``[K out, in]`` operand (one chunked pass over ``x``);
* the clipped sums ``sum_i c_ki g_ki`` of all members are one product ``[K out, n] @ x [n, in]``.

Everything else is the library's, per member: the rule of :mod:`adaclip.methods` (``example_weights``,
``norm_transform``, ``clipped_sum_from_weights``, ``release``, the non-finite policy
:func:`~adaclip.methods.base.drop_nonfinite`), the noise (one ``torch.randn(noise_size)`` per step from a
generator seeded as :func:`adaclip.make_private` seeds its own), the noise calibration
(:func:`~adaclip.privacy.accounting.noise_multiplier_for` over the planned steps, as ``make_private`` calibrates)
and the accounting (:func:`~adaclip.privacy.accounting.account`).  The update is ``torch.optim.SGD``'s (momentum without
dampening).  So each member's trajectory is its solo ``make_private`` run's, given the same batches and
noise (tested in float64).  A ``"nonprivate"`` member steps along the mean gradient of the realised batch
(what the research trainer's plain SGD on the mean loss does).

Every method but GeoClip (a subspace norm) is offered: DP-SGD, AUTO-S, DP-PSAC, quantile clipping, AdaCliP's
estimators, and DP-MacAdam and DP-AdamBC (which release an Adam step: their members take no momentum).  Per-layer
clipping and models other than one linear layer are not.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from adaclip._validate import require_in_range, require_int, require_one_of, require_open_unit, require_positive
from adaclip.engine.per_example import CHUNK_ENTRIES, Transform, _float64_flag, _transformed_linear_norms
from adaclip.engine.private import _seeds, calibrate_noise
from adaclip.methods import METHODS, NONPRIVATE, build_rule, supports_norm_path
from adaclip.methods.base import ClipRule, Stats, drop_nonfinite, release_counted
from adaclip.privacy.accounting import ACCOUNTANTS, Accountant, Spent, account, noise_multiplier_for
from adaclip.research.models import build_model

POPULATION_MODELS = ("logistic", "linear")
"""The research models a population trains (one linear layer: their per-example gradients factorise)."""


@dataclass(frozen=True)
class Member:
    """One configuration of a population.

    ``method`` is a name of :data:`adaclip.methods.METHODS` or ``"nonprivate"``; give exactly one of
    ``noise_multiplier`` and ``epsilon`` (a target, calibrated over the population's planned steps) for a
    private member, neither for ``"nonprivate"``.  ``seed`` fixes the initial weights (as the research
    trainer: ``torch.manual_seed(seed)`` before :func:`~adaclip.research.models.build_model`) and the noise
    generator (as ``make_private(seed=seed)``).
    """

    method: str
    lr: float
    momentum: float = 0.0
    noise_multiplier: float | None = None
    epsilon: float | None = None
    method_params: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    def check(self) -> None:
        """Refuse a bad field with a one-line ``ValueError`` naming it."""
        require_one_of("method", self.method, (*METHODS, NONPRIVATE))
        require_positive("lr", self.lr)
        require_in_range("momentum", self.momentum, 0.0, 1.0)
        require_int("seed", self.seed, minimum=0)
        if self.method != NONPRIVATE and METHODS[self.method].releases_step and self.momentum:
            raise ValueError(
                f"method {self.method!r} releases an Adam step, applied by plain SGD: momentum must be 0, "
                f"got {self.momentum!r}"
            )
        if self.method == NONPRIVATE:
            if self.noise_multiplier is not None or self.epsilon is not None or self.method_params:
                raise ValueError(
                    "a 'nonprivate' member takes no noise_multiplier, epsilon or method_params, got "
                    f"noise_multiplier={self.noise_multiplier!r}, epsilon={self.epsilon!r}, "
                    f"method_params={self.method_params!r}"
                )
            return
        if (self.noise_multiplier is None) == (self.epsilon is None):
            raise ValueError(
                f"a private member needs exactly one of noise_multiplier and epsilon, got "
                f"noise_multiplier={self.noise_multiplier!r} and epsilon={self.epsilon!r}"
            )


@dataclass(frozen=True)
class Privacy:
    """What every private member shares: the Poisson rate ``q = B / N``, the planned steps, delta, the accountant."""

    sample_rate: float
    planned_steps: int
    delta: float
    accountant: Accountant = "prv"

    def check(self) -> None:
        """Refuse a bad field with a one-line ``ValueError`` naming it."""
        if require_in_range("sample_rate", self.sample_rate, 0.0, 1.0, closed_high=True) == 0:
            raise ValueError(f"sample_rate must lie in (0, 1], got {self.sample_rate!r}")
        require_int("planned_steps", self.planned_steps)
        require_open_unit("delta", self.delta)
        require_one_of("accountant", self.accountant, ACCOUNTANTS)


@dataclass
class MemberState:
    """One member's private machinery and progress: its rule (``None`` if non-private), rule state, noise
    generator, momentum buffer, steps taken, whether it stopped on a non-finite training loss, and the statistics
    of its last release (the rule's, as ``AdaptiveClipDPOptimizer.last_stats``)."""

    rule: ClipRule | None
    rule_state: Any
    generator: torch.Generator | None
    momentum_buffer: Tensor | None = None
    steps_taken: int = 0
    diverged: bool = False
    last_stats: Stats = field(default_factory=dict)


class Population:
    """``K`` members (:class:`Member`) of one linear model with stacked weights (see the module docstring).

    Args:
        members: the configurations.
        model: ``"logistic"`` (cross-entropy over ``num_outputs`` classes) or ``"linear"`` (one output,
            squared error).
        num_features: the flattened input size.
        num_outputs: classes for ``logistic`` (1 for ``linear``).
        expected_batch_size: the public ``B`` every private rule divides by.
        privacy: the Poisson rate, planned steps, delta and accountant (``None`` only if every member is
            non-private).
        dtype, device: of the weights and the computation (the batches must match).
    """

    def __init__(
        self,
        members: Sequence[Member],
        *,
        model: str,
        num_features: int,
        num_outputs: int,
        expected_batch_size: int,
        privacy: Privacy | None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if len(members) == 0:
            raise ValueError("members must hold at least one Member, got none")
        for member in members:
            if not isinstance(member, Member):
                raise ValueError(f"members must be Member instances, got {type(member).__name__}")
            member.check()
        self.model = require_one_of("model", model, POPULATION_MODELS)
        num_features = require_int("num_features", num_features)
        num_outputs = require_int("num_outputs", num_outputs)
        if model == "linear" and num_outputs != 1:
            raise ValueError(f"num_outputs must be 1 for model 'linear', got {num_outputs}")
        require_int("expected_batch_size", expected_batch_size)
        private = [m for m in members if m.method != NONPRIVATE]
        seeds = [m.seed for m in private]
        shared = sorted({seed for seed in seeds if seeds.count(seed) > 1})
        if shared:
            raise ValueError(
                f"private members share seed(s) {shared}: their noise would be the same draw, and two releases with "
                "the same noise give away the difference of their clipped sums without noise; give each private "
                "member its own seed"
            )
        if private and privacy is None:
            raise ValueError("privacy (sample rate, planned steps, delta, accountant) is needed for private members")
        if privacy is not None:
            privacy.check()
        self.members = tuple(members)
        self.privacy = privacy
        self.expected_batch_size = expected_batch_size
        self.dtype, self.device = dtype, torch.device(device)
        self.num_features, self.num_outputs = num_features, num_outputs
        self.dim = num_outputs * num_features + num_outputs
        weights, biases = zip(*(self._initial_parameters(m.seed) for m in members), strict=True)
        self.weight = torch.stack(weights)  # [K, out, in]
        self.bias = torch.stack(biases)  # [K, out]
        self.states = [self._member_state(m) for m in members]

    # --- set-up ------------------------------------------------------------------------------------

    def _initial_parameters(self, seed: int) -> tuple[Tensor, Tensor]:
        """The research trainer's initial weights for ``seed`` (``torch.manual_seed`` then ``build_model``), with
        torch's global generator restored afterwards."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_model(self.model, (self.num_features,), self.num_outputs)
        (layer,) = (m for m in model.modules() if isinstance(m, nn.Linear))
        weight, bias = layer.weight.detach(), layer.bias.detach()
        return weight.to(self.device, self.dtype), bias.to(self.device, self.dtype)

    def _member_state(self, member: Member) -> MemberState:
        if member.method == NONPRIVATE:
            return MemberState(rule=None, rule_state=None, generator=None)
        assert self.privacy is not None
        sigma = member_noise_multiplier(member, self.privacy)
        rule = build_rule(
            member.method, noise_multiplier=sigma, expected_batch_size=self.expected_batch_size, **member.method_params
        )
        if not supports_norm_path(rule) or rule.subspace_norm(rule.init_state(self.dim, device="meta")) is not None:
            raise ValueError(
                f"method {member.method!r} does not weight examples by a (shifted and scaled) norm, which a "
                "population needs (GeoClip's subspace norm is not offered)"
            )
        _, noise_seed = _seeds(member.seed)
        assert noise_seed is not None
        generator = torch.Generator(device=self.device).manual_seed(noise_seed)
        state = rule.init_state(self.dim, device=self.device, dtype=self.dtype)
        return MemberState(rule=rule, rule_state=state, generator=generator)

    # --- one step ------------------------------------------------------------------------------------

    def outputs(self, x: Tensor) -> Tensor:
        """Every member's outputs on ``x`` ``[n, in]``: ``[n, K, out]`` (one product, the biases added in it)."""
        k, out, width = self.weight.shape
        stacked = torch.addmm(self.bias.reshape(1, k * out), x, self.weight.reshape(k * out, width).t())
        return stacked.view(x.shape[0], k, out)

    def losses_and_output_grads(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Per-example losses ``[n, K]`` and output gradients ``delta`` ``[n, K, out]`` (of each example's own loss)."""
        if self.model == "logistic":  # softmax over the few classes by hand: log_softmax is slow on a short last dim
            shifted = outputs - outputs.amax(2, keepdim=True)
            deltas = shifted.exp()
            totals = deltas.sum(2, keepdim=True)
            losses = totals.log().sub_(shifted.gather(2, targets.view(-1, 1, 1).expand(-1, outputs.shape[1], 1)))
            deltas.div_(totals).sub_(nn.functional.one_hot(targets, self.num_outputs).unsqueeze(1).to(deltas.dtype))
            return losses.squeeze(2), deltas
        residuals = outputs.squeeze(2) - targets.unsqueeze(1)
        return residuals.square(), (2 * residuals).unsqueeze(2)

    def step(self, x: Tensor, targets: Tensor, input_squared_norms: Tensor | None = None) -> Tensor:
        """One step of every running member on the batch ``x`` ``[n, in]`` with ``targets``; the members'
        mean training losses ``[K]`` (NaN for an empty batch).

        ``input_squared_norms``: ``||x_i||^2`` if the caller has them (e.g. computed once for the whole dataset);
        computed here otherwise.  A member whose mean loss is not finite takes this step and then stops
        (``diverged``), as the research trainer stops a run.
        """
        if input_squared_norms is None:
            input_squared_norms = torch.linalg.vector_norm(x, dim=1).square_()
        outputs = self.outputs(x)
        losses, deltas = self.losses_and_output_grads(outputs, targets)
        weights, dropped = self._example_weights(x, input_squared_norms, deltas)
        sums = self._weighted_sums(x, deltas, weights)
        self._update(self._releases(sums, weights, dropped, x.shape[0]))
        mean_losses = losses.mean(0)
        for state, loss in zip(self.states, mean_losses.tolist(), strict=True):
            if not state.diverged and x.shape[0] and not math.isfinite(loss):
                state.diverged = True
        return mean_losses

    def running(self) -> list[int]:
        """Indices of the members that have not stopped."""
        return [k for k, state in enumerate(self.states) if not state.diverged]

    def _example_weights(self, x: Tensor, input_squared: Tensor, deltas: Tensor) -> tuple[Tensor, dict[int, Tensor]]:
        """The weights ``c_ki`` ``[n, K]`` (1 for non-private members, 0 for stopped ones) and, per member, the
        examples its rule dropped as non-finite (:func:`~adaclip.methods.base.drop_nonfinite`), whose rows of
        ``deltas`` are zeroed here (the features are finite: checked when the data is given)."""
        delta_squared = torch.linalg.vector_norm(deltas, dim=2).square_()  # [n, K]
        plain = delta_squared.mul(input_squared.unsqueeze(1)).add_(delta_squared).sqrt_()  # ||g_ki||
        transformed = self._transformed_squared_norms(x, deltas)
        weights = torch.ones(deltas.shape[:2], dtype=self.dtype, device=self.device)
        dropped_examples: dict[int, Tensor] = {}
        for k, state in enumerate(self.states):
            if state.diverged:
                weights[:, k] = 0
                continue
            if state.rule is None:
                continue
            norms = transformed[k].sqrt_() if k in transformed else plain[:, k]
            member_weights, dropped = drop_nonfinite(norms, state.rule.example_weights(norms, state.rule_state))
            weights[:, k] = member_weights
            if dropped is not None:
                deltas[:, k] = deltas[:, k].masked_fill(dropped.unsqueeze(1), 0.0)
                dropped_examples[k] = dropped
        return weights, dropped_examples

    def _transformed_squared_norms(self, x: Tensor, deltas: Tensor) -> dict[int, Tensor]:
        """``||(g_ki - a_k) / b_k||^2`` for the running members whose rule clips a transformed vector.

        The weight part by the three-term expansion with every such member's operands stacked (one chunked
        pass over ``x``), checked and recomputed in float64 per member as the engine does
        (:func:`adaclip.engine.per_example.per_example_norms`); the bias part directly.
        """
        transforms: dict[int, Transform] = {}
        for k, state in enumerate(self.states):
            shift_scale = None if state.rule is None or state.diverged else state.rule.norm_transform(state.rule_state)
            if shift_scale is not None:
                transforms[k] = Transform.of(*shift_scale)
        if not transforms:
            return {}
        members = list(transforms)
        n, out, width = x.shape[0], self.num_outputs, self.num_features
        span = out * width
        quadratic = torch.cat([transforms[k].inv_scale_sq[:span].view(out, width) for k in members])
        linear = torch.cat([transforms[k].shift_inv_scale_sq[:span].view(out, width) for k in members])
        stacked_deltas = deltas[:, members].reshape(n, len(members) * out).t().reshape(len(members), out, n)
        products = _stacked_products(x, quadratic, linear).view(2, len(members), out, n)  # [2, m, out, n]
        products.mul_(stacked_deltas)
        products[0].mul_(stacked_deltas)
        quadratic_term, cross_term = products.sum(2)  # [m, n]
        constants = torch.stack(
            [torch.dot(transforms[k].shift[:span], transforms[k].shift_inv_scale_sq[:span]) for k in members]
        ).unsqueeze(1)
        values = quadratic_term - 2 * cross_term + constants
        magnitudes = quadratic_term + constants
        needed = [False] * len(members)
        flags = [_float64_flag(values[i], magnitudes[i], span, floor=1.0) for i in range(len(members))]
        checked = [flag for flag in flags if flag is not None]
        if checked:  # one host synchronisation for every member's check
            needed = torch.stack(checked).tolist()
        result = {}
        for i, k in enumerate(members):
            weight_part = values[i]
            if needed[i]:
                double = Transform.of(transforms[k].shift[:span].double(), transforms[k].scale[:span].double())
                weight_part = _transformed_linear_norms(
                    x.double(),
                    deltas[:, k].double(),
                    double.inv_scale_sq.view(out, width),
                    double.shift_inv_scale_sq.view(out, width),
                    torch.dot(double.shift, double.shift_inv_scale_sq),
                )[0].to(self.dtype)
            bias_part = ((deltas[:, k] - transforms[k].shift[span:]) / transforms[k].scale[span:]).square_().sum(1)
            result[k] = weight_part.clamp_min_(0).add_(bias_part)
        return result

    def _weighted_sums(self, x: Tensor, deltas: Tensor, weights: Tensor) -> Tensor:
        """``sum_i c_ki g_ki`` of every member as flat ``[K, d]`` vectors (weight then bias): one product."""
        n, k, out = deltas.shape
        scaled = deltas * weights.unsqueeze(2)  # [n, K, out]
        weight_sums = torch.mm(scaled.view(n, k * out).t(), x)  # [K out, in]
        return torch.cat([weight_sums.view(k, -1), scaled.sum(0)], dim=1)

    def _releases(self, sums: Tensor, weights: Tensor, dropped: dict[int, Tensor], batch_size: int) -> Tensor:
        """Every running member's released gradient ``[K, d]`` (0 for stopped members): its rule's release of its
        clipped sum with its own noise, or the mean gradient for a non-private member."""
        released = torch.zeros_like(sums)
        for k, state in enumerate(self.states):
            if state.diverged:
                state.last_stats = {}
                continue
            state.steps_taken += 1
            if state.rule is None:
                if batch_size:
                    released[k] = sums[k] / batch_size
                continue
            clipped = state.rule.clipped_sum_from_weights(
                sums[k], weights[:, k].contiguous(), state.rule_state, dropped.get(k)
            )
            noise = torch.randn(
                state.rule.noise_size(self.dim), generator=state.generator, dtype=self.dtype, device=self.device
            )
            released[k], state.rule_state, state.last_stats = release_counted(
                state.rule, clipped, state.rule_state, noise
            )
        return released

    def _update(self, gradients: Tensor) -> None:
        """``torch.optim.SGD``'s step for each running member: ``buf = mu buf + g`` (``buf = g`` at first), then
        ``theta -= lr buf`` (``lr g`` without momentum)."""
        span = self.num_outputs * self.num_features
        for k, (member, state) in enumerate(zip(self.members, self.states, strict=True)):
            if state.diverged:
                continue
            gradient = gradients[k]
            if member.momentum:
                if state.momentum_buffer is None:
                    state.momentum_buffer = gradient.clone()
                else:
                    state.momentum_buffer.mul_(member.momentum).add_(gradient)
                gradient = state.momentum_buffer
            self.weight[k].view(-1).add_(gradient[:span], alpha=-member.lr)
            self.bias[k].add_(gradient[span:], alpha=-member.lr)

    # --- reading it ----------------------------------------------------------------------------------

    def parameters(self, k: int) -> Tensor:
        """Member ``k``'s parameters as one flat vector in the solo model's order (weight, then bias)."""
        return torch.cat([self.weight[k].reshape(-1), self.bias[k]])

    def noise_multiplier(self, k: int) -> float | None:
        """Member ``k``'s sigma (``None`` if non-private)."""
        rule = self.states[k].rule
        return None if rule is None else float(rule.noise_multiplier)

    def spent(self, k: int) -> Spent | None:
        """The epsilon member ``k`` spent on the steps it took (``None`` if non-private or no step taken)."""
        state = self.states[k]
        if state.rule is None or state.steps_taken == 0:
            return None
        assert self.privacy is not None
        return account(
            noise_multiplier=state.rule.noise_multiplier,
            sample_rate=self.privacy.sample_rate,
            steps=state.steps_taken,
            delta=self.privacy.delta,
            accountant=self.privacy.accountant,
        )


def member_noise_multiplier(member: Member, privacy: Privacy) -> float:
    """A private member's sigma: its own, or the smallest whose epsilon over the planned steps is at most its target
    (:func:`~adaclip.privacy.accounting.noise_multiplier_for`, as ``make_private`` calibrates)."""
    if member.noise_multiplier is not None:
        return calibrate_noise(
            noise_multiplier=member.noise_multiplier,
            target_epsilon=None,
            epochs=None,
            sample_rate=privacy.sample_rate,
            delta=privacy.delta,
            accountant=privacy.accountant,
        )
    assert member.epsilon is not None
    return _calibrated(member.epsilon, privacy)


@functools.cache
def _calibrated(epsilon: float, privacy: Privacy) -> float:
    """Sigma for ``epsilon`` over the planned steps (cached: members of a population often share a target)."""
    return noise_multiplier_for(
        target_epsilon=epsilon,
        sample_rate=privacy.sample_rate,
        steps=privacy.planned_steps,
        delta=privacy.delta,
        accountant=privacy.accountant,
    )


def _stacked_products(x: Tensor, quadratic: Tensor, linear: Tensor) -> Tensor:
    """``[quadratic (x_i^2), linear x_i]`` for every example, ``[2, rows, n]``, in one chunked pass over ``x``.

    ``quadratic`` and ``linear`` stack every member's ``1/S^2`` and ``A/S^2`` (``[m out, in]``); the rows of ``x``
    are taken in chunks of :data:`~adaclip.engine.per_example.CHUNK_ENTRIES` entries and squared into one reused
    buffer while in cache, as :func:`adaclip.engine.per_example._transformed_linear_norms` does for one layer.
    """
    n, width = x.shape
    products = x.new_empty(2, quadratic.shape[0], n)
    rows = max(1, min(n, CHUNK_ENTRIES // max(1, width)))
    squares = x.new_empty(rows, width)
    for start in range(0, n, rows):
        chunk = x[start : start + rows]
        square = squares[: chunk.shape[0]]
        torch.square(chunk, out=square)
        torch.mm(quadratic, square.t(), out=products[0, :, start : start + rows])
        torch.mm(linear, chunk.t(), out=products[1, :, start : start + rows])
    return products
