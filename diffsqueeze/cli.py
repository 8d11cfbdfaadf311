"""``diffsqueeze`` command line: run | inspect | eval | grid | report | prune-sweep | export.

Every failure ends in one line on stderr, ``diffsqueeze: error: ...``, and exit status 1 (Ctrl-C:
one line and 130); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from diffsqueeze.console import (  # first: its filters must precede the imports that warn
    quiet_libraries,  # scripts call it as cli.quiet_libraries too
)
from diffsqueeze.errors import DiffsqueezeError, one_line

log = logging.getLogger("diffsqueeze")
#: What Ctrl-C prints, per command (the default: "interrupted").
INTERRUPTED = {
    "run": "interrupted; the run state is saved, continue with --resume",
    "eval": "interrupted; finished batches are kept, rerun the same command to continue",
}
EXIT_INTERRUPTED = 130


def cmd_run(args: argparse.Namespace) -> int:
    from contextlib import ExitStack

    from diffsqueeze.config_parse import apply_overrides, read_yaml_file
    from diffsqueeze.pipelines.manifest import check_output_dir, check_run_dir
    from diffsqueeze.pipelines.run_lock import hold_model_run, hold_output_dir, launched_as_follower

    with ExitStack() as held:
        # The recipe's text and output_dir first: these errors come before torch and diffusers load.
        data = apply_overrides(read_yaml_file(args.recipe), args.overrides)
        out, model = (data.get("output_dir"), data.get("model")) if isinstance(data, dict) else (None, None)
        if isinstance(out, str) and out.strip():
            check_output_dir(out, model if isinstance(model, str) else None, probe=True)
            # held for the whole command (run_recipe takes the same locks again, re-entrantly): no
            # other run may change the folder between these checks and the run
            if not launched_as_follower():
                held.enter_context(hold_output_dir(out))
                if isinstance(model, str) and (lock := hold_model_run(model)) is not None:
                    held.enter_context(lock)
            check_run_dir(Path(out), resume=args.resume, overwrite=args.overwrite)

        from diffsqueeze.run.runner import run_recipe
        from diffsqueeze.recipe import recipe_from_dict

        recipe = recipe_from_dict(data or {})
        quiet_libraries()
        run_dir = run_recipe(recipe, resume=args.resume, overwrite=args.overwrite)
    print(f"run complete: {run_dir}")
    print(f"  compressed model: {run_dir / 'model'}   (diffsqueeze inspect {run_dir})")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from diffsqueeze.describe import describe_pipeline, format_description
    from diffsqueeze.loading import load_with_state
    from diffsqueeze.models.io import model_folder
    from diffsqueeze.pipelines.manifest import read_manifest

    quiet_libraries()
    path = Path(args.path)
    from diffsqueeze.quant.export.exported_folder import describe_exported, format_exported, is_exported_folder

    if path.is_dir() and is_exported_folder(path):  # `diffsqueeze export` output: bytes per stored format
        exported = describe_exported(path)
        print(json.dumps(exported, indent=2) if args.json else format_exported(exported, layers=args.layers))
        return 0
    if getattr(args, "sensitivity", False):
        from diffsqueeze.describe import sensitivity_for_run
        from diffsqueeze.quant.quest.sensitivity import format_sensitivity

        report = sensitivity_for_run(path)
        print(json.dumps(report, indent=2) if args.json else format_sensitivity(report))
        return 0
    manifest = read_manifest(path) if path.is_dir() else None
    if manifest is not None and model_folder(args.path) is None:
        # an unfinished run: show its stages, no model yet
        desc = None
    else:
        pipe, state = load_with_state(args.path)
        desc = describe_pipeline(pipe, state, model_folder(args.path), device=args.device)
    if args.json:
        print(json.dumps({"model": desc, "manifest": manifest}, indent=2))
    elif desc is None:
        print(json.dumps(manifest, indent=2))
    else:
        print(format_description(desc, manifest, layers=args.layers))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffsqueeze", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, show the full traceback instead of one line (also after the command)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a compression recipe")
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", help="KEY.PATH=VALUE overrides, e.g. stages.0.prune.targets.unet=0.5")
    p.add_argument("--resume", action="store_true", help="continue a run in output_dir, skipping finished stages")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a run already in output_dir (kept until the new model is exported)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("inspect", help="describe a model or run directory")
    p.add_argument("path", help="run directory, diffusers folder, builtin:NAME or hub id")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--layers", action="store_true", help="list every conv/linear layer")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="show the real/simulated kernel plan for this device (any machine can show either)")
    p.add_argument("--sensitivity", action="store_true",
                   help="layer sensitivity ranking of a quantized run (measured and saved if missing)")
    p.set_defaults(func=cmd_inspect)

    from diffsqueeze import commands  # eval, grid, report, prune-sweep, export

    for add in (commands.add_eval_parser, commands.add_grid_parser, commands.add_report_parser,
                commands.add_prune_sweep_parser, commands.add_export_parser):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: 0 on success; every failure is one line on stderr and exit 1 (Ctrl-C: 130).

    ``--debug`` (before or after the command) re-raises instead, with the full traceback.
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    debug = args.debug or "--debug" in extra
    extra = [e for e in extra if e != "--debug"]
    # KEY=VALUE overrides may follow options (run recipe.yaml --resume a.b=1)
    bad = [e for e in extra if e.startswith("-") or "=" not in e]
    if bad or (extra and args.command != "run"):
        parser.error(f"unrecognized arguments: {' '.join(bad or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"diffsqueeze: {INTERRUPTED.get(args.command, 'interrupted')}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except DiffsqueezeError as exc:
        if debug:
            raise
        print(f"diffsqueeze: error: {one_line(str(exc))}", file=sys.stderr)
        return 1
    except Exception as exc:  # a fault, not the user's input: name it, the traceback is one flag away
        if debug:
            raise
        text = one_line(str(exc))
        print(f"diffsqueeze: error: {type(exc).__name__}{': ' + text if text else ''} (--debug shows the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
