"""Plumbing every `kvfast eval` subcommand shares: options, method specs, the results file (with
resume), Markdown tables and plots."""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import os
import platform
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvfast import Session, __version__
from kvfast.compaction import METHODS, CompactionReport

#: Points (x, y) per method name, for `plot_lines`.
Series = dict[str, list[tuple[float, float]]]

DATA = Path(__file__).resolve().parents[1] / "data"
#: The text the subcommands fall back to (a chapter of Moby-Dick, public domain), so every
#: command runs on a fresh install; pass WikiText-2 / the RULER essays for real numbers.
DEFAULT_TEXT = DATA / "moby_dick_ch1.txt"
#: Session.compact's keyword options, which a method spec may set.
_COMPACT_OPTIONS = set(inspect.signature(Session.compact).parameters) - {"self", "ratio", "budget"}
#: Options whose values are words only (`fit=none` is the string "none", not None); an option
#: whose default is a word but that also takes numbers (`ridge="auto"`) parses as a value.
_WORD_OPTIONS = {
    name
    for name, p in inspect.signature(Session.compact).parameters.items()
    if isinstance(p.default, str) and "float" not in str(p.annotation)
}


@dataclass(frozen=True)
class MethodSpec:
    """One entry of `--methods`: "full", "am", or "am:queries=context:head_budgets=uniform";
    `kv=int8|int4|int2` (on full or a method) stores the cache quantized from the prefill on."""

    name: str
    method: str | None  # None: the full cache
    options: dict[str, Any] = field(default_factory=dict)
    kv_dtype: str | None = None

    @property
    def is_full(self) -> bool:
        return self.method is None


def _value(text: str) -> Any:
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return {"none": None, "true": True, "false": False}.get(text.lower(), text)


def parse_methods(text: str) -> list[MethodSpec]:
    """`--methods`: a comma list of `full` and `method[:option=value...]`."""
    specs = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        name, *opts = item.split(":")
        kv = [o.partition("=")[2].strip() for o in opts if o.partition("=")[0].strip() == "kv"]
        opts = [o for o in opts if o.partition("=")[0].strip() != "kv"]
        kv_dtype = kv[-1] if kv else None
        if name == "full":
            if opts:
                raise ValueError(f"method spec {item!r}: 'full' takes no options but kv=")
            specs.append(MethodSpec(item, None, kv_dtype=kv_dtype))
            continue
        if name not in METHODS:
            raise ValueError(
                f"unknown method {name!r} in {item!r}; expected full or one of {', '.join(METHODS)}"
            )
        options: dict[str, Any] = {}
        for o in opts:
            key, eq, val = o.partition("=")
            key = key.strip().replace("-", "_")
            if not eq or key not in _COMPACT_OPTIONS:
                raise ValueError(
                    f"method spec {item!r}: bad option {o!r}; expected name=value with name one "
                    f"of {', '.join(sorted(_COMPACT_OPTIONS - {'method'}))}"
                )
            if key == "beta_bounds" and val.strip().lower() != "none":
                # A pair has no comma here (commas split methods): "low/high".
                lo, slash, hi = val.partition("/")
                if not slash:
                    raise ValueError(f"method spec {item!r}: beta_bounds is low/high, got {val!r}")
                options[key] = (float(lo), float(hi))
                continue
            options[key] = val.strip() if key in _WORD_OPTIONS else _value(val.strip())
        specs.append(MethodSpec(item, name, options, kv_dtype))
    if not specs:
        raise ValueError("--methods is empty")
    return specs


def floats(text: str | None) -> list[float]:
    """A comma list of numbers (`--ratios`, `--budgets`); empty gives []."""
    return [float(x) for x in (text or "").split(",") if x.strip()]


