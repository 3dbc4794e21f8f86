"""``python -m services.gateway serve|register-edge``: the gateway without the ``mro-edge`` CLI."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from services.gateway.server import GatewaySettings, serve, split_listen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.gateway")
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="run the gateway until SIGTERM")
    p_serve.add_argument("--db-url", default=GatewaySettings.db_url)
    p_serve.add_argument("--listen", default="127.0.0.1:8443")
    p_serve.add_argument("--duplicate-window-days", type=int, default=30)
    p_serve.add_argument("--key-dir", default="",
                         help="directory of the cosigner key (default: keys/ beside a SQLite database)")
    p_serve.add_argument("--cosigner-name", default=GatewaySettings.cosigner_name)
    p_reg = sub.add_parser("register-edge", help="register an edge's public key; prints its bearer token")
    p_reg.add_argument("origin")
    p_reg.add_argument("pem", help="file with the edge's public key (BEGIN PUBLIC KEY)")
    p_reg.add_argument("--db-url", default=GatewaySettings.db_url)
    args = parser.parse_args(argv)
    if args.command == "serve":
        from shared.runtime.logs import configure_logging

        configure_logging("gateway", "-")
        host, port = split_listen(args.listen)
        serve(GatewaySettings(db_url=args.db_url, host=host, port=port,
                              duplicate_window_days=args.duplicate_window_days, key_dir=args.key_dir,
                              cosigner_name=args.cosigner_name))
        return 0
    from services.gateway.admin import register_edge

    print(register_edge(args.db_url, args.origin, Path(args.pem).read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
