"""The private training engine: ``make_private`` and what it assembles.

* :mod:`~adaclip.engine.private` – :func:`make_private` (model, optimizer and loader preparation).
* :mod:`~adaclip.engine.privacy_engine` – :class:`PrivacyEngine`, ``opacus.PrivacyEngine``'s interface;
  :mod:`~adaclip.engine.opacus_arguments` – Opacus's argument names; :mod:`~adaclip.engine.checkpoint` – its
  checkpoints.
* :mod:`~adaclip.engine.optimizer` – :class:`AdaptiveClipDPOptimizer`, an Opacus ``DPOptimizer`` driven by a rule.
* :mod:`~adaclip.engine.bookkeeping` and :mod:`~adaclip.engine.per_example` – the fast per-example path.
* :mod:`~adaclip.engine.sampling` – Poisson sampling; :mod:`~adaclip.engine.distributed` – data-parallel steps;
  :mod:`~adaclip.engine.ddp` – models wrapped in ``DistributedDataParallel`` or Opacus's ``DPDDP``.
"""

from adaclip.engine.optimizer import AdaptiveClipDPOptimizer
from adaclip.engine.privacy_engine import PrivacyEngine
from adaclip.engine.private import make_private

__all__ = ["AdaptiveClipDPOptimizer", "PrivacyEngine", "make_private"]