@dataclass(frozen=True)
class Cell:
    """One measurement setting: a method at a ratio or a budget (the full cache at neither)."""

    spec: MethodSpec
    ratio: float | None = None
    budget: int | None = None

    @property
    def key(self) -> str:
        if self.spec.is_full:
            return self.spec.name
        at = f"{self.ratio:g}x" if self.ratio is not None else f"budget={self.budget}"
        return f"{self.spec.name}@{at}"

    def reset(self, s: Session) -> None:
        """Empties `s`'s cache and stores it as this cell says (`kv=`)."""
        s.reset()
        s.kv_dtype = self.spec.kv_dtype

    def prefill(self, s: Session, ids: list[int]) -> None:
        """`reset`, then prefills `ids`."""
        self.reset(s)
        s.prefill(ids, logits=None)

    def compact(self, s: Session, **extra: Any) -> CompactionReport | None:
        """Compacts `s`'s cache as this cell says (nothing for the full cache)."""
        method = self.spec.method
        if method is None:
            return None
        n = self.budget if self.budget is not None else s.cache_len / float(self.ratio or 1)
        # Keep the exact recent window inside the budget on short contexts.
        kw: dict[str, Any] = {"recent": int(min(64, n // 4)), **extra, **self.spec.options}
        return s.compact(ratio=self.ratio, budget=self.budget, method=method, **kw)


def cells(args: argparse.Namespace) -> list[Cell]:
    specs = parse_methods(args.methods)
    ratios, budgets = floats(args.ratios), [int(b) for b in floats(args.budgets)]
    if any(r < 1 for r in ratios) or any(b < 1 for b in budgets):
        raise ValueError("--ratios must be >= 1 and --budgets >= 1")
    has_compacting = any(not s.is_full for s in specs)
    if has_compacting and not ratios and not budgets:
        raise ValueError("give --ratios and/or --budgets for the compaction methods")
    out = []
    for s in specs:
        if s.is_full:
            out.append(Cell(s))
        else:
            out += [Cell(s, ratio=r) for r in ratios] + [Cell(s, budget=b) for b in budgets]
    # The full cache first: every delta is taken against it.
    return sorted(out, key=lambda c: not c.spec.is_full)


def add_common(p: argparse.ArgumentParser, methods: str, ratios: str) -> None:
    p.add_argument("--model", default=None, help="checkpoint dir or hub id (default: qwen3-tiny)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument(
        "--methods",
        default=methods,
        help=f"comma list: full and methods, with options as am:queries=context (default: "
        f"{methods})",
    )
    p.add_argument("--ratios", default=ratios, help=f"compaction ratios (default: {ratios})")
    p.add_argument("--budgets", default="", help="keys per head, instead of or beside --ratios")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="at most this many cases/windows")
    p.add_argument("--out", type=Path, required=True, help="results folder")


def model_fingerprint(path: Path) -> str:
    """sha256 of config.json and, per weight file (or the one GGUF file), its name, size and
    first MiB: tells two checkpoints apart without reading gigabytes."""
    h = hashlib.sha256()
    if path.is_file():  # a GGUF checkpoint
        files = [path]
    else:
        files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".safetensors"))
    for f in files:
        h.update(f.name.encode())
        h.update(str(f.stat().st_size).encode())
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


class Results:
    """`OUT/results.json`: the run's identity and one row per measured cell. A rerun with the
    same identity resumes: the cells already in the file are not measured again."""

    def __init__(self, out: Path, subcommand: str, args: argparse.Namespace, s: Session):
        self.out = out
        self.path = out / "results.json"
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        config = {k: v for k, v in config.items() if k not in ("func", "eval_command")}
        self.data: dict[str, Any] = {
            "subcommand": subcommand,
            "kvfast": __version__,
            "command": _command_line(),
            "config": config,
            "model": str(s.model_path),
            "model_hash": model_fingerprint(s.model_path),
            "device": s.device,
            "dtype": s.dtype,
            "host": platform.node(),
            "threads": os.environ.get("RAYON_NUM_THREADS", str(os.cpu_count())),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "rows": [],
        }
        if self.path.is_file():
            old = json.loads(self.path.read_text())
            same = ("subcommand", "model_hash", "device", "dtype")
            if any(old.get(k) != self.data[k] for k in same):
                raise ValueError(
                    f"{self.path} holds another run ({old.get('subcommand')} on "
                    f"{old.get('model')}, {old.get('device')}/{old.get('dtype')}); "
                    "use another --out"
                )
            # Resuming may add methods and ratios; anything that changes the cases may not.
            # Options a newer kvfast added (absent from the old file) do not count either.
            free = {"methods", "ratios", "budgets", "out", "model", "peer", "peer_presses"}
            before = old.get("config", {})
            changed = sorted(
                k for k in config.keys() & before.keys() if k not in free and config[k] != before[k]
            )
            if changed:
                raise ValueError(
                    f"{self.path} was measured with other settings ({', '.join(changed)}); "
                    "rerun with the same ones to resume, or use another --out"
                )
            self.data["rows"] = old.get("rows", [])
            if "note" in old:  # what a person wrote about the rows stays with them
                self.data["note"] = old["note"]
        out.mkdir(parents=True, exist_ok=True)

    @property
    def rows(self) -> list[dict[str, Any]]:
        return list(self.data["rows"])

    def done(self, key: str) -> bool:
        return any(r["key"] == key for r in self.data["rows"])

    def row(self, key: str) -> dict[str, Any] | None:
        return next((r for r in self.data["rows"] if r["key"] == key), None)

    def add(self, row: dict[str, Any]) -> None:
        self.data["rows"] = [r for r in self.data["rows"] if r["key"] != row["key"]] + [row]
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=_jsonable))
        tmp.replace(self.path)  # atomic: an interrupted run never leaves a torn file


