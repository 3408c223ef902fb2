"""Command line of the ratings store (core/ratings.py):

    python -m chat.ratings [--db FILE] export --out prefs.jsonl   (--out -: standard output)
    python -m chat.ratings [--db FILE] counts

Torch-free: it reads SQLite and writes JSONL, nothing more. Both commands only read the store
(read-only: a store that is not there is one sentence, never created).
"""
from __future__ import annotations

import argparse
import json
import sys

from core.ratings import RatingsError, counts, db_path, export, export_records, left_out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chat.ratings",
                                     description="The ratings store: export votes as preference records.")
    parser.add_argument("--db", help="ratings database (default: $RLHF_HOME/ratings.db)")
    commands = parser.add_subparsers(dest="command", required=True)
    export_cmd = commands.add_parser("export", help="write preference records as JSONL")
    export_cmd.add_argument("--out", required=True, help="JSONL file to write (a new file, unless "
                            "--overwrite); - writes to standard output")
    export_cmd.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    commands.add_parser("counts", help="print the number of votes by verdict as JSON")
    args = parser.parse_args(argv)
    db = args.db or str(db_path())  # named, so a missing store is an error here, not "no votes"
    if args.command == "export" and not args.out.strip():  # Path("") is ".", the working folder
        print("error: --out is empty: name the JSONL file to write, or - for standard output.",
              file=sys.stderr)
        return 2
    try:
        if args.command == "counts":
            print(json.dumps(counts(db)))
            return 0
        skipped = left_out(db)  # read before anything is written: an error then changed nothing
        if args.out == "-":  # the records on standard output, what was written on standard error
            records = export_records(db)
            sys.stdout.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            written, report = len(records), sys.stderr
        else:
            written, report = export(args.out, db, overwrite=args.overwrite), sys.stdout
        note = f" (left out: {', '.join(f'{n} {why}' for why, n in skipped.items())})" if skipped else ""
        print(f"wrote {written} preference records to {args.out}{note}", file=report)
        return 0
    except RatingsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
