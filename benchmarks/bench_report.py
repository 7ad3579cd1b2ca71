"""Print BENCHMARKS.md's `edgetok bench` section from a bench's results.json: the command, the
machine and versions, the table, and the edgetok ÷ peer ratios.

    .venv/bin/python benchmarks/bench_report.py benchmarks/results/bench/results.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from edgetok.bench.report import disk_table, ratios_table, results_table


def main() -> None:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/bench/results.json")
    r = json.loads(path.read_text())
    m, v = r["machine"], r["versions"]
    s = r["settings"]
    print("```\n" + r["command"] + "\n```\n")
    print(f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM; Python {m['python']}; "
          + ", ".join(f"{k} {x}" for k, x in v.items() if x) + ".")
    print(f"{r['model']}, {s['new_tokens']} new tokens after a prompt of (context − {s['new_tokens']}) tokens of "
          f"{r['prompt']['text']}; {s['threads']} thread(s) per system; median of {s['repeat']} interleaved rounds (min–max).\n")
    print(results_table(r))
    print("\nedgetok ÷ peer (median tokens/s):\n")
    print(ratios_table(r))
    if disk := disk_table(r):
        print("\nThe disk tier's reads during decode:\n")
        print(disk)


if __name__ == "__main__":
    main()
