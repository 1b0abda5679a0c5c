"""``imgindex serve`` (the web app) and ``imgindex users`` (who may sign in to it)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgindex.cli._common import add_root, settings_from
from imgindex.errors import ConfigError

if TYPE_CHECKING:
    import argparse


def add_parser(sub: Any) -> None:
    """Register ``serve`` and ``users``."""
    serve = sub.add_parser(
        "serve",
        help="the web app: explore, cohort builder, export requests, operations, QIDO-RS "
        "(docs/web.md)",
        description="Serve the web app for the catalog at --root: explore pages for "
        "researchers and reviewers, the cohort builder and export requests for researchers, "
        "their review for reviewers (an approved request is exported, de-identified, while "
        "the app runs), operations pages and /metrics for operators, the audit "
        "trail, and QIDO-RS over the index at /dicom-web. Users sign in with a password "
        "(add them with `imgindex users add`). Binds to 127.0.0.1 unless told otherwise; "
        "behind TLS, pass --https-only so session cookies never travel in clear.",
    )
    add_root(serve)
    serve.add_argument("--bind", default="127.0.0.1", help="address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    serve.add_argument(
        "--https-only", action="store_true", help="send session cookies over HTTPS only"
    )
    serve.add_argument(
        "--min-count",
        type=int,
        default=10,
        metavar="N",
        help="disclosure threshold: researchers see counts from 1 to N-1 as <N (default 10)",
    )
    serve.add_argument(
        "--export-workers",
        type=int,
        default=None,
        metavar="N",
        help="worker processes of each approved export (default: one per CPU)",
    )
    serve.set_defaults(run=run_serve)

    users = sub.add_parser(
        "users",
        help="add, list or remove the web app's users",
        description="The users of `imgindex serve` and their roles: researcher (explore, "
        "cohorts, export requests), reviewer (approves requests), operator (operations).",
    )
    add_root(users)
    actions = users.add_subparsers(dest="action", required=True, help="what to do")
    add = actions.add_parser("add", help="add a user, or change their role and password")
    add.add_argument("name")
    add.add_argument("--role", required=True, choices=("researcher", "reviewer", "operator"))
    add.add_argument(
        "--password-file",
        metavar="FILE",
        help="read the password from the first line of FILE (default: ask on the terminal)",
    )
    actions.add_parser("list", help="list the users and their roles")
    remove = actions.add_parser("remove", help="remove a user")
    remove.add_argument("name")
    users.set_defaults(run=run_users)


def run_serve(args: argparse.Namespace) -> int:
    """Serve until interrupted."""
    import uvicorn

    from imgindex.web.app import create_app

    settings = settings_from(args)
    if args.min_count < 1:
        raise ConfigError("--min-count: give 1 (no masking) or more")
    app = create_app(
        settings.root,
        https_only=args.https_only,
        min_count=args.min_count,
        export_workers=args.export_workers,
    )
    print(
        f"imgindex serve: http://{args.bind}:{args.port}/ for {settings.root} (Ctrl-C stops)",
        file=sys.stderr,
    )
    uvicorn.run(app, host=args.bind, port=args.port, log_level="warning")
    return 0


def run_users(args: argparse.Namespace) -> int:
    """Add, list or remove users."""
    from imgindex.web.accounts import Accounts

    accounts = Accounts(settings_from(args).root)
    if args.action == "list":
        for user in accounts.users():
            print(f"{user.name}\t{user.role}")
        return 0
    if args.action == "remove":
        if not accounts.remove_user(args.name):
            raise ConfigError(f"no user {args.name!r}")
        print(f"removed {args.name}")
        return 0
    user = accounts.add_user(args.name, args.role, _password(args.password_file))
    print(f"{user.name} can sign in as {user.role}")
    return 0


def _password(path: str | None) -> str:
    if path:
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(f"--password-file: {exc}") from None
        return lines[0] if lines else ""
    import getpass

    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        raise ConfigError("the two passwords differ")
    return first
