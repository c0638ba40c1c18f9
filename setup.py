"""Packaging is declared in pyproject.toml; this file only hosts the optional ahead-of-time
build of the native extension (see fastrnn/build.py)."""
from setuptools import setup

setup()
