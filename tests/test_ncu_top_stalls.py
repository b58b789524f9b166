"""benchmarks/ncu_top_stalls.py on a small Nsight Compute source-page CSV (on CPU)."""

from __future__ import annotations

import pytest

from conftest import load_benchmark

HEADER = (
    '"Address","Source","Warp Stall Sampling (All Samples)","Warp Stall Sampling (Not-issued Samples)",'
    '"stall_long_sb","stall_math","stall_wait","stall_long_sb (Not Issued)"'
)


def write_csv(path, rows):
    lines = ["==PROF== Connected to process 1 (python3)", "profiled wave:topk8 at T=262144",
             '"Kernel Name","route_lane_kernel",', HEADER]
    lines += [",".join(f'"{value}"' for value in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def tool():
    return load_benchmark("ncu_top_stalls")


def test_ranks_instructions_by_samples_with_their_main_reasons(tool, tmp_path):
    path = tmp_path / "source.csv"
    write_csv(path, [
        ("0x10", "LDS.128 R4, [R2]", "5", "3", "0", "1", "4", "0"),
        ("0x20", "ISETP.GT.U32.AND P1, PT, R8, -0x1, PT", "1,200", "900", "1,100", "20", "0", "800"),
        ("0x30", "MUFU.EX2 R9, R18", "95", "40", "0", "60", "35", "0"),
        ("0x40", "EXIT", "0", "0", "0", "0", "0", "0"),
    ])
    rows = tool.read_source_csv(path)
    assert len(rows) == 4
    total, ranked = tool.top_stalls(rows, top=2, reasons=2)
    assert total == 1300
    assert [entry["address"] for entry in ranked] == ["0x20", "0x30"]
    assert ranked[0]["share"] == pytest.approx(1200 / 1300)
    # the (Not Issued) column is a subset of its reason, not a reason of its own
    assert ranked[0]["reasons"] == [("long_sb", 1100.0), ("math", 20.0)]
    assert ranked[1]["reasons"] == [("math", 60.0), ("wait", 35.0)]
    assert tool.main([str(path), "--top", "1"]) == 0


def test_a_file_without_the_table_is_refused_with_its_name(tool, tmp_path, capsys):
    path = tmp_path / "details.txt"
    path.write_text("==PROF== Disconnected\n  Duration  us  24.5\n")
    with pytest.raises(ValueError, match="details.txt"):
        tool.read_source_csv(path)
    assert tool.main([str(path)]) == 2
    assert "--page source" in capsys.readouterr().err


def test_opcodes_sums_executed_instructions_by_mnemonic(tool, tmp_path, capsys):
    path = tmp_path / "source.csv"
    header = '"Address","Source","Warp Stall Sampling (All Samples)","Instructions Executed"'
    lines = ['"Kernel Name","route_lane_kernel",', header] + [",".join(f'"{v}"' for v in row) for row in [
        ("0x10", "VIMNMX.U32 R68, R37, R68, !PT", "3", "8,192"),
        ("0x20", "@!P2  VIMNMX.U32 R1, R2, R3, PT", "0", "4,096"),
        ("0x30", "VIMNMX3.U32 R1, R2, R3, R4", "0", "100"),
        ("0x40", "@P0   BRA 0x7f013acdaa30", "1", "50"),
        ("0x50", "MUFU.EX2 R9, R18", "0", "0"),
    ]]
    path.write_text("\n".join(lines) + "\n")
    rows = tool.read_source_csv(path)
    sums = tool.executed_by_opcode(rows)
    assert sums == {"VIMNMX": 12288.0, "VIMNMX3": 100.0, "BRA": 50.0, "MUFU": 0.0}
    assert list(sums) == ["VIMNMX", "VIMNMX3", "BRA", "MUFU"]
    assert tool.main([str(path), "--opcodes", "--per", "4096"]) == 0
    out = capsys.readouterr().out
    assert "12438 executed (3.0 per 4096)" in out and "VIMNMX" in out and "3.0" in out
    # a table without the executed counts is refused, naming the column
    write_csv(path, [("0x10", "LDS.128 R4, [R2]", "5", "3", "0", "1", "4", "0")])
    assert tool.main([str(path), "--opcodes"]) == 2
    assert "Instructions Executed" in capsys.readouterr().err
