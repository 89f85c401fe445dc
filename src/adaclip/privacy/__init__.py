"""Privacy accounting (:mod:`~adaclip.privacy.accounting`: PRV, PLD, RDP) and the privacy of hyperparameter
selection (:mod:`~adaclip.privacy.selection`).

The empirical privacy audit runs the engine's optimizer, so it sits above the engine in :mod:`adaclip.audit`.
"""
