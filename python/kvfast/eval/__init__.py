"""`kvfast eval SUBCOMMAND` (also `python -m kvfast.eval`): what the model can still do after
compaction, side by side with other methods at the same memory.

Subcommands: ppl, needle, qa, fidelity, speed (each measures, writes OUT/results.json,
OUT/results.md and PNG plots, and resumes from an existing OUT/results.json), and report
(renders results folders into one Markdown and HTML page).
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

from kvfast import Session
from kvfast.eval import fidelity, needle, peers, ppl, qa, report, speed
from kvfast.eval.common import Results

MEASURE: dict[str, ModuleType] = {
    "ppl": ppl,
    "needle": needle,
    "qa": qa,
    "fidelity": fidelity,
    "speed": speed,
}


def add_subcommands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    for name, mod in MEASURE.items():
        doc = (mod.__doc__ or "").strip()
        p = sub.add_parser(
            name,
            help=doc.split("\n")[0],
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        mod.add_args(p)
        p.set_defaults(eval_command=name)
    r = sub.add_parser("report", help=(report.__doc__ or "").split("\n")[0])
    report.add_args(r)
    r.set_defaults(eval_command="report")


def run(args: argparse.Namespace) -> int:
    """Runs a parsed `kvfast eval` command; prints where its pages went."""
    if args.eval_command == "report":
        md, page = report.render(args)
        print(f"wrote {md} and {page}")
        return 0
    mod = MEASURE[args.eval_command]
    s = Session.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    results = Results(args.out, args.eval_command, args, s)
    peer = peers.open_peer(args, s.model_path, s.device, s.dtype) if hasattr(args, "peer") else None
    try:
        if peer is None:
            mod.run(args, s, results)
        else:
            mod.run(args, s, results, peer)
    except KeyboardInterrupt:
        print(
            f"\ninterrupted; rerun the same command to resume from {results.path}", file=sys.stderr
        )
        raise
    page = mod.report(args, results)
    print(page.read_text())
    print(f"wrote {results.path} and {page}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m kvfast.eval ...` is `kvfast eval ...`."""
    from kvfast.cli import main as cli_main

    return cli_main(["eval", *(sys.argv[1:] if argv is None else argv)])
