"""Training methods: the contract (``base``) and the registry of built-in methods.

``METHODS`` maps a name to its ``Method`` class; ``create_method(name, **kw)`` builds one and
``available_methods(counts)`` says which can run on a project's labelled data.
"""
from __future__ import annotations

from training_backend.learning.methods.base import (
    COMMON_OPTIONS,
    METHODS,
    Batch,
    Method,
    Prediction,
    Supervision,
    available_methods,
    create_method,
    gate_prediction,
    register,
)

# importing the built-in methods registers them
from training_backend.learning.methods import cam, mean_teacher, supervised  # noqa: E402,F401  isort: skip
from training_backend.learning.methods import caml, collaborative, crii, dual_unet, mcwss  # noqa: E402,F401  isort: skip

__all__ = [
    "COMMON_OPTIONS",
    "METHODS",
    "Batch",
    "Method",
    "Prediction",
    "Supervision",
    "available_methods",
    "create_method",
    "gate_prediction",
    "register",
]
