"""Redraw the PNGs under benchmarks/results/ from their JSON (no benchmark is re-run).

``table*.json``: each experiment's own ``plot``. ``sbpatch bench --json`` results (``bench_default.json``, ...) that
have a PNG next to them: :func:`sbpatch.bench.report.replot` (log-scale speed-ups with the rounds' spread).
"""

from __future__ import annotations

import glob
import importlib
import json
import os

import _common

from sbpatch.bench import report


def main() -> int:
    for path in sorted(glob.glob(os.path.join(_common.RESULTS, "*.json"))):
        png = path[: -len(".json")] + ".png"
        with open(path) as f:
            data = json.load(f)
        if "experiment" in data and os.path.basename(path).startswith("table"):
            importlib.import_module(data["experiment"]).plot(data, png)
        elif "rows" in data and "config" in data and os.path.exists(png):  # a `sbpatch bench --json` result
            report.replot(path, png)
        else:
            continue
        print(f"redrew {os.path.relpath(png)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
