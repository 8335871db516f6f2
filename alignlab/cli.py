"""Command line: `alignlab run|validate|builtin ...`. Only argument parsing lives here."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="alignlab", description="Recipe-driven alignment and PEFT for LMs")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a recipe's stages (all, or one with --stage)")
    run.add_argument("recipe")
    run.add_argument("overrides", nargs="*", help="key.sub=value, e.g. stages.sft.train.max_steps=10")
    run.add_argument("--stage", help="run only this stage, starting from what earlier stages wrote")
    run.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    run.add_argument("--force", action="store_true", help="run stages again even if they finished")

    val = sub.add_parser("validate", help="check a recipe without loading any model")
    val.add_argument("recipe")
    val.add_argument("overrides", nargs="*")

    bi = sub.add_parser("builtin", help="build a builtin model and print its path (e.g. tiny-llama)")
    bi.add_argument("name", nargs="?", default="tiny-llama")

    args = parser.parse_args(argv)
    from alignlab.data import DataError
    from alignlab.recipe import RecipeError

    try:
        if args.command == "validate":
            return _validate(args)
        if args.command == "builtin":
            from alignlab.builtin import builtin_model_path

            print(builtin_model_path(args.name))
            return 0
        if args.command == "run":
            return _run(args)
    except (RecipeError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1


def _validate(args) -> int:
    from alignlab.validate import validate_recipe

    recipe, notes = validate_recipe(args.recipe, args.overrides)
    print(f"{args.recipe}: valid ({len(recipe.stages)} stages: {' -> '.join(s.name for s in recipe.stages)})")
    for note in notes:
        print(f"  note: {note}")
    return 0


def _run(args) -> int:
    from alignlab.pipeline import run_pipeline
    from alignlab.report import print_summary
    from alignlab.validate import validate_recipe

    recipe, notes = validate_recipe(args.recipe, args.overrides)
    outputs = run_pipeline(recipe, only=args.stage, resume=args.resume, force=args.force)
    print_summary(recipe, outputs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
