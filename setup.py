"""Installs the top-level ``cli.py`` as ``icm/cli.py`` (setuptools maps packages to folders, not single modules;
``data/`` and ``dpo/`` are mapped in pyproject.toml)."""

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPy(build_py):
    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        return [*modules, ("icm", "cli", "cli.py")] if package == "icm" else modules


setup(cmdclass={"build_py": BuildPy})
