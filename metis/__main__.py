"""Command line: `python -m metis {chat,route,eval,finetune,upcycle,size,export-experts}`.

The CLI consumes the same events as the web app; `route` prints the routing trace as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys

from .explain import strongest
from .loading import ROOT
from .prompting import Message
from .routing import MODES
from .serving.engine import Engine, GenerationSettings
from .settings import Settings
from .streaming import AnswerDelta, Done, Failed, ReasoningDelta, Routed

PUBLISHED_CONFIG = ROOT / "assets" / "reference" / "metis-home-config.json"


def _messages(args) -> list[Message]:
    from .images import load_image

    return [Message("user", args.prompt, [load_image(p) for p in args.image or []])]


def _engine(args) -> Engine:
    """The command line is an edge too: the server's METIS_* settings apply (metis/settings.py)."""
    options = Settings.from_env().engine_options()
    return Engine.load(args.model, allow_pickle=getattr(args, "allow_pickle", False), **options)


def chat(args) -> int:
    engine = _engine(args)
    settings = GenerationSettings(mode=args.mode, threshold=args.threshold, max_new_tokens=args.max_new_tokens,
                                  thinking_budget=args.thinking_budget, temperature=args.temperature,
                                  top_p=args.top_p, seed=args.seed)
    out = sys.stdout
    section = None
    for event in engine.stream(_messages(args), settings):
        match event:
            case Routed(trace):
                print(f"[router] p(think)={trace.p_think:.3f} -> {trace.decision} (mode {trace.mode})", file=sys.stderr)
            case ReasoningDelta(text) | AnswerDelta(text):
                kind = "thinking" if isinstance(event, ReasoningDelta) else "answer"
                if kind != section:
                    out.write(f"\n[{kind}]\n")
                    section = kind
                out.write(text)
                out.flush()
            case Done(stats) | Failed(_, stats):
                if isinstance(event, Failed):
                    print(f"\n[error] {event.message}", file=sys.stderr)
                print(f"\n[{stats.tokens} tokens, {stats.thinking_tokens} thinking, ttft {stats.ttft_s:.3f} s, "
                      f"{stats.tokens_per_s:.0f} tok/s, stop: {stats.stop_reason}]", file=sys.stderr)
                return 1 if isinstance(event, Failed) else 0
    return 0


def route(args) -> int:
    trace = _engine(args).route(_messages(args), mode=args.mode, threshold=args.threshold)
    report = trace.to_dict() | {"strongest": strongest(trace)}
    print(json.dumps(report, indent=2))
    for expert, pushes in report["strongest"].items():
        words = ", ".join(f"{c['token']!r} {c['score']:+.3f}" for c in pushes) or "none"
        print(f"[router] pushed hardest toward {expert}: {words}", file=sys.stderr)
    return 0


def upcycle(args) -> int:
    from .upcycle import upcycle_checkpoint

    upcycle_checkpoint(args.source, args.out, thinking_expert=args.thinking_expert)
    print(f"saved Metis-HOME checkpoint to {args.out}")
    return 0


def size(args) -> int:
    from .sizing import model_size, report

    measured = model_size(args.checkpoint)
    print(json.dumps(measured.to_dict(), indent=2) if args.json else report(measured))
    return 0


def export_experts(args) -> int:
    from .export import export_experts as export

    print("\n".join(export(args.checkpoint, args.out).lines()))
    return 0


def evaluate(args) -> int:
    if args.data:
        from .evaluation.cli import main
    else:
        from .tiny.evaluate import main

    return main(args)


def finetune(args) -> int:
    from .finetune.cli import main
    from .serving.engine import Engine

    return main(args, lambda model, **kwargs: Engine.load(model, **Settings.from_env().engine_options(), **kwargs))


DEFAULTS = GenerationSettings()  # the CLI's defaults are the API's and the app's


def with_model(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", default=None, help="checkpoint folder or Hub id (default: embedded tiny model)")
    p.add_argument("--allow-pickle", action="store_true", help="accept pickled .bin weights (trusted sources only)")
    return p


def with_query(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--prompt", required=True)
    p.add_argument("--image", action="append", help="image file (repeat for several)")
    p.add_argument("--mode", choices=MODES, default=DEFAULTS.mode)
    p.add_argument("--threshold", type=float, default=DEFAULTS.threshold, help="default: the model's own")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m metis", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = with_query(with_model(sub.add_parser("chat", help="stream reasoning and answer to the terminal")))
    p.add_argument("--max-new-tokens", type=int, default=DEFAULTS.max_new_tokens)
    p.add_argument("--thinking-budget", type=int, default=DEFAULTS.thinking_budget, help="default: no budget")
    p.add_argument("--temperature", type=float, default=DEFAULTS.temperature, help="0: greedy")
    p.add_argument("--top-p", type=float, default=DEFAULTS.top_p)
    p.add_argument("--seed", type=int, default=DEFAULTS.seed, help="sampling seed (temperature > 0)")
    p.set_defaults(func=chat)

    with_query(with_model(sub.add_parser("route", help="print the routing trace as JSON"))).set_defaults(func=route)

    p = sub.add_parser("upcycle", help="dense Qwen2.5-VL checkpoint -> Metis-HOME")
    p.add_argument("source")
    p.add_argument("out")
    p.add_argument("--thinking-expert", type=int, default=0)
    p.set_defaults(func=upcycle)

    p = sub.add_parser("export-experts", help="Metis-HOME -> two stock Qwen2.5-VL experts + a router (for vLLM)")
    p.add_argument("checkpoint", help="checkpoint folder, Hub id, or 'tiny' for the embedded model")
    p.add_argument("out", help="folder to write think/, direct/ and router/ into")
    p.set_defaults(func=export_experts)

    p = sub.add_parser("size", help="parameters, bf16 weight and KV-cache memory, Spaces GPU tiers")
    p.add_argument("checkpoint", nargs="?", default=str(PUBLISHED_CONFIG),
                   help="checkpoint folder (tensor shapes) or config.json (default: the published config)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=size)

    p = with_model(sub.add_parser("eval", help="evaluate your questions (--data) in the three modes, or the tiny "
                                               "world's held-out splits and natural questions"))
    p.add_argument("--limit", type=int, default=None,
                   help="with --data: the first N questions; else shapes questions per split (default 300)")
    p.add_argument("--natural", type=int, default=400, help="held-out natural questions (without --data)")
    p.add_argument("--json", default=None)
    from .evaluation.cli import add_arguments as add_evaluation_arguments

    add_evaluation_arguments(p)
    p.set_defaults(func=evaluate)

    from .finetune.cli import add_arguments

    p = sub.add_parser("finetune", help="fine-tune the router on labelled queries")
    add_arguments(p)
    p.set_defaults(func=finetune)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:  # bad input: one clear line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
