"""Build pytext.u8, the small dataset examples/train.py reads: Python's own licence and the
docstrings of its standard library (modules, classes, functions), as bytes (a byte-level
tokenizer: token = byte, vocabulary 256), stored one uint8 per token.

    python examples/data/make_pytext.py            # writes examples/data/pytext.u8 (~400 KB)

The text comes from the Python that runs this script, so the file differs slightly between
Python versions; the bundled one was made with CPython 3.11.7."""

import ast
import sys
import sysconfig
from pathlib import Path

LIMIT = 400_000  # bytes: the repository keeps it under 1 MB


def main():
    lib = Path(sysconfig.get_paths()["stdlib"])
    parts = [(lib / "LICENSE.txt").read_text(errors="replace")]
    for path in sorted(lib.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in [tree] + [n for n in ast.walk(tree) if isinstance(
                n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]:
            doc = ast.get_docstring(node)
            if doc and len(doc) > 80:
                parts.append(doc)
    data = "\n\n".join(parts).encode("utf-8")[:LIMIT]
    out = Path(__file__).with_name("pytext.u8")
    out.write_bytes(data)
    print(f"{out}: {len(data)} tokens (bytes) from {len(parts)} texts, Python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
