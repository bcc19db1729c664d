"""python -m recsys_moe.report DIR [--out FILE]: one self-contained HTML page for a run directory
(what recsys_moe.train writes) or a sweep directory (a Hydra multirun of it)."""

from __future__ import annotations

import argparse
from pathlib import Path

from recsys_moe.report.html import render


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split(":")[0])
    p.add_argument("dir", type=Path, help="a run directory or a sweep (multirun) directory")
    p.add_argument("--out", type=Path, help="HTML file to write (default: DIR/report.html)")
    p.add_argument("--figures", type=Path, help="also write each figure as a PNG into this folder")
    a = p.parse_args(argv)
    if not a.dir.is_dir():
        p.error(f"{a.dir}: not a directory")
    try:
        out = render(a.dir, a.out, a.figures)
    except FileNotFoundError as e:
        p.error(str(e))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
