"""`python -m v2v_audit verify` (make audit-verify): every service's audit chain and its checkpoints.

Exit 0 and one line per schema when all hold; exit 1 naming the first broken entry of each broken chain
(schema, seq, what is wrong); exit 2 when the database cannot be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from v2v_audit.settings import VerifySettings
from v2v_audit.verifier import verify_database
from v2v_contracts.services import SERVICES


def _with_database(url: str, database: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


def main(argv: list[str] | None = None) -> int:
    settings = VerifySettings()
    parser = argparse.ArgumentParser(prog="python -m v2v_audit")
    sub = parser.add_subparsers(dest="command", required=True)
    ver = sub.add_parser("verify", help="verify every service's audit chain and its signed checkpoints")
    ver.add_argument("--database-url", default=settings.admin_url(), help="an admin URL (V2V_DATABASE_URL)")
    ver.add_argument(
        "--database", default=settings.database_name, help="the platform's database (V2V_DATABASE_NAME)"
    )
    ver.add_argument("--checkpoints", default=str(settings.checkpoint_dir()), help="V2V_AUDIT_CHECKPOINT_DIR")
    ver.add_argument(
        "--key", default=str(settings.key_file()), help="the checkpoint key (its .pub.jwk.json is used)"
    )
    ver.add_argument("--schema", action="append", help="only this schema (repeatable); default: all five")
    args = parser.parse_args(argv)
    schemas = args.schema or [s.schema for s in SERVICES]
    url = _with_database(args.database_url, args.database)
    try:
        summaries = asyncio.run(
            verify_database(url, args.database, schemas, Path(args.checkpoints), Path(args.key))
        )
    except (OSError, ConnectionError) as exc:
        print(f"audit-verify: cannot reach the database ({exc.__class__.__name__}: {exc})", file=sys.stderr)
        return 2
    broken = False
    for summary in summaries:
        print(summary.line())
        broken = broken or summary.broken is not None
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
