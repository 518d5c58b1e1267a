"""One line per profiled kernel launch from an `ncu --csv --page raw` run of
`benchmarks/kernels.py --profile` (other lines of the file are skipped): time, DRAM
throughput, occupancy, registers, L1 sectors per request, hit rates and the largest stall
reasons (cycles per issued instruction), as a Markdown table.

    ncu --metrics "$METRICS" --csv --page raw python benchmarks/kernels.py --profile ... > raw.csv
    python benchmarks/ncu_summary.py raw.csv
"""

import csv
import io
import sys

STALL = "smsp__average_warps_issue_stalled_"
COLUMNS = [  # (header, metric or a function of the row)
    ("us", lambda r: f(r, "gpu__time_duration.sum") / 1e3),
    ("DRAM %", "dram__throughput.avg.pct_of_peak_sustained_elapsed"),
    ("occupancy % (achieved / theoretical)",
     lambda r: f"{f(r, 'sm__warps_active.avg.pct_of_peak_sustained_active'):.0f} / "
               f"{f(r, 'sm__maximum_warps_per_active_cycle_pct'):.0f}"),
    ("regs", lambda r: int(f(r, "launch__registers_per_thread"))),
    ("L1 sectors / request (ld, st)",
     lambda r: f"{ratio(r, 'ld'):.1f}, {ratio(r, 'st'):.1f}"),
    ("L1 hit %", "l1tex__t_sector_hit_rate.pct"),
    ("L2 hit %", "lts__t_sector_hit_rate.pct"),
    ("top stalls (cycles / issued instruction)", lambda r: stalls(r)),
]


def f(row: dict, name: str) -> float:
    return float(row[name].replace(",", ""))


def ratio(row: dict, op: str) -> float:
    requests = f(row, f"l1tex__t_requests_pipe_lsu_mem_global_op_{op}.sum")
    return f(row, f"l1tex__t_sectors_pipe_lsu_mem_global_op_{op}.sum") / requests if requests else 0.0


def stalls(row: dict, top: int = 3) -> str:
    found = [(f(row, k), k[len(STALL):].replace("_per_issue_active.ratio", "")) for k in row
             if k.startswith(STALL) and k.endswith("_per_issue_active.ratio") and row[k] not in ("", "n/a")]
    return ", ".join(f"{name} {value:.1f}" for value, name in sorted(found, reverse=True)[:top])


def summary(text: str) -> list[str]:
    rows = list(csv.reader(io.StringIO("\n".join(line for line in text.splitlines() if line.startswith('"')))))
    data = [dict(zip(rows[0], r)) for r in rows[2:]]  # rows[1]: units
    lines = ["| kernel | grid x block | " + " | ".join(h for h, _ in COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 2) + "|"]
    for row in data:
        cells = []
        for _, how in COLUMNS:
            value = how(row) if callable(how) else f(row, how)
            cells.append(f"{value:.1f}" if isinstance(value, float) else str(value))
        lines.append(f"| {row['Kernel Name']} | {row['Grid Size']} x {row['Block Size']} | " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    print("\n".join(summary(open(sys.argv[1]).read())))
