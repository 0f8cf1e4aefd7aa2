"""Command line: ``metaemu serve | demo | doctor | node-setup | credential-provider | probe | webhook |
version``. Flags, logging and process exit codes only; no business logic. Exit codes: 0 success or clean
SIGTERM, 2 configuration or start-up error.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from metaemu import __version__

if TYPE_CHECKING:
    from metaemu.server.runner import MetaemuServer

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="metaemu", description="A GCE/GKE metadata server for workloads outside "
                                "Google Cloud, backed by Workload Identity Federation.")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the metadata API (config: --config or METAEMU_CONFIG)")
    serve.add_argument("--config", type=Path, help="YAML configuration file (default: $METAEMU_CONFIG)")
    serve.add_argument("--credential-config", type=Path,
                       help="a Google external_account credential configuration JSON")
    demo = sub.add_parser("demo", help="serve against an embedded local stand-in for Google (no cloud account)")
    demo.add_argument("--listen", default="127.0.0.1:8080", help="metadata address (default %(default)s)")
    demo.add_argument("--admin-listen", default="127.0.0.1:8081", help="admin address (default %(default)s)")
    demo.add_argument("--profile", choices=("gce", "gke"), default="gke")
    sub.add_parser("doctor", add_help=False,
                   help="run the credential chain step by step; stop at the first broken link with the fix")
    sub.add_parser("node-setup", add_help=False,
                   help="node mode: install and verify the interception rules (init container, NET_ADMIN)")
    sub.add_parser("credential-provider", add_help=False,
                   help="kubelet image credential provider: a CredentialProviderRequest on stdin, the response "
                   "on stdout (manifests/credential-provider)")
    sub.add_parser("probe", add_help=False,
                   help="node mode's exec probe: `probe ready|live --socket PATH` asks this pod's agent over "
                   "its admin_socket")
    sub.add_parser("webhook", add_help=False,
                   help="a mutating admission webhook injecting metaemu as a sidecar into pods that opt in "
                   "(manifests/webhook)")
    sub.add_parser("version", help="print the version")
    return p


def main(argv: Sequence[str] | None = None, *, environ: dict[str, str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    env = dict(os.environ if environ is None else environ)
    if arguments[:1] == ["node-setup"]:  # the node-mode init container's step: its own flags
        from metaemu.node_setup import main as node_setup

        return node_setup(arguments[1:], environ=env)
    if arguments[:1] == ["doctor"]:  # its own flags and exit status (0 only when the chain works)
        from metaemu.doctor.cli import main as doctor

        return doctor(arguments[1:], environ=env)
    if arguments[:1] == ["probe"]:  # kubelet runs it every few seconds: nothing heavy is imported
        from metaemu.probe import main as probe

        return probe(arguments[1:])
    if arguments[:1] == ["credential-provider"]:  # a kubelet exec plugin: its own flags and stdio contract
        from metaemu.image_credentials import main as credential_provider

        return credential_provider(arguments[1:], stdin=sys.stdin, stdout=sys.stdout, stderr=sys.stderr, environ=env)
    if arguments[:1] == ["webhook"]:  # its own flags and configuration (metaemu.webhook.settings)
        from metaemu.webhook.main import main as webhook

        return webhook(arguments[1:], environ=env)
    args = _parser().parse_args(arguments)
    if args.command == "version":
        print(f"metaemu {__version__}")
        return 0
    if args.command == "demo":
        from metaemu.demo import run_demo

        return run_demo(listen=args.listen, admin_listen=args.admin_listen, profile=args.profile, env=env)
    from metaemu.config import load_config
    from metaemu.errors import ConfigError
    from metaemu.logs import setup_logging
    from metaemu.server.runner import MetaemuServer

    config_path = args.config or (Path(env["METAEMU_CONFIG"]) if env.get("METAEMU_CONFIG") else None)
    # The whole document in a variable: what `metaemu webhook` gives an injected sidecar (no file to mount).
    document = env.get("METAEMU_CONFIG_YAML") if config_path is None else None
    if config_path is None and args.credential_config is None and not document:
        print("metaemu: --config (or METAEMU_CONFIG), METAEMU_CONFIG_YAML or --credential-config is required",
              file=sys.stderr)
        return EXIT_CONFIG
    try:
        config = load_config(path=config_path, credential_config=args.credential_config, env=env,
                             hostname=socket.gethostname(), document=document)
    except ConfigError as exc:
        print(f"metaemu: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(config.log_level)
    return run_server(MetaemuServer(config))


def run_server(server: MetaemuServer) -> int:
    from metaemu import eventloop
    from metaemu.server.runner import StartupError, serve_until_signalled

    try:
        eventloop.run(serve_until_signalled(server))
    except StartupError as exc:
        print(f"metaemu: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return 0
