"""Rewrite the golden files: ``python -m tests.golden.update`` (from the repository root).

The one way to change a golden file. The test never writes them: a test that rewrites
its own expectation passes whatever the renderer does. Review ``git diff tests/golden``
after running this, as you would review a change to the expectations of any test.
"""

from __future__ import annotations

import sys

from tests.golden.cases import CASES, ROOT


def main() -> int:
    for case in CASES:
        text = case.render()
        old = case.path.read_text() if case.path.exists() else None
        if text != old:
            case.path.parent.mkdir(parents=True, exist_ok=True)
            case.path.write_text(text)
        state = "unchanged" if text == old else ("written" if old is None else "UPDATED")
        print(f"{state:>9}  {case.path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
