"""icm: preference data from a model's own knowledge (ICM labelling) and DPO training on it.

One import package. The repository keeps ``data/``, ``dpo/`` and ``cli.py`` beside ``icm/`` (the layout a
newcomer reads); a wheel installs them inside this package as ``icm.data``, ``icm.dpo`` and ``icm.cli``
(see ``pyproject.toml`` and ``setup.py``), so nothing generic like ``data`` or ``cli`` lands in site-packages.
In a source checkout the same names resolve through the repository root, added to this package's path.
"""

from pathlib import Path as _Path

_ROOT = _Path(__file__).resolve().parent.parent
if (_ROOT / "cli.py").is_file() and (_ROOT / "pyproject.toml").is_file():
    __path__.append(str(_ROOT))  # noqa: F821 (a package's __path__)
