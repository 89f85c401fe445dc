"""Privacy accounting and the empirical privacy audit.

Accounting lives in :mod:`~adaclip.privacy.accounting`, the audit in :mod:`~adaclip.privacy.audit`.
"""
