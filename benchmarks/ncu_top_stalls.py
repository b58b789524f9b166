"""The instructions a kernel's warps stalled on most, from Nsight Compute's per-instruction samples.

Reads the CSV that ``ncu ... --section SourceCounters --section WarpStateStats --page source --print-source sass
--csv`` writes (profiler lines before the table are skipped) and prints the instructions with the most stall samples:
their address, SASS, share of all samples and main stall reasons. That is how the lane kernel's wait on the group id
it had just loaded was found (benchmarks/RESULTS.md, "CUDA kernels, third round").

``--opcodes`` prints instead the executed warp instructions summed by opcode (the SASS mnemonic before its first
dot, the predicate dropped), ``--per N`` divided by N (the lane kernel's 32-row tiles, T / 32: instructions per
tile; benchmarks/RESULTS.md, "CUDA kernels, eighth round").

Usage: ``python benchmarks/ncu_top_stalls.py NCU_SOURCE.csv [--top 15] [--reasons 3] [--opcodes [--per N]]``
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"
REASON_PREFIX = "stall_"


def _number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def read_source_csv(path: Path) -> list[dict[str, str]]:
    """The rows of the per-instruction table (one per SASS instruction); raises ValueError when the file has none."""
    lines = path.read_text(errors="replace").splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"Address"')), None)
    if start is None:
        raise ValueError(f"{path}: no per-instruction table (a line starting with \"Address\"); was it written with "
                         "--page source --print-source sass --csv?")
    rows = list(csv.DictReader(io.StringIO("\n".join(lines[start:]))))
    if not rows or SAMPLES not in rows[0]:
        raise ValueError(f"{path}: the table has no {SAMPLES!r} column (profile with --section SourceCounters)")
    return rows


def top_stalls(rows: list[dict[str, str]], top: int = 15, reasons: int = 3) -> tuple[float, list[dict]]:
    """(all samples, the ``top`` instructions by samples, each with address, source, samples, share and its
    ``reasons`` largest stall reasons (issued and not-issued samples together, as ncu's columns give them))."""
    total = sum(_number(row[SAMPLES]) for row in rows)
    reason_columns = [c for c in rows[0] if c.startswith(REASON_PREFIX) and not c.endswith("(Not Issued)")]
    ranked = sorted(rows, key=lambda row: -_number(row[SAMPLES]))[:top]
    out = []
    for row in ranked:
        samples = _number(row[SAMPLES])
        by_reason = sorted(((_number(row[c]), c[len(REASON_PREFIX):]) for c in reason_columns), reverse=True)
        out.append(dict(address=row["Address"], source=" ".join(row["Source"].split()), samples=samples,
                        share=samples / total if total else 0.0,
                        reasons=[(name, value) for value, name in by_reason[:reasons] if value > 0]))
    return total, out


def opcode(source: str) -> str:
    """The opcode of one SASS line: its mnemonic before the first dot, a predicate (``@!P0``) dropped."""
    words = source.split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return words[0].split(".")[0] if words else ""


def executed_by_opcode(rows: list[dict[str, str]]) -> dict[str, float]:
    """Executed warp instructions summed by :func:`opcode`, largest first; raises ValueError without the column."""
    if EXECUTED not in rows[0]:
        raise ValueError(f"the table has no {EXECUTED!r} column (profile with --section SourceCounters)")
    sums: dict[str, float] = {}
    for row in rows:
        name = opcode(row["Source"])
        sums[name] = sums.get(name, 0.0) + _number(row[EXECUTED])
    return dict(sorted(sums.items(), key=lambda item: -item[1]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", type=Path)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--reasons", type=int, default=3)
    parser.add_argument("--opcodes", action="store_true", help="executed instructions by opcode instead")
    parser.add_argument("--per", type=float, default=1.0, help="--opcodes: divide the counts by this (e.g. tiles)")
    args = parser.parse_args(argv)
    if args.per <= 0:
        parser.error(f"--per must be positive, got {args.per}")
    try:
        rows = read_source_csv(args.csv)
        sums = executed_by_opcode(rows) if args.opcodes else None
    except (OSError, ValueError) as err:
        print(err, file=sys.stderr)
        return 2
    if sums is not None:
        total = sum(sums.values())
        print(f"{len(rows)} instructions, {total:.0f} executed ({total / args.per:.1f} per {args.per:g})")
        for name, count in sums.items():
            print(f"{name:<12} {count / args.per:10.1f}  {count / total if total else 0.0:6.1%}")
        return 0
    total, ranked = top_stalls(rows, args.top, args.reasons)
    print(f"{len(rows)} instructions, {total:.0f} stall samples")
    for entry in ranked:
        reasons = ", ".join(f"{name} {value:.0f}" for name, value in entry["reasons"])
        print(f"{entry['share']:6.1%} {entry['samples']:7.0f}  {entry['address']}  {entry['source'][:70]:<70}  {reasons}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
