"""Deprecated alias of :mod:`adaclip.privacy.accounting`, kept for one release (0.2); import from there."""

from adaclip.privacy.accounting import ACCOUNTANTS, Accountant, epsilon, noise_multiplier_for

__all__ = ["ACCOUNTANTS", "Accountant", "epsilon", "noise_multiplier_for"]
