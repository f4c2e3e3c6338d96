"""`openred-hub` command line (README.md "Command line"): serve, keygen, migrate,
token, check-config. Configuration errors exit 2 with one line naming the key."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from openred.hub.config import Config, ConfigError, load_config

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="openred-hub", description="The OpenRed relay hub.")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--config", metavar="PATH",
                        help="configuration file (default: ./hub.toml if present)")
        return sp

    s = with_config(sub.add_parser("serve", help="run the hub"))
    s.add_argument("--ws-port", type=int, metavar="N")
    s.add_argument("--admin-port", type=int, metavar="N")
    s.add_argument("--ws-host", metavar="HOST")
    s.add_argument("--store-url", metavar="URL")
    s.add_argument("--broker-url", metavar="URL")
    k = sub.add_parser("keygen", help="write a new Ed25519 node key file")
    k.add_argument("path", nargs="?", default="node.key")
    k.add_argument("--force", action="store_true", help="overwrite an existing file")
    with_config(sub.add_parser("migrate", help="apply pending store migrations"))
    t = with_config(sub.add_parser("token", help="print a node JWT signed by the hub"))
    t.add_argument("--sub", required=True, help="node id (the token's subject)")
    t.add_argument("--ttl-s", type=int, default=3600)
    t.add_argument("--topic", action="append", dest="topics", metavar="PATTERN",
                   help="allowed topic pattern (repeatable; 'a/*' for a prefix)")
    with_config(sub.add_parser("check-config", help="validate the configuration"))
    # add_help=False: `openred-hub bench --help` shows the bench's own help.
    b = sub.add_parser("bench", help="run a benchmark scenario (python -m bench)",
                       add_help=False)
    b.add_argument("args", nargs=argparse.REMAINDER)
    return p


def _load(args: argparse.Namespace) -> Config:
    overrides = {}
    for flag, key in (("ws_port", "server.ws_port"), ("admin_port", "server.admin_port"),
                      ("ws_host", "server.ws_host"), ("store_url", "store.url"),
                      ("broker_url", "broker.url")):
        if getattr(args, flag, None) is not None:
            overrides[key] = getattr(args, flag)
    return load_config(args.config, overrides=overrides)


def _fail(msg: str) -> int:
    print(f"openred-hub: {msg}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # everything after `bench` is the bench's own
        from bench.__main__ import main as bench_main

        return bench_main(argv[1:])
    args = _parser().parse_args(argv)
    cmd = args.command
    if cmd == "keygen":
        from openred.protocol.identity import Identity, KeyFileError, save_key_file

        ident = Identity.generate()
        try:
            save_key_file(ident, args.path, overwrite=args.force)
        except KeyFileError as exc:
            return _fail(str(exc))
        print(ident.node_id)
        print(f"wrote {args.path} (node id above)", file=sys.stderr)
        return 0
    try:
        cfg = _load(args)
        if cmd in ("check-config", "serve", "token"):
            # Every file the configuration names is loaded before anything listens.
            from openred.hub.preflight import check_files

            check_files(cfg)
    except ConfigError as exc:
        return _fail(str(exc))
    if cmd == "check-config":
        print("configuration ok")
        return 0
    if cmd == "token":
        return _token(cfg, args)
    from openred.hub.app import install_uvloop, serve
    from openred.hub.log import setup_logging

    setup_logging(cfg.log.level, cfg.log.format)
    install_uvloop()
    if cmd == "migrate":
        return asyncio.run(_migrate(cfg))
    try:
        return asyncio.run(serve(cfg))
    except KeyboardInterrupt:
        return 0
    except OSError as exc:  # port taken, unreadable db path...
        return _fail(f"cannot start: {exc}")
    except Exception as exc:
        from openred.hub.broker import BrokerUnavailable
        from openred.persistence.store import StoreError

        if isinstance(exc, StoreError | BrokerUnavailable):  # e.g. PostgreSQL unreachable
            print(f"openred-hub: cannot start: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        raise


def _token(cfg: Config, args: argparse.Namespace) -> int:
    from openred.hub.tokens import TokenIssuer

    a = cfg.auth
    try:
        if a.jwt_private_key_file:
            issuer = TokenIssuer(private_key_pem=Path(a.jwt_private_key_file).read_bytes())
        elif a.jwt_secret:
            issuer = TokenIssuer(secret=a.jwt_secret, algorithm="HS256")
        else:
            return _fail("auth.jwt_secret or auth.jwt_private_key_file must be set to issue "
                         "tokens")
        token, _exp = issuer.issue(args.sub, args.ttl_s,
                                   tuple(args.topics) if args.topics else None,
                                   audience=a.jwt_audience)
    except (ValueError, TypeError) as exc:
        return _fail(str(exc))
    print(token)
    return 0


async def _migrate(cfg: Config) -> int:
    from openred.persistence.backends import open_store
    from openred.persistence.store import StoreError

    store = open_store(cfg.store.url, auto_migrate=False, pool_size=cfg.store.pool_size)
    try:
        applied = await store.migrate()
    except StoreError as exc:
        return _fail(f"migrate: {exc}")
    finally:
        try:
            await store.close()
        except Exception:
            pass
    print(f"applied {len(applied)} migration(s)" + (": " + ", ".join(applied) if applied
                                                    else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
