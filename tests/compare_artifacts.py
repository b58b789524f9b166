"""Compare two output directories of the pipeline file by file: every file byte for byte, plots (.png) aside.

``python tests/compare_artifacts.py DIR_A DIR_B`` prints each differing or missing file (for pickles, where their
loaded content differs, through :func:`artifact_checks.assert_same`) and exits 1 when any does.
"""

from __future__ import annotations

import sys
from pathlib import Path

SKIPPED_SUFFIXES = (".png",)


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.suffix not in SKIPPED_SUFFIXES}


def _content_difference(a: Path, b: Path) -> str:
    if a.suffix != ".pkl":
        return "bytes differ"
    import pandas as pd

    sys.path.insert(0, str(Path(__file__).parent))
    from artifact_checks import assert_same

    try:
        assert_same(pd.read_pickle(a), pd.read_pickle(b), a.name)
    except AssertionError as error:
        return f"content differs: {error}"
    return "bytes differ, loaded content equal"


def compare(dir_a: str | Path, dir_b: str | Path) -> list[str]:
    """One line per file that differs or exists on one side only; empty when the directories match."""
    root_a, root_b = Path(dir_a), Path(dir_b)
    files_a, files_b = _files(root_a), _files(root_b)
    problems = [f"only in {root_a}: {name}" for name in sorted(files_a - files_b)]
    problems += [f"only in {root_b}: {name}" for name in sorted(files_b - files_a)]
    for name in sorted(files_a & files_b):
        a, b = root_a / name, root_b / name
        if a.read_bytes() != b.read_bytes():
            problems.append(f"{name}: {_content_difference(a, b)}")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    problems = compare(*argv)
    for line in problems:
        print(line)
    print(f"{argv[0]} vs {argv[1]}: {'identical' if not problems else f'{len(problems)} differences'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
