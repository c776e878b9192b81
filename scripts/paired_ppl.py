"""Paired perplexity differences against KVzip from `kvfast eval ppl` results.

    python scripts/paired_ppl.py RESULTS.json [RESULTS.json ...]

Every method is compared with the `kvzip` row of the same ratio on the same windows: the mean
of the per-window NLL differences as a perplexity change, its standard error, and the windows
it wins. Pairing removes the window-to-window spread that dominates unpaired PPL deltas.
"""

from __future__ import annotations

import json
import sys

import numpy as np


def main(paths: list[str]) -> None:
    nll: dict[str, np.ndarray] = {}
    for path in paths:
        for row in json.load(open(path))["rows"]:
            if "window_nll" in row:
                nll[row["key"]] = np.asarray(row["window_nll"])
    print("| method @ ratio | PPL vs kvzip (paired) | std. error | windows won |")
    print("|---|---|---|---|")
    for key, v in sorted(nll.items()):
        if "@" not in key or key.startswith("kvzip@"):
            continue
        base = nll.get("kvzip@" + key.rsplit("@", 1)[1])
        if base is None:
            continue
        d = v - base
        change, err = 100 * (np.exp(d.mean()) - 1), 100 * d.std(ddof=1) / np.sqrt(len(d))
        print(f"| {key} | {change:+.2f}% | {err:.2f} | {int((d < 0).sum())}/{len(d)} |")


if __name__ == "__main__":
    main(sys.argv[1:])
