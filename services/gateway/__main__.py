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
    p_serve.add_argument("--tls-cert", default="", help="PEM certificate chain: serve HTTPS (with --tls-key)")
    p_serve.add_argument("--tls-key", default="", help="PEM private key of --tls-cert")
    p_serve.add_argument("--tls-client-ca", default="", help="require client certificates from this CA (mTLS)")
    p_reg = sub.add_parser("register-edge",
                           help="register an edge's public key; prints its new bearer token (the old one ends)")
    p_reg.add_argument("origin")
    p_reg.add_argument("pem", help="file with the edge's public key (BEGIN PUBLIC KEY)")
    p_reg.add_argument("--db-url", default=GatewaySettings.db_url)
    args = parser.parse_args(argv)
    if args.command == "serve":
        from shared.runtime.logs import configure_logging

        configure_logging("gateway", "-")
        host, port = split_listen(args.listen)
        if bool(args.tls_cert) != bool(args.tls_key) or (args.tls_client_ca and not args.tls_cert):
            parser.error("--tls-cert and --tls-key go together, and --tls-client-ca needs them")
        serve(GatewaySettings(db_url=args.db_url, host=host, port=port,
                              duplicate_window_days=args.duplicate_window_days, key_dir=args.key_dir,
                              cosigner_name=args.cosigner_name, tls_cert=args.tls_cert, tls_key=args.tls_key,
                              tls_client_ca=args.tls_client_ca))
        return 0
    from services.gateway.admin import register_edge

    print(register_edge(args.db_url, args.origin, Path(args.pem).read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
