"""The training methods by name: the one registry line a new method adds.

A method is a module in spoxl/methods/ that defines one Objective subclass (spoxl.methods.base)
and points to it with a module-level `OBJECTIVE = MyObjective`. The registry names the module and
imports it only when asked (a plugin load), so loading a recipe does not import every method (nor
triton), and the modules below the methods (config, engine) never import spoxl.methods themselves.
"""

from __future__ import annotations

import importlib

from spoxl.errors import SpoxlError

# Method name (YAML `method.name`) -> the module that defines OBJECTIVE.
METHOD_MODULES = {
    "sft": "spoxl.methods.sft",
    "spo": "spoxl.methods.spo",
    "lpo": "spoxl.methods.lpo",
    "dpo": "spoxl.methods.diffusion_dpo",
    "diffusion_dpo": "spoxl.methods.diffusion_dpo",
    "mapo": "spoxl.methods.mapo",
    "ncp": "spoxl.methods.ncp",
}


def objective_class(name: str):
    """The Objective subclass registered for a method name (one-line error if unknown)."""
    if name not in METHOD_MODULES:
        raise SpoxlError(f"unknown method {name!r} (known: {', '.join(sorted(METHOD_MODULES))})")
    try:
        module = importlib.import_module(METHOD_MODULES[name])
    except ModuleNotFoundError as e:
        if e.name == METHOD_MODULES[name]:
            raise SpoxlError(f"method {name!r} is not implemented yet ({METHOD_MODULES[name]} missing)") from None
        raise
    cls = getattr(module, "OBJECTIVE", None)
    if cls is None:
        raise SpoxlError(f"{METHOD_MODULES[name]} defines no OBJECTIVE")
    return cls


def build_objective(recipe):
    """The recipe's objective, built with its method parameters and the recipe it reads from."""
    return objective_class(recipe.method.name).from_recipe(recipe)
