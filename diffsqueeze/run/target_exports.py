"""A run's model in a format plain diffusers loads (GGUF, torchao): the one path that both
``diffsqueeze export RUN --format F`` and a recipe's ``export.formats: [F, ...]`` take.

Each target is written from the run's ``model/`` folder (reloaded, so the export holds exactly what
``diffsqueeze.load`` gives) into a folder that must not exist; the exporters write into a
temporary folder and rename it at the end. :func:`check_target` runs before any work: a package
that is missing, or a version that could not load what would be written, is one line then, not
after the stages have run.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from diffsqueeze.errors import DiffsqueezeError, RecipeError
from diffsqueeze.loading import load_with_state
from diffsqueeze.models.roles import find_roles
from diffsqueeze.recipe import Recipe

__all__ = ["EXPORT_FORMATS", "check_recipe_targets", "check_target", "export_target", "replace_target",
           "write_recipe_targets"]

EXPORT_FORMATS = ("gguf", "torchao")


def check_target(fmt: str) -> None:
    """Raise a one-line :class:`DiffsqueezeError` if ``fmt`` cannot be written here."""
    if fmt not in EXPORT_FORMATS:
        raise DiffsqueezeError(f"unknown export format {fmt!r}; known: {', '.join(EXPORT_FORMATS)}")
    if fmt == "torchao":
        from diffsqueeze.quant.export.torchao_export import check_versions

        check_versions()
    else:
        try:
            import gguf  # noqa: F401
        except ImportError:
            raise DiffsqueezeError("the GGUF export needs the gguf package: pip install 'gguf>=0.19'") from None


def export_target(fmt: str, folder: Path, out: Path, allow_float: bool = False) -> dict:
    """Write the model folder ``folder`` (a run's ``model/``) as ``fmt`` into ``out`` (must not
    exist); returns the exporter's report.

    Raises:
        DiffsqueezeError: ``out`` exists, the model has no quantized layers, or (from the exporter,
            before any file) a layer the format cannot express.
    """
    check_target(fmt)
    if out.exists():
        raise DiffsqueezeError(f"'{out}' exists; choose another folder or remove it")
    if fmt == "torchao":
        from diffsqueeze.quant.export.torchao_export import export_torchao as export
    else:
        from diffsqueeze.quant.export.gguf_export import export_gguf as export
    pipe, state = load_with_state(str(folder))
    if not state.modules:
        raise DiffsqueezeError(f"'{folder}' has no quantized layers: it is a plain diffusers folder already")
    return export(pipe, state.modules, folder, out, allow_float=allow_float)


def replace_target(fmt: str, folder: Path, out: Path, allow_float: bool = False) -> dict:
    """:func:`export_target` into ``out``, where an earlier export may be: it is moved aside
    (``out.old``) and deleted once the new one is complete, or put back if the export fails. (The
    export is written under its final name because its LOAD.md names the folder.)"""
    old = out.with_name(f"{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    try:
        report = export_target(fmt, folder, out, allow_float)
    except BaseException:
        if old.exists() and not out.exists():
            old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return report


def check_recipe_targets(recipe: Recipe, pipe) -> None:
    """Before the first stage: each of ``export.formats`` can be written here, and what is certain
    to be refused already is (a GGUF file stores weights only, so a ``ptq`` stage that quantizes
    activations cannot be expressed without ``export.allow_float``; diffusers reads GGUF only
    through ``from_single_file``, which some denoiser classes lack).

    Raises:
        RecipeError: at ``export.formats``, naming the cause.
    """
    for fmt in recipe.export.formats:
        try:
            check_target(fmt)
        except DiffsqueezeError as exc:
            raise RecipeError("export.formats", str(exc)) from None
        if fmt != "gguf":
            continue
        denoiser = type(getattr(pipe, find_roles(pipe).denoiser))
        if not hasattr(denoiser, "from_single_file"):
            raise RecipeError("export.formats", f"gguf: diffusers reads GGUF only through from_single_file, which "
                                                f"{denoiser.__name__} does not have")
        for i, spec in enumerate(recipe.stages):
            if spec.name == "ptq" and spec.config.activations is not None and not recipe.export.allow_float:
                raise RecipeError("export.formats", f"gguf stores weights only, and stages[{i}].ptq quantizes "
                                                    "activations; set export.allow_float: true to write those layers "
                                                    "in float (their computation then differs), or drop gguf")


def write_recipe_targets(recipe: Recipe, run_dir: Path) -> dict:
    """Write ``model/`` of ``run_dir`` in each of ``export.formats`` as ``export-<format>/``;
    returns the manifest's record of them (path and bytes per format)."""
    out = {}
    for fmt in recipe.export.formats:
        target = run_dir / f"export-{fmt}"
        report = replace_target(fmt, run_dir / "model", target, recipe.export.allow_float)
        out[fmt] = {"path": target.name, "bytes": sum(f.stat().st_size for f in target.rglob("*") if f.is_file()),
                    "float_layers": sum(len(c.get("float_layers", [])) for c in report["components"].values())}
    return out
