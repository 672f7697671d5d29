"""The ``personafuse`` console command: generate with routing, explain routing, export blends."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# What a user can fix from the message alone: bad input, a missing or unreadable file, a refused request.
# Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, TypeError, KeyError, OSError)


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
    parser = argparse.ArgumentParser(prog="personafuse", description=__doc__, parents=[debug])
    sub = parser.add_subparsers(dest="command", required=True)

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

    out = add_parser("export", help="merged checkpoint or blended PEFT adapter for a fixed blend")
    bundle_args(out)
    out.add_argument("--out", required=True, type=Path)
    blend = out.add_mutually_exclusive_group(required=True)
    blend.add_argument("--preset", help="name in conf/presets (counselor, support_agent, tutor) or a YAML path")
    blend.add_argument("--activations", type=_parse_activations, help="openness=0.3,agreeableness=0.9,...")
    blend.add_argument("--gates", type=_parse_gates, help="K comma-separated gates in expert order")
    blend.add_argument("--context", help="let the router choose the blend for this user message")
    out.add_argument("--adapter", action="store_true", help="write a blended PEFT LoRA instead of a merged model")
    out.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    out.add_argument("--dequantize", action="store_true", help="allow merging into a quantized base")
    out.add_argument("--overwrite", action="store_true")

    ev = add_parser("evaluate", help="run evaluation suites on the bundle and its baselines; JSON, markdown, plots")
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


def main(argv: list[str] | None = None) -> int:
    """Run a command; a user error prints one line and exits 2 (traceback with ``--debug``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except USER_ERRORS as error:
        if getattr(args, "debug", False) or os.environ.get("PERSONAFUSE_DEBUG", "") not in ("", "0"):
            raise
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"{parser.prog} {args.command}: error: {message} (--debug shows the traceback)", file=sys.stderr)
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
