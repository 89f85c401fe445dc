"""Privacy accounting: :mod:`~adaclip.privacy.accounting` (PRV, PLD, RDP).

The empirical privacy audit runs the engine's optimizer, so it sits above the engine in :mod:`adaclip.audit`.
"""
