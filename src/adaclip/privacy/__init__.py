"""Privacy accounting, the privacy of hyperparameter selection, and the empirical privacy audit.

Accounting lives in :mod:`~adaclip.privacy.accounting`, selection in :mod:`~adaclip.privacy.selection`, the audit
in :mod:`~adaclip.privacy.audit`.
"""