def _command_line() -> str:
    """How the run was started: `kvfast eval ...` for the script and for `python -m`."""
    prog = Path(sys.argv[0]).name
    args = sys.argv[1:]
    if prog == "__main__.py":  # python -m kvfast.eval
        prog = "kvfast eval"
    return " ".join([prog, *args])


def _jsonable(x: Any) -> Any:
    if hasattr(x, "tolist"):
        return x.tolist()
    raise TypeError(f"cannot store {type(x).__name__} in results.json")


def cell_row(cell: Cell, **metrics: Any) -> dict[str, Any]:
    return {
        "key": cell.key,
        "method": cell.spec.name,
        "ratio": cell.ratio,
        "budget": cell.budget,
        **metrics,
    }


def progress(items: Iterable[Any], total: int, desc: str) -> Iterator[Any]:
    """A tqdm bar on stderr (it stays quiet for runs under a couple of seconds)."""
    from tqdm import tqdm  # type: ignore[import-untyped]

    yield from tqdm(items, total=total, desc=desc, file=sys.stderr, delay=2.0, leave=False)


def fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        if math.isnan(x) or math.isinf(x):
            return str(x)
        return f"{x:.{digits}f}"
    return str(x)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def mib(nbytes: float | None) -> str:
    return "" if nbytes is None else f"{nbytes / 2**20:.2f}"


def write_markdown(out: Path, title: str, results: Results, body: str, plots: list[str]) -> Path:
    d = results.data
    lines = [
        f"# {title}",
        "",
        f"`{d['command']}`  ",
        f"model {d['model']} (hash {d['model_hash']}), {d['device']}/{d['dtype']}, "
        f"kvfast {d['kvfast']}, {d['threads']} threads, {d['started']}",
        "",
        body,
        "",
    ]
    lines += [f"![{p}]({p})" for p in plots]
    path = out / "results.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def plot_lines(
    path: Path,
    title: str,
    ylabel: str,
    series: Series,
    baseline: float | None = None,
    xlabel: str = "compaction ratio",
) -> str | None:
    """Metric vs `xlabel` (log2 axis), one line per method; `baseline` (full cache) dashed."""
    plt = _pyplot()
    if plt is None or not series:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in series.items():
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    if baseline is not None:
        ax.axhline(baseline, color="black", linestyle="--", linewidth=1, label="full")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda x, _: f"{x:g}"))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def plot_heatmap(
    path: Path, title: str, grid: list[list[float]], rows: list[str], cols: list[str]
) -> str | None:
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * len(cols), 1.2 + 0.5 * len(rows)))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for i, line in enumerate(grid):
        for j, v in enumerate(line):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k")
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("context length")
    ax.set_ylabel("needle depth")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "kvfast eval: matplotlib is not installed, no plots (pip install 'kvfast[plot]')",
            file=sys.stderr,
        )
        return None
    return plt


def load_text(path: Path) -> str:
    """A text file, or RULER's PaulGrahamEssays.json (its "text" field)."""
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path}")
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            return str(json.loads(raw)["text"])
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: expected a JSON object with a 'text' field ({e})") from e
    return raw
