"""The `factorkv` command.

Subcommands are modules listed in :data:`SUBCOMMANDS` (imported by name, so that this
module imports none of them statically). A subcommand module provides

* ``HELP``: a one-line summary (shown by ``factorkv --help``; importing the module
  must be cheap: import vLLM/torch inside functions, not at module level);
* ``DESCRIPTION`` (optional) and ``add_arguments(parser)``: its arguments, added to the
  parser this module makes; or instead ``add_parser(subparsers) -> ArgumentParser`` when it
  needs another parser class (:func:`add_subcommand_parser`, e.g. vLLM's
  FlexibleArgumentParser for `serve`);
* ``run(args) -> int | None``: do the work; the return value is the exit status;
* optionally ``precheck(argv)``: cheap checks on the raw arguments, run before
  ``add_parser`` (e.g. to fail fast before importing vLLM).

Only the chosen subcommand's parser is built, so `factorkv prepare` does
not pay for importing vLLM. User errors raise :class:`server.errors.CLIError`
(or argparse usage errors) and print one line ``factorkv: error: ...`` to stderr,
exit status 2 for usage errors; never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import version
from typing import NoReturn

from server.errors import CLIError

PROG = "factorkv"

#: (name, module) of every subcommand, in help order.
SUBCOMMANDS: list[tuple[str, str]] = [
    ("serve", "server.serve"),
    ("prepare", "server.prepare_cmd"),
    ("convert", "server.convert_cmd"),
    ("capacity", "server.capacity_cmd"),
    ("eval", "server.eval_cmd"),
]


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``factorkv: error: <message>`` (one line) and exit."""
    message = " ".join(str(message).split())
    sys.stderr.write(f"{PROG}: error: {message}\n")
    sys.stderr.flush()
    raise SystemExit(code)


class OneLineErrorMixin:
    """argparse errors as one line `factorkv: error: ...` (exit 2) instead of usage + error."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        fail(f"{message} (see `{self.prog} --help`)", 2)


class ArgumentParser(OneLineErrorMixin, argparse.ArgumentParser):
    pass


def add_subcommand_parser(subparsers: argparse._SubParsersAction, name: str,
                          parser_class: type[argparse.ArgumentParser] | None = None,
                          **kwargs) -> argparse.ArgumentParser:
    """``subparsers.add_parser(name, **kwargs)``, optionally with another parser class.

    argparse fixes the class per subparsers action; this swaps it for one call. The
    class gets the one-line error behaviour mixed in."""
    if parser_class is None:
        return subparsers.add_parser(name, **kwargs)
    if not issubclass(parser_class, OneLineErrorMixin):
        parser_class = type(f"OneLine{parser_class.__name__}", (OneLineErrorMixin, parser_class), {})
    saved = subparsers._parser_class
    subparsers._parser_class = parser_class
    try:
        return subparsers.add_parser(name, **kwargs)
    finally:
        subparsers._parser_class = saved


def _module(modname: str):
    return importlib.import_module(modname)


def _version() -> str:
    try:
        return version("factorkv")
    except Exception:  # noqa: BLE001
        return "unknown"


def build_parser(selected: str | None = None) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser | None]:
    """The top-level parser; only ``selected`` gets its full subparser (returned second)."""
    parser = ArgumentParser(
        prog=PROG,
        description="FactorKV: an OpenAI-compatible LLM server on vLLM with a compact KV cache.",
        epilog=f"Run `{PROG} COMMAND --help` for a command's options.",
    )
    parser.add_argument("-V", "--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    chosen = None
    for name, modname in SUBCOMMANDS:
        mod = _module(modname)
        if name == selected and hasattr(mod, "add_parser"):
            chosen = mod.add_parser(subparsers)
        elif name == selected:
            chosen = subparsers.add_parser(name, help=mod.HELP,
                                           description=getattr(mod, "DESCRIPTION", None))
            mod.add_arguments(chosen)
        if name == selected:
            chosen.set_defaults(_run=mod.run)
        else:
            subparsers.add_parser(name, help=getattr(mod, "HELP", None), add_help=False)
    return parser, chosen


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    names = [n for n, _ in SUBCOMMANDS]
    selected = argv[0] if argv and argv[0] in names else None
    try:
        if selected is not None:
            pre = getattr(_module(dict(SUBCOMMANDS)[selected]), "precheck", None)
            if pre is not None:
                pre(argv[1:])
        parser, sub = build_parser(selected)
        if sub is None:
            # No (known) subcommand: top-level help/version/usage error.
            if not argv:
                parser.print_help(sys.stderr)
                return 2
            parser.parse_args(argv)
            fail(f"unknown command {argv[0]!r} (choose from {', '.join(names)})")
        # Parse with the subcommand's own parser so parser classes that preprocess
        # argv in parse_args (vLLM's FlexibleArgumentParser) see the arguments.
        args = sub.parse_args(argv[1:])
        args.command = selected
        rc = args._run(args)
        return int(rc or 0)
    except CLIError as e:
        fail(str(e), e.code)
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130


def entry() -> None:
    raise SystemExit(main())


if __name__ == "__main__":
    # vLLM starts its engine with multiprocessing "spawn"; the guard keeps the child
    # from re-running the CLI when it re-imports __main__.
    entry()
