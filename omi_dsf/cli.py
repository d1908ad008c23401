"""`python -m omi_dsf …`: one entry point, subcommands contributed by the parts.

Each part owns its command line in `omi_dsf/<part>/cli.py`, which exposes
`register(subparsers)`; the parser it adds sets `func(args) -> int`. Parts are
imported lazily so that a part's heavy imports cost nothing to the others.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from omi_dsf.errors import UserError
from omi_dsf.terminal import printable

# (module, commands it registers) -- the command names let `--help` stay cheap.
PARTS: list[tuple[str, tuple[str, ...]]] = [
    ("omi_dsf.generate.cli", ("build", "validate")),
    ("omi_dsf.config.cli", ("config-docs",)),
    ("omi_dsf.testbed.cli", ("testbed",)),
    ("omi_dsf.fhirstore.cli", ("fhir-store",)),
    ("omi_dsf.worker.cli", ("worker", "audit")),
    ("omi_dsf.dicomweb.cli", ("gateway",)),
    ("omi_dsf.inference.cli", ("ai-service",)),
    ("omi_dsf.deid.cli", ("deid",)),
    ("omi_dsf.registry.cli", ("registry",)),
    ("omi_dsf.client.cli", ("services", "submit", "status", "results")),
    ("omi_dsf.demo", ("demo", "sample-study")),   # the harness's commands (omi_dsf/testkit)
]


def _error_line(text: str) -> str:
    return "error: " + printable(text, lines=False)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr, exit code 2 (the usage itself is one `--help` away)."""

    def error(self, message: str):
        self.exit(2, f"{_error_line(message)} (see {self.prog} --help)\n")


def _parser(wanted: str | None) -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m omi_dsf", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module, commands in PARTS:
        if wanted is not None and wanted not in commands:
            continue
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("omi_dsf"):
                continue  # part not built yet
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    wanted = next((a for a in argv if not a.startswith("-")), None)
    parser = _parser(wanted)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # HTTP client libraries log every request URL at INFO; URLs can carry UIDs
    for noisy in ("httpx", "httpcore", "websockets"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(_error_line(str(exc)), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:   # a case no part foresaw: still one line, the traceback only with -v
        if args.verbose:
            logging.getLogger(__name__).exception("%s failed", args.command)
        detail = str(exc).strip() or "no detail"
        print(_error_line(f"{type(exc).__name__}: {detail}") + ("" if args.verbose else " (-v for details)"),
              file=sys.stderr)
        return 2


def omi_main() -> int:
    """The `omi` console script: the same commands as `python -m omi_dsf` (docs/registry.md shows the
    client's: services, submit, status, results)."""
    return main()
