"""Per-layer clipping: each layer's per-example gradient clipped to its own bound (Opacus's ``clipping="per_layer"``).

McMahan, Ramage, Talwar, Zhang 2018 ("Learning differentially private recurrent language models", ICLR,
§3, per-layer clipping).  The flat vector ``g_i`` splits into ``K`` blocks ``g_i^k``, one per trainable
parameter in the optimizer's order (Opacus's ``DPPerLayerOptimizer`` calls each parameter a layer: a
weight and its bias have a bound each).  With bounds ``C_k`` the clipped contribution is

    sum_k c_ik g_i^k,    c_ik = w(||g_i^k||; C_k)

with the flat rule's weight ``w`` at bound ``C_k``:

* DP-SGD and quantile clipping: ``min(1, C_k / x)`` (Abadi et al. 2016);
* AUTO-S: ``C_k / (x + r)`` (Bu et al. 2023);
* DP-PSAC: ``C_k / (x + r / (x + r))`` (Xia et al. 2023).

**Sensitivity.**  Each weighted block has norm at most ``C_k`` (below it for AUTO-S and DP-PSAC), so
one example moves the sum by at most ``S = sqrt(sum_k C_k^2)``; the release adds ``N(0, sigma^2 S^2 I)``,
which is the flat rule's Gaussian mechanism at sensitivity ``S``: the accounting of ``(sigma, q, T)`` is
unchanged.  One bound ``C`` split equally gives ``C_k = C / sqrt(K)`` and ``S = C`` (McMahan et al.'s
uniform split); AUTO-S, whose flat sensitivity is 1, gets ``C_k = 1 / sqrt(K)``.

**Quantile clipping per layer** (Andrew et al. 2021, Algorithm 1, with a count per layer, as in He et al.
2023, "Exploring the limits of differentially private deep learning with group-wise clipping", ICLR,
adaptive per-layer thresholds).  Each layer's bound follows its own quantile::

    u_ik   = 1[||g_i^k|| <= C_k] - 1/2
    b~_k   = (sum_i u_ik + sqrt(K) sigma_b z_k) / B + 1/2,     z ~ N(0, I_K)
    C_k   <- C_k exp(-clip_lr (b~_k - target_quantile))
    grad   = (sum_i sum_k c_ik g_i^k + sigma_delta S_t N(0, I)) / B,   S_t = sqrt(sum_k C_k^2)

The count vector ``u_i`` has L2 sensitivity ``sqrt(K) / 2``; with noise ``sqrt(K) sigma_b`` per count its
noise-to-sensitivity ratio is ``2 sigma_b``, as for the flat rule's one count, so the gradient and the
counts compose to one Gaussian mechanism with ``sigma`` under Andrew et al.'s split (Theorem 1),
``sigma_delta = (sigma^-2 - (2 sigma_b)^-2)^(-1/2)``; each count is ``sqrt(K)`` times noisier than the
flat rule's.

AdaCliP, GeoClip and DP-MacAdam clip a transformed vector as a whole and DP-AdamBC is written for one
flat bound: the registry says why each is refused (:func:`~adaclip.methods.registry.per_layer_refusals`); the
methods it wraps are those registered with ``per_layer=True`` (:func:`~adaclip.methods.registry.per_layer_methods`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from adaclip._validate import require_int, require_positive
from adaclip.methods.auto import AutoClip
from adaclip.methods.base import ClippedSum, ClipRule, Stats, check_dim, zero_rows
from adaclip.methods.fixed import FixedClip
from adaclip.methods.psac import PerSampleAdaptiveClip, psac_weights
from adaclip.methods.quantile import QuantileClip
from adaclip.methods.registry import METHODS, clip_bound, per_layer_methods, per_layer_refusals


def check_per_layer(method: str) -> None:
    """Refuse ``clipping="per_layer"`` for a method without it, in one line with the reason."""
    refusals = per_layer_refusals()
    if method in refusals:
        raise ValueError(
            f"clipping='per_layer' is not offered for method {method!r}: {refusals[method]}; use "
            f"clipping='flat', or one of {list(per_layer_methods())} per layer"
        )


@dataclass(frozen=True)
class PerLayerQuantileState:
    """Per-layer quantile clipping's bounds ``C_k`` for the next step, ``[K]`` in the parameters' dtype."""

    clip_norms: Tensor

    @property
    def clip_norm(self) -> float:
        """The total bound ``S_t = sqrt(sum_k C_k^2)``, the sensitivity of the next step's gradient sum."""
        return float(torch.linalg.vector_norm(self.clip_norms.double()))


