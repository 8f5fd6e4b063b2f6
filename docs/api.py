"""Build kvprobe's API reference, offline, from its docstrings (pdoc).

    pip install -e ".[docs]"                     # pdoc (the `dev` extra has it too)
    python docs/api.py                           # writes docs/api/index.html (about 15 s, 18 MB)
    python docs/api.py --out /tmp/api            # elsewhere

Every library module is documented: the packages' `__all__` names what each package exports, so
pdoc is given each module by name (`modules()`), not the top package alone. The command line
(`kvprobe.cli`) is documented in docs/cli.md instead. Nothing is fetched: pdoc renders local HTML
with its own bundled assets.
"""

from __future__ import annotations

import argparse
import pkgutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
SKIP = ("kvprobe.cli", "kvprobe.__main__")  # the command line: docs/cli.md; __main__ runs it


def modules() -> list[str]:
    """kvprobe and every module under it, but the command line."""
    import kvprobe

    found = (m.name for m in pkgutil.walk_packages(kvprobe.__path__, "kvprobe."))
    return ["kvprobe", *sorted(name for name in found if not name.startswith(SKIP))]


def build(out: Path, names: list[str] | None = None) -> Path:
    """Render the reference of `names` (default: `modules()`) into `out`; returns its index.html."""
    import pdoc

    pdoc.render.configure(docformat="google", search=True, show_source=False)
    pdoc.pdoc(*(names or modules()), output_directory=out)
    return out / "index.html"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=HERE / "api", help="output folder (default: docs/api)")
    args = ap.parse_args()
    print(f"API reference: {build(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
