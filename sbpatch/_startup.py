"""Run at interpreter start by ``sbpatch.pth`` when ``SBPATCH`` is set to anything but an off value (``0``, ``false``,
``none``...: the .pth line checks those itself and imports nothing): enable the libraries it names.

Cheap: ``enable()`` imports neither torch nor the libraries; their shims wait for an import hook. Never raises: a
bad value prints one line to stderr and patches nothing; a named library that cannot be enabled (missing,
unsupported version) prints one line and the others are enabled; the program runs on.
"""

from __future__ import annotations

import os
import sys


def start() -> None:
    try:
        from sbpatch import config, registry

        libraries = config.parse_libraries(os.environ.get(config.ENV_VAR), list(registry.INTEGRATIONS))
        if libraries is None:
            return
        if not libraries:
            registry.enable()
        for name in libraries:
            try:
                registry.enable(name)
            except registry.DidNotEnable as exc:
                print(f"sbpatch: {config.ENV_VAR}: {exc}", file=sys.stderr)
    except Exception as exc:  # never break the user's program at start-up
        print(f"sbpatch: {exc}", file=sys.stderr)


start()
