"""Load, save and describe diffusers pipelines; components are found by role."""

from diffsqueeze.models.io import (
    check_model_spec,
    load_pipeline,
    load_with_state,
    register_pipeline_class,
    save_pipeline,
)
from diffsqueeze.models.roles import Roles, find_roles, module_components

__all__ = [
    "Roles",
    "check_model_spec",
    "find_roles",
    "load_pipeline",
    "load_with_state",
    "module_components",
    "register_pipeline_class",
    "save_pipeline",
]
