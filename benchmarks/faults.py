"""Every fault scenario of `testkit/faults.py` on real processes, as a table: trials planned, rows written, rows
lost, rows duplicated, epochs retrained, epochs abandoned, outcome.

    python benchmarks/faults.py [--only driver_sigkill,nan_storm] [--keep DIR]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's testkit, shared with the tests
from testkit.faults import SCENARIOS, Outcome, run_scenario  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help=f"comma list of {', '.join(SCENARIOS)}")
    p.add_argument("--keep", default="", help="work folder to keep (default: a temporary one, removed)")
    args = p.parse_args()
    keys = [k for k in args.only.split(",") if k] or list(SCENARIOS)
    work = Path(args.keep or tempfile.mkdtemp(prefix="uhkd-faults-"))
    header = ["scenario", "trials planned", "rows written", "rows lost", "rows duplicated", "epochs retrained",
              "epochs abandoned", "outcome"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header), flush=True)
    try:
        for key in keys:
            try:
                result = run_scenario(key, work)
            except Exception as exc:  # a scenario that could not run is a row saying why, not the end of the table
                result = Outcome(key, outcome=f"could not run: {type(exc).__name__}: {exc}")
            print("| " + " | ".join(result.row()) + " |", flush=True)
            for line in result.lines:
                print(f"    {line}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
