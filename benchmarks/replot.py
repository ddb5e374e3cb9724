"""Redraw the PNG of every table result under benchmarks/results/ from its JSON (no benchmark is re-run)."""

from __future__ import annotations

import glob
import importlib
import json
import os

import _common


def main() -> int:
    for path in sorted(glob.glob(os.path.join(_common.RESULTS, "table*.json"))):
        with open(path) as f:
            data = json.load(f)
        module = importlib.import_module(data["experiment"])
        module.plot(data, path[: -len(".json")] + ".png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
