"""Privacy accounting (:mod:`~adaclip.privacy.accounting`) and the empirical privacy audit (:mod:`~adaclip.privacy.audit`)."""
