"""Distillation methods, one file each. Importing this package registers every method module in it,
so adding a method is adding a file (see base.py for the contract)."""

import importlib
import pkgutil

from reproduce.methods.base import METHODS, Method, Networks, Step, build_method, get_method, register

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "Method", "Networks", "Step", "build_method", "get_method", "register"]
