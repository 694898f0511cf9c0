"""The benchmark report: ``write_report(rows_or_path, out_dir)`` writes ``out_dir/README.md`` and its
PNG figures (``speedup_vs_frames.png``, ``backends_<suite>_<op>_<mode>.png``, ``roofline.png``) from
the rows of stdit.bench.results.

The numbers come from stdit.bench.analysis, the figures from stdit.bench.figures and the text from
stdit.bench.markdown. Everything is validated and rendered in memory before the first file is
written, and each file is replaced atomically. Only README.md and the PNG names generated here are
written inside ``out_dir``; a README.md or PNG of the same name that the report did not write is
refused (FileExistsError), never overwritten.
"""

from __future__ import annotations

from pathlib import Path

from stdit.common.files import write_bytes, write_text

from .analysis import frame, load_rows, published_points
from .figures import PNG_MARKER, draw_figures, png_bytes
from .markdown import MARKER, readme_text

__all__ = ["write_report"]

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_ours_png(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return head.startswith(_PNG_MAGIC) and PNG_MARKER.encode() in head


def _is_ours_readme(path: Path) -> bool:
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            return f.readline().strip() == MARKER
    except OSError:
        return False


def write_report(rows_or_path, out_dir, *, title: str | None = None, published: list[dict] | None = None) -> Path:
    """Write ``out_dir/README.md`` and its PNG figures from results rows (a list of row dicts, a
    DataFrame of them, or a results file path read with ``results.read_rows``); returns the README path.

    Raises ResultsError for an unreadable/corrupt results file and ValueError for no rows, before
    anything is written; FileExistsError if README.md or a figure name in out_dir is a file the
    report did not write. ``published`` is Open-Sora's published points (default: the cost model's,
    ``stdit.models.costs.opensora_flop_ratios``)."""
    df = frame(load_rows(rows_or_path))
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out_dir: {out} exists and is not a folder")
    pub = published_points(published)
    figs, skipped = draw_figures(df, pub)
    try:
        blobs = {f.filename: png_bytes(f.fig, metadata={"Software": PNG_MARKER}) for f in figs}
    finally:
        for f in figs:
            f.fig.clear()  # free the artists now rather than at garbage collection
    text = readme_text(df, figs, skipped, pub, title)
    readme = out / "README.md"
    if readme.exists() and not _is_ours_readme(readme):
        raise FileExistsError(f"{readme} exists and was not written by stdit.bench.report; not overwriting it")
    for name in blobs:
        p = out / name
        if p.exists() and not _is_ours_png(p):
            raise FileExistsError(f"{p} exists and was not written by stdit.bench.report; not overwriting it")
    for name, data in blobs.items():
        write_bytes(out / name, data)
    write_text(readme, text)
    return readme
