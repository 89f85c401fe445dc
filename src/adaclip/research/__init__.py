"""The research pipeline behind the report: params, data, models, runs, sweeps, analysis, figures, report.

It uses the library (:mod:`adaclip.methods`, :mod:`adaclip.engine`, :mod:`adaclip.privacy`); the
library never imports it.  ``python -m adaclip`` is its command line (:mod:`adaclip.research.cli`).
"""
