"""The research pipeline behind the report: params, data, models, runs, sweeps, analysis, figures, report.

It uses the library (:mod:`adaclip.methods`, :mod:`adaclip.engine`, :mod:`adaclip.privacy`); the
library never imports it.  ``python -m adaclip`` (or the ``adaclip`` console script) is its command
line (:mod:`adaclip.research.cli`).

Its third-party dependencies are not the library's: they come with the ``cli`` extra
(``pip install 'adaclip[cli]'``; ``adaclip[research]`` adds the pipeline's tools, DVC and papermill).
Importing any module of this package without them fails at once with one line that names the extra.
"""

from importlib.util import find_spec

CLI_EXTRA = {
    "yaml": "pyyaml",
    "tqdm": "tqdm",
    "sklearn": "scikit-learn",
    "pandas": "pandas",
    "matplotlib": "matplotlib",
    "seaborn": "seaborn",
}
"""Import name -> distribution of every third-party package this package's modules import beyond the library's."""


def _require_cli_extra() -> None:
    missing = [module for module in CLI_EXTRA if find_spec(module) is None]
    if missing:
        raise ModuleNotFoundError(
            f"adaclip.research (the command line and the report pipeline) needs the 'cli' extra, missing "
            f"{', '.join(CLI_EXTRA[m] for m in missing)}: pip install 'adaclip[cli]' "
            "(or 'adaclip[research]' for the dvc pipeline)",
            name=missing[0],
        )


_require_cli_extra()
