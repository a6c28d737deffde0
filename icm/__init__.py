"""icm: preference data from a model's own knowledge (ICM labelling) and DPO training on it.

One import package. The repository keeps ``data/``, ``dpo/`` and ``cli.py`` beside ``icm/`` (the layout a
newcomer reads); a wheel installs them inside this package as ``icm.data``, ``icm.dpo`` and ``icm.cli``
(see ``pyproject.toml`` and ``setup.py``), so nothing generic like ``data`` or ``cli`` lands in site-packages.
In a source checkout, exactly those three names are found beside this folder; nothing else there is importable
as part of the package.
"""

import importlib.util as _util
import sys as _sys
from pathlib import Path as _Path

_ROOT = _Path(__file__).resolve().parent.parent
_CHECKOUT = {"icm.data": _ROOT / "data", "icm.dpo": _ROOT / "dpo", "icm.cli": _ROOT / "cli.py"}


class _CheckoutFinder:
    """Finds ``icm.data``, ``icm.dpo`` and ``icm.cli`` in a source checkout (their submodules follow from them)."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        location = _CHECKOUT.get(name)
        if location is None:
            return None
        if location.is_dir():
            return _util.spec_from_file_location(name, location / "__init__.py",
                                                 submodule_search_locations=[str(location)])
        return _util.spec_from_file_location(name, location)


if (_ROOT / "cli.py").is_file() and (_ROOT / "pyproject.toml").is_file():
    _sys.meta_path.insert(0, _CheckoutFinder)
