"""Command line: `alignlab run|validate|builtin|eval|export|bench|audit ...`. Only argument parsing lives here."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="alignlab", description="Recipe-driven alignment and PEFT for LMs")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a recipe's stages (all, or one with --stage)")
    run.add_argument("recipe")
    run.add_argument(
        "overrides", nargs="*", help="key.sub=value (e.g. stages.sft.train.max_steps=10), or ~key.sub to remove a key"
    )
    run.add_argument("--stage", help="run only this stage, starting from what earlier stages wrote")
    run.add_argument(
        "--resume", action="store_true", help="continue from the last complete checkpoint (made with the same settings)"
    )
    run.add_argument(
        "--force", action="store_true", help="run stages again from scratch, even if they finished (or changed)"
    )

    val = sub.add_parser("validate", help="check a recipe without loading any model")
    val.add_argument("recipe")
    val.add_argument("overrides", nargs="*")
    val.add_argument(
        "--accelerate-config",
        metavar="FILE",
        help="also check an `accelerate launch --config_file` config against the recipe (e.g. recipes/accelerate/fsdp2.yaml)",
    )

    pl = sub.add_parser(
        "plan",
        help="memory per GPU of each stage under DDP, FSDP2 and FSDP2 + CPU offload, from the model's config alone",
    )
    pl.add_argument("recipe")
    pl.add_argument("overrides", nargs="*")
    pl.add_argument("--gpus", type=int, default=1, help="processes (GPUs) the recipe runs on (default 1)")
    pl.add_argument("--gpu-memory", default="80GB", help="memory of one GPU, e.g. 80GB, 24GB, 141GiB (default 80GB)")
    pl.add_argument("--prompt-length", type=int, default=256, help="prompt tokens assumed for sampling stages")
    pl.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: float32, eager attention")
    pl.add_argument("--config", metavar="FILE", help="a config.json to read instead of the recipe's model's (offline)")

    bi = sub.add_parser(
        "builtin", help="build (tiny-llama) or fetch (smollm2-135m-instruct) a builtin model and print its path"
    )
    bi.add_argument("name", nargs="?", default="tiny-llama")

    ev = sub.add_parser("eval", help="evaluate checkpoints against a reference: eval.json, eval.md, plots")
    ev.add_argument("checkpoints", nargs="+", help="a run dir, stage dir, model dir, adapter dir, or 'base'")
    ev.add_argument("--recipe", help="recipe whose eval stage gives the settings (default: the checkpoint's run's)")
    ev.add_argument("--stage", help="which eval stage of the recipe (default: its first)")
    ev.add_argument("--reference", help="base, a stage of the run, or a checkpoint (default: the stage's reference)")
    ev.add_argument("--out", help="output folder (default: <stage dir>/eval, or <model dir>-eval)")
    ev.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an eval-stage key, e.g. --set num_prompts=50 --set dataset.path=data.jsonl",
    )

    exp = sub.add_parser(
        "export",
        help="a finished run's model as a folder people can use: merged HF weights (or the adapter), tokenizer, chat "
        "template, end tokens, a model card; optionally a GGUF file and a hub upload",
    )
    exp.add_argument("run", help="the run folder (a recipe's output_dir)")
    exp.add_argument("--to", required=True, metavar="DIR", help="the new folder to write (must not exist or be empty)")
    exp.add_argument("--stage", help="the stage whose model is exported (default: the last stage that writes one)")
    exp.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="dtype of the merged weights (default auto: the base model's)",
    )
    exp.add_argument("--adapter-only", action="store_true", help="the PEFT adapter alone, naming its base model")
    exp.add_argument("--gguf", action="store_true", help="also write a GGUF file (llama.cpp, Ollama) into DIR")
    exp.add_argument(
        "--gguf-type", choices=("f32", "f16", "q8_0"), help="the GGUF file's weight type (default f16; implies --gguf)"
    )
    exp.add_argument("--push-to-hub", metavar="REPO", help="upload DIR to this hub model repository once verified")
    exp.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")

    bench = sub.add_parser("bench", help="built-in benchmarks: `bench robustness`")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    rob = bench_sub.add_parser(
        "robustness", help="DPO and its robust variants at several label-flip rates, from one SFT checkpoint"
    )
    rob.add_argument("overrides", nargs="*", help="key.sub=value on the generated recipe, e.g. seed=1")
    rob.add_argument(
        "--preset",
        default="small",
        help="small (CPU, tiny model, ~35 min), smollm2 (CPU, the real built-in model on builtin:constraints, "
        "~55 min) or full (GPU, a 0.5B hub model)",
    )
    rob.add_argument("--losses", help="comma-separated (default: the preset's; small: all the bench's losses)")
    rob.add_argument("--flip-rates", help="comma-separated (default: the preset's; small: 0,0.2,0.4)")
    rob.add_argument("--out", default="runs/bench-robustness", help="run directory (rerun to resume)")
    rob.add_argument("--seed", type=int, default=0)
    rob.add_argument(
        "--seeds", type=int, default=1, help="run the bench at N seeds (seed, seed+1, ...): mean and spread per cell"
    )
    rob.add_argument("--force", action="store_true", help="rerun cells that already finished")
    rob.add_argument(
        "--eps-from-audit",
        action="store_true",
        help="(experimental) set cdpo/rdpo's eps at each flip rate from `alignlab audit preferences` of that rate's "
        "training pairs instead of the preset's guess (0.2); the audits go to <out>/audit/",
    )
    rob.add_argument("--audit-folds", type=int, help="the audit's folds (default: the preset's, else 5)")
    rob.add_argument(
        "--audit-epochs", type=float, help="epochs of each fold's reward model (default: the preset's, else 2)"
    )

    audit = sub.add_parser("audit", help="(experimental) audit a stage's data: `audit preferences`")
    audit_sub = audit.add_subparsers(dest="audit", required=True)
    aud = audit_sub.add_parser(
        "preferences",
        help="(experimental) estimate the label-flip rate of a preference stage's pairs (the eps of cdpo/rdpo) and "
        "list the most suspect pairs, from cross-fitted reward-model margins",
        description="EXPERIMENTAL. Trains K reward models, each on K-1 folds of the stage's pairs, scores the held-out "
        "fold, and fits a mirrored mixture to the margins (docs/robustness.md). Writes audit.json and "
        "audit.md into <output_dir>/audit/<stage>/.",
    )
    aud.add_argument("recipe")
    aud.add_argument("overrides", nargs="*", help="key.sub=value on the recipe, as for `run`")
    aud.add_argument("--stage", required=True, help="the preference stage whose dataset is audited (e.g. dpo)")
    aud.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a key of that stage, e.g. --set dataset.size=500 --set dataset.flip_rate=0.2",
    )
    aud.add_argument("--folds", type=int, default=5, help="cross-fitting folds (default 5)")
    aud.add_argument("--epochs", type=float, default=2.0, help="epochs of each fold's reward model (default 2)")
    aud.add_argument(
        "--learning-rate",
        type=float,
        help="the reward models' (default: the recipe's reward stage's, else the stage's)",
    )
    aud.add_argument("--seed", type=int, help="fold split seed (default: the recipe's seed)")
    aud.add_argument("--out", help="output folder (default: <output_dir>/audit/<stage>)")
    aud.add_argument(
        "--drop-suspect", type=int, default=0, metavar="K", help="also write cleaned.jsonl without the K most suspect"
    )

    for p in (run, ev, rob, aud, exp):
        p.add_argument(
            "--verbose",
            action="store_true",
            help="also show the libraries' warnings and progress bars (logs/ has them)",
        )
        p.add_argument(
            "--threads",
            type=_threads_arg,
            metavar="N",
            help="torch CPU threads: N, or auto (default: fewer only when the machine is busy; env ALIGNLAB_THREADS)",
        )

    # Overrides may come before or after options (`run R --stage dpo a.b=1`): collect the stray ones.
    args, extra = parser.parse_known_args(argv)
    unknown = [
        x
        for x in extra
        if x.startswith("-") or ("=" not in x and not x.startswith("~")) or not hasattr(args, "overrides")
    ]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    from alignlab.contract import StageFailed
    from alignlab.data import DataError
    from alignlab.export import ExportError
    from alignlab.gguf import ModelSourceError
    from alignlab.recipe import RecipeError
    from alignlab.runlock import RunLocked

    try:
        if args.command == "validate":
            return _validate(args)
        if args.command == "builtin":
            return _builtin(args)
        if args.command == "plan":
            return _plan(args)
        if args.command == "run":
            return _run(args)
        if args.command == "eval":
            return _eval(args)
        if args.command == "export":
            return _export(args)
        if args.command == "bench":
            return _bench_robustness(args)
        if args.command == "audit":
            return _audit_preferences(args)
    except (RecipeError, DataError, ModelSourceError, RunLocked, ExportError) as e:  # RecipeError: a stale stage too
        _error(e)
        return 2
    except StageFailed as e:  # diverged, out of memory: the message says what to change
        _error(e)
        return 1
    return 1


def _error(e: BaseException) -> None:
    """The one-line error, on the console and, once a run has set up its log, in logs/run.<rank>.log."""
    from alignlab import console

    print(f"error: {e}", file=sys.stderr)
    console.to_file(logging.ERROR, f"error: {e}")


def _start(args) -> None:
    """The console (alignlab/console.py; a run's pipeline adds its log file), then torch's thread count
    (alignlab/threads.py)."""
    from alignlab import console
    from alignlab.threads import apply_thread_policy

    console.setup(None, main_process=os.environ.get("RANK", "0") == "0", verbose_=args.verbose)
    apply_thread_policy(args.threads)


def _threads_arg(text: str) -> str:
    if text != "auto" and not (text.isdigit() and int(text) > 0):
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got '{text}'")
    return text


def _builtin(args) -> int:
    from alignlab.builtin import builtin_model_names, builtin_model_path

    if args.name not in builtin_model_names():
        print(f"error: unknown builtin model '{args.name}'; known: {', '.join(builtin_model_names())}", file=sys.stderr)
        return 2
    print(builtin_model_path(args.name))
    return 0


def _validate(args) -> int:
    from alignlab.validate import validate_recipe

    recipe, notes = validate_recipe(args.recipe, args.overrides, args.accelerate_config)
    print(f"{args.recipe}: valid ({len(recipe.stages)} stages: {' -> '.join(s.name for s in recipe.stages)})")
    for note in notes:
        print(f"  {note}" if note.startswith("warning:") else f"  note: {note}")
    return 0


def _plan(args) -> int:
    from alignlab.plan import parse_memory, plan
    from alignlab.recipe import RecipeError
    from alignlab.validate import validate_recipe

    try:
        memory = parse_memory(args.gpu_memory)
    except ValueError:
        raise RecipeError(f"--gpu-memory: expected a size such as 80GB or 24GiB, got '{args.gpu_memory}'") from None
    if args.gpus < 1:
        raise RecipeError(f"--gpus: expected a positive number of GPUs, got {args.gpus}")
    recipe, _ = validate_recipe(args.recipe, args.overrides)
    print(plan(recipe, args.gpus, memory, args.prompt_length, args.device, args.config))
    return 0


def _run(args) -> int:
    from alignlab.accelerate_checks import check_launch, launch_config_from_env
    from alignlab.pipeline import run_pipeline
    from alignlab.preflight import check_hub_sources
    from alignlab.recipe import RecipeError
    from alignlab.report import print_summary
    from alignlab.validate import validate_recipe

    recipe, notes = validate_recipe(args.recipe, args.overrides)
    if args.stage is not None:
        try:
            recipe.stage(args.stage)
        except RecipeError as e:
            raise RecipeError(f"--stage {args.stage}: {e}") from None
    check_hub_sources(recipe, args.stage)  # what validate notes as "not checked offline" must be had to run
    _start(args)  # the pipeline adds logs/run.<rank>.log (with what was logged before) once it owns the folder
    launch = launch_config_from_env()
    if launch is not None:  # under `accelerate launch`: the same checks as validate --accelerate-config
        notes += check_launch(recipe, launch)
    for note in notes:
        if note.startswith("warning:") and os.environ.get("RANK", "0") == "0":
            logging.getLogger("alignlab").warning(note)
    outputs = run_pipeline(recipe, only=args.stage, resume=args.resume, force=args.force)
    print_summary(recipe, outputs)
    return 0


def _eval(args) -> int:
    from alignlab.evaluation.command import run_cli

    _start(args)
    for md in run_cli(args.checkpoints, args.recipe, args.stage, args.reference, args.out, args.sets):
        print(f"\n{md.read_text()}\nwritten to {md.parent}")
    return 0


def _export(args) -> int:
    from alignlab.export.command import export_run

    _start(args)
    res = export_run(
        args.run,
        args.to,
        stage=args.stage,
        dtype=args.dtype,
        adapter_only=args.adapter_only,
        gguf_type=args.gguf_type or ("f16" if args.gguf else None),
        push_to_hub=args.push_to_hub,
        private=args.private,
    )
    what = "an adapter" if res["kind"] == "adapter" else f"a merged model ({res['dtype']})"
    gguf = f" and {res['gguf']['file']}" if res["gguf"] else ""
    print(
        f"exported stage {res['stage']} as {what}{gguf} to {res['to']} (checked: logits within "
        f"{res['checks']['folder_vs_run']:.2g} of the run's model"
        + (f", GGUF within {res['checks']['gguf']:.2g}" if res["gguf"] else "")
        + ")"
        + (f"\nuploaded to {res['url']}" if res["url"] else "")
    )
    return 0


def _bench_robustness(args) -> int:
    from alignlab.benchmarks import robustness
    from alignlab.recipe import RecipeError

    _start(args)

    def _list(text, default, cast=str):
        return tuple(cast(x) for x in text.split(",")) if text else default

    recipe = robustness.build_recipe(
        args.preset,
        _list(args.losses, None),
        _list(args.flip_rates, None, float),
        args.out,
        args.seed,
        args.overrides,
    )
    audit = None
    if args.eps_from_audit:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise RecipeError(
                "--eps-from-audit runs the label audit, which runs in one process: run the bench with it in one "
                "process (alignlab bench robustness ..., no accelerate launch), or without it"
            )
        audit = robustness.audit_settings(args.preset, args.audit_folds, args.audit_epochs)
    _, md = robustness.run_bench(recipe, force=args.force, seeds=args.seeds, audit=audit)
    if os.environ.get("RANK", "0") == "0":
        print(f"\n{md.read_text()}\nwritten to {md.parent}")
    return 0


def _audit_preferences(args) -> int:
    from alignlab.audit.command import audited_stage, run_audit
    from alignlab.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    audited_stage(recipe, args.stage)  # unknown or non-preference stage: an error before anything loads
    if args.sets:
        recipe = load_recipe(args.recipe, list(args.overrides) + [f"stages.{args.stage}.{kv}" for kv in args.sets])
    _start(args)
    res, md = run_audit(
        recipe,
        args.stage,
        folds=args.folds,
        seed=args.seed,
        epochs=args.epochs,
        learning_rate=args.learning_rate,
        out=args.out,
        drop_suspect=args.drop_suspect,
    )
    lo, hi = res["interval"]
    print(
        f"audit (experimental) of stage {args.stage}: {res['n_pairs']} pairs, estimated flip rate "
        f"{res['flip_rate']:.3f} (95% interval {lo:.3f} to {hi:.3f}); suggested eps for cdpo/rdpo: "
        f"{res['suggested_eps']:.2f}\nthe most suspect rows: {', '.join(map(str, res['most_suspect'][:10]))}"
        + "".join(f"\nwarning: {w}" for w in res["warnings"])
        + (f"\ncleaned data: {res['cleaned']}" if "cleaned" in res else "")
        + f"\nwritten to {md.parent}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
