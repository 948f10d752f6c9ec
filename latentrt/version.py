"""latentrt's version: the one place it is written (pyproject.toml reads it, ``latentrt --version`` and the
server's ``/version`` print it)."""

__version__ = "0.1.0"
