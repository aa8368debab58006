"""``flashmoe COMMAND ...`` (or ``python -m flashmoe``): the ``flashmoe-*`` console scripts under one
name, so ``flashmoe run ...`` is ``flashmoe-run ...`` (same options and exit codes).

The commands are the installed ``flashmoe-<command>`` scripts (pyproject.toml's [project.scripts]).
"""

from __future__ import annotations

import sys
from importlib.metadata import EntryPoint, distribution

from .cli import EXIT_OK, EXIT_USAGE


def commands() -> dict[str, EntryPoint]:
    """``{"run": <flashmoe-run's entry point>, ...}``."""
    scripts = (ep for ep in distribution("flashmoe").entry_points if ep.group == "console_scripts")
    return {
        ep.name.removeprefix("flashmoe-"): ep for ep in scripts if ep.name.startswith("flashmoe-")
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    known = commands()
    usage = f"usage: flashmoe {{{','.join(known)}}} ...  (flashmoe COMMAND --help for its options)"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage, file=sys.stdout if argv else sys.stderr)
        return EXIT_OK if argv else EXIT_USAGE
    if argv[0] == "--version":
        print(f"flashmoe {distribution('flashmoe').version}")
        return EXIT_OK
    if argv[0] not in known:
        print(f"{usage}\nflashmoe: error: unknown command {argv[0]!r}", file=sys.stderr)
        return EXIT_USAGE
    return known[argv[0]].load()(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
