"""Benchmark suites: every module in this package is imported, and registers its cases.

Add a suite by dropping a module here with a function decorated ``@bench.core.suite("name")``
(see ``rnn.py`` and ``bench/README.md``).
"""
import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
