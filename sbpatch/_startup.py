"""Run at interpreter start by ``sbpatch.pth`` when ``SBPATCH`` is set: enable the libraries it names.

Never raises: a bad value prints one line to stderr and patches nothing; the program runs on.
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
        registry.enable(*libraries)
    except Exception as exc:  # never break the user's program at start-up
        print(f"sbpatch: {exc}", file=sys.stderr)


start()
