"""`kvfast eval report DIR [DIR ...]`: one Markdown page (and an HTML page) from the results
folders of any subcommands, with their tables and plots."""

from __future__ import annotations

import argparse
import html
import json
import re
import shutil
from pathlib import Path


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("folders", type=Path, nargs="+", help="results folders (with results.json)")
    p.add_argument("--out", type=Path, required=True, help="folder for report.md / report.html")
    p.add_argument("--title", default="kvfast evaluation")


def render(args: argparse.Namespace) -> tuple[Path, Path]:
    args.out.mkdir(parents=True, exist_ok=True)
    parts = [f"# {args.title}", ""]
    for folder in args.folders:
        md = folder / "results.md"
        if not (folder / "results.json").is_file() or not md.is_file():
            raise FileNotFoundError(
                f"{folder}: no results.json / results.md (not a results folder)"
            )
        sub = json.loads((folder / "results.json").read_text())["subcommand"]
        text = md.read_text()

        # Plots are copied beside the report, prefixed with the folder's name.
        def copy(m: re.Match[str], folder: Path = folder) -> str:
            src = folder / m.group(2)
            dst = f"{folder.name}-{m.group(2)}"
            if src.resolve() != (args.out / dst).resolve():
                shutil.copyfile(src, args.out / dst)
            return f"![{m.group(1)}]({dst})"

        text = re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", copy, text)
        # Demote the folder page's headings one level under the report's title.
        text = re.sub(r"^(#+) ", lambda m: "#" + m.group(1) + " ", text, flags=re.M)
        parts += [f"<!-- {folder} ({sub}) -->", text.strip(), ""]
    md_path = args.out / "report.md"
    md_path.write_text("\n".join(parts) + "\n")
    html_path = args.out / "report.html"
    html_path.write_text(to_html(md_path.read_text(), args.title))
    return md_path, html_path


def to_html(md: str, title: str) -> str:
    """The Markdown this package writes (headings, tables, images, code, paragraphs) as HTML."""
    out: list[str] = []
    table: list[str] = []
    para: list[str] = []

    def inline(t: str) -> str:
        t = html.escape(t)
        t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
        return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", t)

    def flush() -> None:
        if para:
            out.append("<p>" + " ".join(inline(p) for p in para) + "</p>")
            para.clear()
        if table:
            rows = [r for r in table if not re.fullmatch(r"\|(\s*-+\s*\|)+", r.replace(" ", ""))]
            cells = [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows]
            head, *body = cells
            out.append("<table><tr>" + "".join(f"<th>{inline(c)}</th>" for c in head) + "</tr>")
            out.extend("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in body)
            out.append("</table>")
            table.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            if para:
                flush()
            table.append(line)
            continue
        if table:
            flush()
        if m := re.match(r"(#+) (.*)", line):
            flush()
            n = len(m.group(1))
            out.append(f"<h{n}>{inline(m.group(2))}</h{n}>")
        elif m := re.fullmatch(r"!\[([^\]]*)\]\(([^)]+)\)", line.strip()):
            flush()
            out.append(f'<img src="{html.escape(m.group(2))}" alt="{html.escape(m.group(1))}">')
        elif line.startswith("<!--"):
            flush()
            out.append(line)
        elif not line.strip():
            flush()
        else:
            para.append(line.strip())
    flush()
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:"
        "collapse}td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}img{max-width:560px}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
        f"</title><style>{style}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n"
    )
