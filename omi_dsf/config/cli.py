"""`python -m omi_dsf config-docs [--check]`: the option tables in the docs, from the configuration models."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def register(sub) -> None:
    p = sub.add_parser("config-docs", help="write the option tables in docs/*.md from the configuration models")
    p.add_argument("--check", action="store_true", help="only report pages whose tables are out of date (exit 1)")
    p.add_argument("--root", type=Path, default=ROOT, help="the project folder (default: this checkout)")
    p.set_defaults(func=run)


def run(args) -> int:
    from omi_dsf.config.docs import update

    stale = update(args.root, check=args.check)
    for page in stale:
        print(f"{'out of date' if args.check else 'updated'}: {page.relative_to(args.root)}")
    return 1 if args.check and stale else 0
