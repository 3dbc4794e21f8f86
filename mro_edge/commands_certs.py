"""`mro-edge certs ...`: a private CA for MQTT over TLS, for a station with no PKI of its own.

certs init     a new station CA, the broker's certificate (--host/--ip) and, with --device, device
               client certificates; refuses to replace an existing CA (--if-missing: keeps what
               is there, what compose's `certs` service runs on every boot)
certs broker   a new broker certificate from the existing CA (renewal, or new names)
certs device   a client certificate for one device (mutual TLS)

Files go to --out (default $MRO_DATA_DIR/tls); see shared/runtime/pki.py for what they are.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shared.runtime.config import Config


def _out(config: Config, args) -> Path:
    return Path(args.out) if args.out else config.data_path / "tls"


def _run(action):
    from mro_edge.cli import UserError
    from shared.runtime.pki import PkiError

    try:
        return action()
    except PkiError as exc:
        raise UserError(str(exc)) from None


def cmd_certs_init(config: Config, args) -> int:
    from shared.runtime import pki

    out = _out(config, args)
    ca, broker = pki.ca_paths(out), pki.broker_paths(out)
    if args.if_missing and ca.cert.exists() and broker.cert.exists() and broker.key.exists():
        print(f"{out} already holds a CA and a broker certificate: kept as they are", file=sys.stderr)
        return 0

    def make() -> list[pki.Issued]:
        issued = []
        if not (args.if_missing and ca.cert.exists()):
            issued.append(pki.make_ca(out, args.ca_name or f"mro-edge {config.station} CA", days=args.ca_days))
        issued.append(pki.issue_broker(out, args.host, args.ip, days=args.days))
        issued += [pki.issue_device(out, device, days=args.days) for device in args.device]
        return issued

    if not args.host and not args.ip:
        from mro_edge.cli import UserError

        raise UserError("name the broker: --host NAME and/or --ip ADDRESS (every name and address devices "
                        "and services connect to; clients verify them)")
    _report(_run(make))
    print(f"keep {ca.key} offline if you can: whoever has it can issue certificates this station trusts",
          file=sys.stderr)
    print(f"turn TLS on: MRO_MQTT_URL=mqtts://{(args.host or args.ip)[0]}:8883 MRO_MQTT_CA_FILE={ca.cert} "
          f"MRO_BROKER_TLS_CERT_FILE={broker.cert} MRO_BROKER_TLS_KEY_FILE={broker.key}"
          " (README, \"TLS\")", file=sys.stderr)
    return 0


def cmd_certs_broker(config: Config, args) -> int:
    from shared.runtime import pki

    out = _out(config, args)
    _report([_run(lambda: pki.issue_broker(out, args.host, args.ip, days=args.days))])
    print("restart the broker (or SIGHUP Mosquitto) to serve the new certificate", file=sys.stderr)
    return 0


def cmd_certs_device(config: Config, args) -> int:
    from shared.runtime import pki

    out = _out(config, args)
    _report([_run(lambda: pki.issue_device(out, args.device_id, days=args.days))])
    return 0


def _report(issued) -> None:
    for item in issued:
        print(f"{item.cert}\n{item.key}")


def register(subparsers: argparse._SubParsersAction) -> None:
    from shared.runtime.pki import CA_DAYS, LEAF_DAYS

    certs = subparsers.add_parser("certs", help="a private CA with broker and device certificates for MQTT TLS")
    csub = certs.add_subparsers(dest="action", required=True)

    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--out", help="the CA directory (default: $MRO_DATA_DIR/tls)")
        parser.add_argument("--days", type=int, default=LEAF_DAYS, help=f"validity (default {LEAF_DAYS})")

    def names(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--host", action="append", default=[], metavar="NAME",
                            help="a DNS name of the broker (repeat for each)")
        parser.add_argument("--ip", action="append", default=[], metavar="ADDRESS",
                            help="an IP address of the broker (repeat for each)")

    init = csub.add_parser("init", help="new CA, broker certificate and optional device certificates")
    common(init)
    names(init)
    init.add_argument("--device", action="append", default=[], metavar="ID",
                      help="also a client certificate for this device (repeat for each)")
    init.add_argument("--ca-name", help="the CA's common name (default: mro-edge <station> CA)")
    init.add_argument("--ca-days", type=int, default=CA_DAYS, help=f"CA validity (default {CA_DAYS})")
    init.add_argument("--if-missing", action="store_true",
                      help="keep a CA and broker certificate already there (own PKI, or a second boot)")
    init.set_defaults(func=cmd_certs_init)
    broker = csub.add_parser("broker", help="a new broker certificate from the existing CA")
    common(broker)
    names(broker)
    broker.set_defaults(func=cmd_certs_broker)
    device = csub.add_parser("device", help="a client certificate for one device")
    device.add_argument("device_id", metavar="ID")
    common(device)
    device.set_defaults(func=cmd_certs_device)
