"""Load, save and describe diffusers pipelines; components are found by role.

Loading a compressed model goes through :mod:`diffsqueeze.loading` (or ``diffsqueeze.load``),
which knows the artifact formats; this package reads plain diffusers folders and builtin models.
"""

from diffsqueeze.models.io import (
    check_model_spec,
    register_pipeline_class,
    save_pipeline,
)
from diffsqueeze.models.roles import Roles, find_roles, module_components

__all__ = [
    "Roles",
    "check_model_spec",
    "find_roles",
    "module_components",
    "register_pipeline_class",
    "save_pipeline",
]
