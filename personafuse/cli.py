"""The ``personafuse`` console command: every workflow of the framework from an installed wheel.

Training and data workflows are the Hydra recipes (``personafuse train-experts [key=value ...]``,
``--help`` lists the config groups, ``--cfg job`` prints the composed config); generate, explain and
the flag forms of export and evaluate work on a saved bundle.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

# What a user can fix from the message alone: bad input, a missing or unreadable file, a refused request.
# Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, TypeError, KeyError, OSError)
DEBUG_ENV = "PERSONAFUSE_DEBUG"

# command -> (module in personafuse.recipes, what it does); the recipes live in recipes/ of a clone.
HYDRA_WORKFLOWS = {
    "train-experts": ("train_experts", "train one LoRA expert per trait pole"),
    "train-router": ("train_router", "train the context router over frozen experts; writes the bundle"),
    "pipeline": ("pipeline", "experts -> router -> bundle (-> demo, reference evaluation, export, APC-DPO)"),
    "train-discriminator": ("train_discriminator", "distil the APC relevance and NLI discriminators"),
    "apc-dpo": ("apc_dpo", "APC-DPO: make a bundle more faithful to a persona"),
    "persona-sft-data": ("persona_sft_data", "persona-diversified SFT data (math or dialogue)"),
    "persona-sft": ("persona_sft", "SFT on persona-augmented data (full, LoRA or the stack)"),
    "eval-math": ("eval_math", "GSM8K-format accuracy with a Wilson interval"),
    "evaluate": ("evaluate", "evaluation suites on a bundle and its baselines"),
    "export": ("export", "merged model or blended PEFT adapter for a fixed blend"),
}
# These two also take flags on a saved bundle (``export --bundle B --out O --preset counselor``).
FLAG_FORMS = ("export", "evaluate")


def debug_requested() -> bool:
    return any(os.environ.get(name, "") not in ("", "0") for name in (DEBUG_ENV, "HYDRA_FULL_ERROR"))


def error_line(command: str, error: BaseException) -> str:
    message = error.args[0] if isinstance(error, KeyError) and error.args else error
    return f"personafuse {command}: error: {message} (--debug or {DEBUG_ENV}=1 shows the traceback)"


def user_errors(command: str) -> Callable:
    """Decorate a recipe main: a user error prints one line and exits 2 (the traceback when debugging)."""
    def decorate(main: Callable) -> Callable:
        @functools.wraps(main)
        def wrapper(*args, **kwargs):
            try:
                return main(*args, **kwargs)
            except USER_ERRORS as error:
                if debug_requested():
                    raise
                print(error_line(command, error), file=sys.stderr)
                raise SystemExit(2) from None
        return wrapper
    return decorate


def _parse_activations(text: str) -> dict[str, float]:
    """``openness=0.3,agreeableness=0.9`` -> mapping."""
    pairs = [p.split("=", 1) for p in text.split(",") if p.strip()]
    if any(len(p) != 2 for p in pairs):
        raise argparse.ArgumentTypeError(f"expected trait=value,... got {text!r}")
    try:
        return {k.strip(): float(v) for k, v in pairs}
    except ValueError:
        raise argparse.ArgumentTypeError(f"activation values must be numbers: {text!r}") from None


def _parse_gates(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"gates must be comma-separated numbers: {text!r}") from None


def _parse_data(text: str) -> tuple[str, str]:
    """``situations=heldout.jsonl`` -> ``("situations", "heldout.jsonl")``."""
    key, sep, path = text.partition("=")
    if not sep or not key.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=PATH (e.g. situations=heldout.jsonl), got {text!r}")
    return key.strip(), path.strip()


def build_parser() -> argparse.ArgumentParser:
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback of an error (also: PERSONAFUSE_DEBUG=1)")
    parser = argparse.ArgumentParser(prog="personafuse", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, parents=[debug])
    sub = parser.add_subparsers(dest="command", required=True, metavar="<workflow>")
    for name, (_, summary) in HYDRA_WORKFLOWS.items():
        if name not in FLAG_FORMS:  # parsed by Hydra; listed here for --help
            sub.add_parser(name, help=f"{summary} [key=value ...]", add_help=False)
    sub.add_parser("bench", help="routed-LoRA speed and memory benchmark (--help for its options)", add_help=False)

    def add_parser(name, **kwargs):
        return sub.add_parser(name, parents=[debug], **kwargs)

    def bundle_args(p):
        p.add_argument("--bundle", required=True, type=Path, help="directory written by save_pretrained / the recipes")
        p.add_argument("--base", default=None, help="local base model dir (default: the one recorded in the bundle)")

    gen = add_parser("generate", help="reply to prompts with dynamic routing; prints top trait activations")
    bundle_args(gen)
    gen.add_argument("prompts", nargs="+")
    gen.add_argument("--system", default=None)
    gen.add_argument("--max-new-tokens", type=int, default=96)

    exp = add_parser("explain", help="bar chart PNG of the gates and trait activations for a context")
    bundle_args(exp)
    exp.add_argument("--context", required=True)
    exp.add_argument("--out", type=Path, default=Path("explain.png"),
                     help="image file (.png, .svg, .pdf) or a directory, which gets explain.png")

    out = add_parser("export", help="merged checkpoint or blended PEFT adapter for a fixed blend "
                     "(--bundle ... flags, or Hydra key=value)")
    bundle_args(out)
    out.add_argument("--out", required=True, type=Path)
    blend = out.add_mutually_exclusive_group(required=True)
    blend.add_argument("--preset", help="name in the shipped conf/presets (counselor, support_agent, tutor) or a YAML path")
    blend.add_argument("--activations", type=_parse_activations, help="openness=0.3,agreeableness=0.9,...")
    blend.add_argument("--gates", type=_parse_gates, help="K comma-separated gates in expert order")
    blend.add_argument("--context", help="let the router choose the blend for this user message")
    out.add_argument("--adapter", action="store_true", help="write a blended PEFT LoRA instead of a merged model")
    out.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    out.add_argument("--dequantize", action="store_true", help="allow merging into a quantized base")
    out.add_argument("--overwrite", action="store_true")

    ev = add_parser("evaluate", help="evaluation suites on the bundle and its baselines; JSON, markdown, plots "
                    "(--bundle ... flags, or Hydra key=value)")
    bundle_args(ev)
    ev.add_argument("--out", required=True, type=Path, help="results directory (reruns resume from its cache/)")
    ev.add_argument("--suites", default="trait_expression,routing", help="comma-separated, from personafuse.eval.SUITES")
    ev.add_argument("--candidates", default="base,prompted,uniform,personafuse",
                    help="comma-separated: base, prompted, uniform, personafuse, expert:<name>, preset:<name>, model:<dir>")
    ev.add_argument("--max-new-tokens", type=int, default=48)
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--limit", type=int, default=None, help="first N items of every suite")
    ev.add_argument("--data", action="append", default=[], metavar="KEY=PATH", type=_parse_data,
                    help="suite input instead of the bundled sample, e.g. situations=heldout.jsonl (repeatable)")
    return parser


def is_hydra_form(command: str, rest: list[str]) -> bool:
    if command not in HYDRA_WORKFLOWS:
        return False
    return command not in FLAG_FORMS or not any(a == "--bundle" or a.startswith("--bundle=") for a in rest)


def run_recipe(command: str, rest: list[str]) -> int:
    """Hand ``rest`` to the recipe's Hydra main, as ``python recipes/<name>.py rest`` would."""
    saved_argv, saved_debug = sys.argv, os.environ.get(DEBUG_ENV)
    if "--debug" in rest:
        rest = [a for a in rest if a != "--debug"]
        os.environ[DEBUG_ENV] = "1"
    recipe = importlib.import_module(f"personafuse.recipes.{HYDRA_WORKFLOWS[command][0]}")
    sys.argv = [f"personafuse {command}", *rest]
    try:
        recipe.main()
    finally:
        sys.argv = saved_argv
        if saved_debug is None:
            os.environ.pop(DEBUG_ENV, None)
        else:
            os.environ[DEBUG_ENV] = saved_debug
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run a command; a user error prints one line and exits 2 (traceback with ``--debug``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and is_hydra_form(argv[0], argv[1:]):
        return run_recipe(argv[0], argv[1:])
    if argv and argv[0] == "bench":
        from personafuse.bench import main as bench

        bench(argv[1:])
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except USER_ERRORS as error:
        if getattr(args, "debug", False) or debug_requested():
            raise
        print(error_line(args.command, error), file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    from personafuse.inference import explain, generate_replies, load_bundle

    pf = load_bundle(args.bundle, args.base)
    if args.command == "generate":
        for reply in generate_replies(pf, args.prompts, system=args.system, max_new_tokens=args.max_new_tokens):
            top = ", ".join(f"{t} {a:+.2f}" for t, a in reply.top_traits())
            print(f"> {reply.prompt}\n  [{top}]\n  {reply.text}\n")
    elif args.command == "evaluate":
        from personafuse.eval import GenerationSettings, run_evaluation

        data = dict(args.data)
        run_evaluation(pf, pf.tokenizer, args.out, suites=args.suites.split(","), candidates=args.candidates.split(","),
                       settings=GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size),
                       data=data, limit=args.limit)
        print(f"wrote {args.out / 'results.json'} and {args.out / 'report.md'}")
    elif args.command == "explain":
        print(f"wrote {explain(pf, args.context, args.out)}")
    else:
        from personafuse.export import blend_gates, export_blended_adapter, export_merged

        gates = blend_gates(pf, activations=args.activations, preset=args.preset, gates=args.gates, context=args.context)
        label = args.preset or ("router blend" if args.context else "custom blend")
        if args.adapter:
            path = export_blended_adapter(pf, args.out, gates, overwrite=args.overwrite, label=label)
        else:
            path = export_merged(pf, args.out, gates, dtype=args.dtype, dequantize=args.dequantize,
                                 overwrite=args.overwrite, label=label)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
