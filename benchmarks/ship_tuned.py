"""Merge a GPU session's recorded Triton tuning (``triton_tuned.json``, written under
``RESNET_FUSED_TRITON_RECORD`` by benchmarks/gpu_session.sh) into the table shipped in
the package, so a fresh machine with that GPU model pays no autotuning for those shapes.

    python benchmarks/ship_tuned.py benchmarks/results/<gpu>/<session>/triton_tuned.json
"""
import argparse
import json
import os
import sys

from resnet_fused.backends import triton_backend as tb


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recorded", nargs="+", help="tuning tables recorded on a GPU")
    parser.add_argument("--into", default=tb.SHIPPED_TABLE, help="the table to update (default: the package's)")
    args = parser.parse_args(argv)
    missing = [path for path in args.recorded if not os.path.isfile(path)]
    if missing:  # (read_table takes a missing file as an empty table: right for the package's, not here)
        parser.error(f"no recorded table at {', '.join(missing)}")
    try:
        table = tb.read_table(args.into)
        for path in args.recorded:
            table = tb.merge_tables(table, tb.read_table(path))
    except (ValueError, json.JSONDecodeError) as exc:
        parser.error(str(exc))
    tb.write_table(args.into, table)
    for device, entry in sorted(table["devices"].items()):
        configs = sum(len(rows) for rows in entry.get("autotune", {}).values())
        print(f"{device} (triton {entry.get('triton')}): {len(entry.get('algorithms', {}))} algorithm choices, "
              f"{configs} tile configs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