class PerLayerClip(ClipRule):
    """Per-layer clipping around a flat rule (see the module docstring).

    Args:
        base: the flat rule (``FixedClip``, ``QuantileClip``, ``AutoClip`` or ``PerSampleAdaptiveClip``); its
            noise multiplier, ``B`` and other parameters (``r``, the quantile's ``clip_lr``, ...) are kept.
        layer_sizes: the number of coordinates of each layer, in the flat vector's order.
        layer_bounds: ``C_k`` for each layer (the first step's for quantile clipping); ``None`` splits the
            base rule's bound (``clip_norm``, ``initial_clip``, 1 for AUTO-S) equally: ``C / sqrt(K)``.

    The per-example norms are ``[n, K]``, one column per layer, and so are the weights ``c_ik``
    (:meth:`layer_norms`, :meth:`example_weights`).  The clipped sum's counts hold, after
    ``[n, n_clipped, n_dropped]`` (an example counts as clipped when any of its layers is), the number of
    examples clipped in each layer.  ``clip_norm`` is the total bound ``S``; assigning it (an Opacus clip
    scheduler) scales every layer's bound by the same factor, for DP-SGD and DP-PSAC only.
    """

    def __init__(
        self, *, base: ClipRule, layer_sizes: Sequence[int], layer_bounds: Sequence[float] | None = None
    ) -> None:
        bases = tuple(METHODS[name].rule for name in per_layer_methods())
        if not isinstance(base, bases):
            raise ValueError(
                f"per-layer clipping wraps {', '.join(rule.__name__ for rule in bases)}, got {type(base).__name__}"
            )
        self.base = base
        self.layer_sizes = tuple(require_int(f"layer_sizes[{k}]", size) for k, size in enumerate(layer_sizes))
        if not self.layer_sizes:
            raise ValueError("layer_sizes must name at least one layer")
        layers = len(self.layer_sizes)
        if layer_bounds is None:
            layer_bounds = [clip_bound(base) / math.sqrt(layers)] * layers
        if len(layer_bounds) != layers:
            raise ValueError(f"layer_bounds has {len(layer_bounds)} bounds for {layers} layers: give one per layer")
        self.layer_bounds = tuple(require_positive(f"layer_bounds[{k}]", c) for k, c in enumerate(layer_bounds))
        self.noise_multiplier = base.noise_multiplier
        self.expected_batch_size = base.expected_batch_size

    @property
    def clip_norm(self) -> float:
        """The total bound ``S = sqrt(sum_k C_k^2)`` (the first step's for quantile clipping)."""
        return math.sqrt(sum(c * c for c in self.layer_bounds))

    @clip_norm.setter
    def clip_norm(self, value: float) -> None:
        if not isinstance(self.base, FixedClip | PerSampleAdaptiveClip):
            raise ValueError(
                f"the total bound of per-layer {type(self.base).__name__} cannot be set: only DP-SGD's and DP-PSAC's "
                "per-layer bounds are fixed (a clip scheduler scales them all)"
            )
        factor = require_positive("clip_norm", value) / self.clip_norm
        self.layer_bounds = tuple(c * factor for c in self.layer_bounds)

    def hyperparameters(self) -> dict[str, object]:
        """The base rule's parameters (less its flat bound), its class, and the layers' sizes and bounds."""
        flat = {
            name: value
            for name, value in self.base.hyperparameters().items()
            if name not in ("clip_norm", "initial_clip")
        }
        return {
            **flat,
            "base": type(self.base).__name__,
            "layer_sizes": list(self.layer_sizes),
            "layer_bounds": list(self.layer_bounds),
        }

    def init_state(
        self, dim: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> PerLayerQuantileState | None:
        self._check_dim(dim)
        if isinstance(self.base, QuantileClip):
            return PerLayerQuantileState(clip_norms=torch.tensor(self.layer_bounds, device=device, dtype=dtype))
        return None

    def noise_size(self, dim: int) -> int:
        """``d`` draws, and for quantile clipping ``K`` more: the counts' noise."""
        self._check_dim(dim)
        return dim + len(self.layer_sizes) if isinstance(self.base, QuantileClip) else dim

    def _check_dim(self, dim: int) -> None:
        if check_dim(dim) != sum(self.layer_sizes):
            raise ValueError(
                f"the model has {dim} trainable coordinates but the per-layer bounds were set for layers of "
                f"{sum(self.layer_sizes)} in all: per-layer clipping needs the optimizer over every trainable "
                "parameter of the module"
            )

    def bounds(self, state: PerLayerQuantileState | None, like: Tensor) -> Tensor:
        """``C_k`` ``[K]`` for the step, in ``like``'s dtype and on its device."""
        if state is not None:
            return state.clip_norms.to(like)
        return torch.tensor(self.layer_bounds, dtype=like.dtype, device=like.device)

    def layer_norms(self, per_example_grads: Tensor) -> Tensor:
        """``||g_i^k||`` ``[n, K]`` from the ``[n, d]`` per-example gradients."""
        blocks = torch.split(per_example_grads, list(self.layer_sizes), dim=1)
        return torch.stack([torch.linalg.vector_norm(block, dim=1) for block in blocks], dim=1)

    def example_weights(self, norms: Tensor, state: PerLayerQuantileState | None) -> Tensor:
        """``c_ik`` ``[n, K]`` from the per-layer norms ``[n, K]``: the flat rule's weight at bound ``C_k``."""
        bounds = self.bounds(state, norms)
        if isinstance(self.base, AutoClip):
            return bounds / (norms + self.base.r)
        if isinstance(self.base, PerSampleAdaptiveClip):
            return psac_weights(norms, bounds, self.base.r)
        return (bounds / norms).clamp_(max=1.0)

    def layer_weights(self, norms: Tensor, state: PerLayerQuantileState | None) -> tuple[Tensor, Tensor | None]:
        """The weights ``[n, K]`` with the non-finite policy: an example with any non-finite norm or weight gets
        weight 0 in every layer (see :mod:`adaclip.methods.base`); the mask of dropped examples, or ``None``."""
        weights = self.example_weights(norms, state)
        dropped = ~(torch.isfinite(norms) & torch.isfinite(weights)).all(dim=1)
        if not bool(dropped.any()):
            return weights, None
        return weights.masked_fill(dropped.unsqueeze(1), 0.0), dropped

    def clipped_sum(self, per_example_grads: Tensor, state: PerLayerQuantileState | None) -> ClippedSum:
        """``sum_i sum_k c_ik g_i^k`` and the counts, from the ``[n, d]`` per-example gradients."""
        weights, dropped = self.layer_weights(self.layer_norms(per_example_grads), state)
        blocks = torch.split(zero_rows(per_example_grads, dropped), list(self.layer_sizes), dim=1)
        vector = torch.cat([weights[:, k] @ block for k, block in enumerate(blocks)])
        return self.clipped_sum_from_layer_weights(vector, weights, dropped)

    def clipped_sum_from_layer_weights(self, vector: Tensor, weights: Tensor, dropped: Tensor | None) -> ClippedSum:
        """The :class:`ClippedSum` of ``vector = sum_i sum_k c_ik g_i^k`` and the weights ``[n, K]``.

        Counts: ``[n, n_clipped, n_dropped, clipped in layer 1, ..., clipped in layer K]`` over the kept
        examples (weight below 1 is clipped; the dropped ones have weight 0 and are counted apart).
        """
        kept = weights if dropped is None else weights[~dropped]
        shrunk = kept < 1
        counts = torch.cat(
            [
                torch.stack(
                    [
                        torch.tensor(kept.shape[0], device=weights.device),
                        shrunk.any(dim=1).sum(),
                        torch.zeros((), device=weights.device) if dropped is None else dropped.sum(),
                    ]
                ).to(vector.device, torch.float64),
                shrunk.sum(dim=0).to(vector.device, torch.float64),
            ]
        )
        return ClippedSum(vector=vector, counts=counts)

    def weight_bound(self, state: PerLayerQuantileState | None) -> float:
        """``S = sqrt(sum_k C_k^2)``, the sensitivity of the clipped sum."""
        return self.clip_norm if state is None else state.clip_norm

    def release(
        self, clipped: ClippedSum, state: PerLayerQuantileState | None, noise: Tensor
    ) -> tuple[Tensor, PerLayerQuantileState | None, Stats]:
        """``(sum + N(0, sigma^2 S^2 I)) / B``; for quantile clipping ``sigma_delta`` and the per-layer counts."""
        dim = self._check_release(clipped, noise)
        B, bound = self.expected_batch_size, self.weight_bound(state)
        quantile = self.base if isinstance(self.base, QuantileClip) else None
        noise_std = (quantile.grad_noise_multiplier if quantile else self.noise_multiplier) * bound
        noisy_mean = torch.add(clipped.vector, noise[:dim], alpha=noise_std).div_(B)
        stats = {
            "clipped_fraction": clipped.clipped_fraction,
            "noise_power": dim * (noise_std / B) ** 2,
            "batch_size": clipped.examples,
            "clip_norm": bound,
        }
        if quantile is None or state is None:
            return noisy_mean, state, stats
        examples, clipped_counts = clipped.counts[0], clipped.counts[3:]
        count_noise = math.sqrt(len(self.layer_sizes)) * quantile.count_noise_std * noise[dim:].to(torch.float64)
        estimates = (examples - clipped_counts - examples / 2 + count_noise) / B + 0.5  # b~_k
        growth = torch.exp(-quantile.clip_lr * (estimates - quantile.target_quantile))
        next_bounds = state.clip_norms * growth.to(state.clip_norms)
        stats["unclipped_estimate"] = float(estimates.mean())
        return noisy_mean, PerLayerQuantileState(clip_norms=next_bounds), stats

    def _check_release(self, clipped: ClippedSum, noise: Tensor) -> int:
        layers = len(self.layer_sizes)
        if not isinstance(clipped, ClippedSum) or clipped.vector.dim() != 1 or clipped.counts.shape != (3 + layers,):
            raise ValueError(
                f"clipped must be a ClippedSum with a 1-D vector and {3 + layers} counts (n, n_clipped, n_dropped and "
                f"one per layer, from PerLayerClip.clipped_sum)"
            )
        dim = clipped.vector.shape[0]
        if not isinstance(noise, Tensor) or noise.shape != (self.noise_size(dim),):
            raise ValueError(
                f"noise must be a 1-D tensor of {self.noise_size(dim)} standard-normal draws "
                f"(noise_size({dim})); got {getattr(noise, 'shape', type(noise))}"
            )
        return dim
