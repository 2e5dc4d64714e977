"""Report files shared by every benchmark of bench/: `<name>-<stamp>.json` (the whole document)
beside `<name>-<stamp>.md` (the same as tables, for people)."""

from __future__ import annotations

import datetime
import json
from pathlib import Path


def stamp() -> str:
    """The date and time that names a run's files: 20261121-231000."""
    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def write_json_and_markdown(out_dir: str | Path, stem: str, doc: dict, markdown: str) -> Path:
    """Write `out_dir/stem.json` and `out_dir/stem.md` (the folder is made if missing); returns
    the markdown's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(doc, indent=1, default=str))
    (out_dir / f"{stem}.md").write_text(markdown)
    return out_dir / f"{stem}.md"
