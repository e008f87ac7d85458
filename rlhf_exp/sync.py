"""`python -m rlhf_exp.sync <run folder> [...]`: send what a run's tracking outbox still holds.

A run whose tracking server was down when it ended (or that was killed) keeps its unsent metrics,
tags, artifacts and final status in `<run folder>/tracking_outbox/`; this sends them, in order, to
the run recorded in `<run folder>/tracking.json`, and can be run again until nothing is left.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rlhf_exp.errors import ReportedError, UserInputError


def sync(run_dir: Path) -> tuple[int, int]:
    """Send the outbox of `run_dir`; returns (records sent, metric values sent). An artifact the store still
    refuses is left for the next sync and named; everything else goes on being sent."""
    from rlhf_exp.tracking.records import RUN_RECORD
    from rlhf_exp.redact import uri_with_password
    from rlhf_exp.tracking.mlflow_tracker import check_reachable, ready_client, send_record
    from rlhf_exp.tracking.outbox import ARTIFACT_KINDS, OUTBOX, mark_sent, pending

    record_file = run_dir / RUN_RECORD
    if not record_file.is_file():
        raise UserInputError(f"{run_dir} is not a tracked run folder (no {RUN_RECORD})")
    record = json.loads(record_file.read_text())
    folder = run_dir / OUTBOX
    todo = pending(folder)
    if not todo:
        return 0, 0
    uri = uri_with_password(record["tracking_uri"])
    check_reachable(uri)
    client = ready_client(uri)
    sent, values, refused = 0, 0, []
    for index, item in todo:
        try:
            send_record(client, record["run_id"], item)
        except Exception as error:
            if item["kind"] not in ARTIFACT_KINDS:
                raise
            refused.append(f"{item.get('path') or item.get('artifact_file')} ({type(error).__name__}: "
                           f"{str(error).splitlines()[0][:200] if str(error) else ''})")
            continue
        mark_sent(folder, index)
        sent += 1
        values += len(item.get("values", {}))
    if refused:
        raise UserInputError(f"{run_dir}: sent {sent} records ({values} metric values); the artifact store refused "
                             f"{len(refused)} artifacts, kept for the next sync: {'; '.join(refused[:3])}")
    return sent, values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf_exp.sync", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run folders (runs/<stage>/<time>_<id>)")
    args = parser.parse_args(argv)
    try:
        for run_dir in args.run_dirs:
            records, values = sync(run_dir)
            print(f"{run_dir}: sent {records} records ({values} metric values); nothing left")
    except ReportedError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
