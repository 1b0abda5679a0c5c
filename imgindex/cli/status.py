"""``imgindex status --root ROOT``: the index, intake, throughput, backlog, crawls, exports,
the transfer ledger and rejects."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from imgindex.cli._common import add_root, settings_from

if TYPE_CHECKING:
    import argparse


def add_parser(sub: Any) -> None:
    """Register the subcommand."""
    parser = sub.add_parser(
        "status",
        help="what operations watch: index size, intake, throughput, backlog, crawls, exports, "
        "rejects",
        description="Print the index's size; the instances indexed in the last hour and day "
        "by source; the throughput of the listener, crawls, folder indexing and exports (MB/s "
        "and instances/s over the last 5 minutes, hour and day; --json adds them per minute "
        "and per hour); the listener's backlog (write-ahead log segments not yet "
        "checkpointed, received files waiting for the indexer); each crawl's studies and "
        "series by status; each export's series by outcome and throughput, failures by "
        "reason, and the latest rows of the transfer ledger; and files and values refused, "
        "by reason. Reads the root only: safe while a listener, crawl or export runs.",
    )
    add_root(parser)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Print the status."""
    from imgindex.status import collect_status

    status = collect_status(settings_from(args).root)
    if args.json:
        print(json.dumps(status.to_dict(), indent=1, default=str))
    else:
        print(status.describe())
    return 0
