"""Distillation methods, one file each, registered in ``METHODS`` (reproduce/registry.py): adding a
method is adding a file (see base.py for the contract)."""

from reproduce.methods.base import METHODS, Method, MethodKind, Networks, Step, build_method, get_method, register

__all__ = ["METHODS", "Method", "MethodKind", "Networks", "Step", "build_method", "get_method", "register"]
