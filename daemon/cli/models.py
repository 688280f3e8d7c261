"""``olmd models import DIR`` and ``olmd models export NAME... DIR``: olmd's blob cache to
and from an Ollama models directory (``~/.ollama/models``), for fleets without internet.

Exit status: 0 every model done, 1 one was refused (named, with why), 2 settings error.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from daemon.cli.common import EXIT_FAILURE, EXIT_OK, add_config_option, settings_from
from daemon.distribution.mirror import cache_from_settings
from daemon.distribution.offline import Report, export_models, import_models


def register(subparsers: Any) -> None:
    models = subparsers.add_parser(
        "models",
        help="fill olmd's blob cache from an Ollama models directory, or write one from it",
        description="Offline fleets: copy models between olmd's blob cache "
        "([distribution] cache_dir) and an Ollama models directory (manifests/ and blobs/, "
        "as in ~/.ollama/models). Every blob is checked against its digest.",
    )
    add_config_option(models)
    sub = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    imp = sub.add_parser("import", help="copy every model of DIR into the cache")
    imp.add_argument("dir", metavar="DIR", type=Path, help="an Ollama models directory")
    imp.set_defaults(func=_cmd_import)
    exp = sub.add_parser("export", help="write cached models as an Ollama models directory")
    exp.add_argument("names", metavar="NAME", nargs="+", help="models, e.g. llama3.1:8b")
    exp.add_argument("dir", metavar="DIR", type=Path, help="where to write them")
    exp.set_defaults(func=_cmd_export)
    for action in (imp, exp):
        add_config_option(action)


def _print(report: Report, verb: str) -> int:
    for name, digest in report.done:
        print(f"{verb} {name} {digest}")
    for name, why in report.failed.items():
        print(f"refused {name}: {why}")
    return EXIT_FAILURE if report.failed else EXIT_OK


def _cmd_import(args: argparse.Namespace) -> int:
    cache = cache_from_settings(settings_from(args))
    return _print(import_models(cache, args.dir.expanduser()), "imported")


def _cmd_export(args: argparse.Namespace) -> int:
    cache = cache_from_settings(settings_from(args))
    return _print(export_models(cache, args.names, args.dir.expanduser()), "exported")
