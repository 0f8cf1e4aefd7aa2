"""``metaemu webhook --config FILE``: flags, start-up checks and the signal loop; no business logic.
Exit codes: 0 after SIGTERM/SIGINT, 2 for a configuration or start-up error."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from metaemu.config import parse_config
from metaemu.errors import ConfigError
from metaemu.webhook.settings import VARIANTS, WebhookSettings, load_settings
from metaemu.webhook.sidecar import config_document

EXIT_CONFIG = 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="metaemu webhook", description="A mutating admission webhook that injects "
                                "metaemu as a native sidecar into pods that opt in (manifests/webhook).")
    p.add_argument("--config", type=Path, help="the webhook's YAML configuration (default: $METAEMU_WEBHOOK_CONFIG)")
    return p


def check_sidecar_config(settings: WebhookSettings) -> None:
    """Parse what an injected sidecar would be given, in each variant: a mistake in
    ``sidecar.config`` stops the webhook instead of crash-looping every injected pod."""
    for variant in VARIANTS:
        document = json.loads(config_document(settings.sidecar, variant, "probe@example.iam.gserviceaccount.com"))
        try:
            parse_config(document, hostname="pod", base_dir=Path("/"))
        except ConfigError as exc:
            raise ConfigError(f"sidecar.config ({variant} variant) {exc.key}", exc.problem) from None


def main(argv: Sequence[str], *, environ: Mapping[str, str]) -> int:
    args = build_parser().parse_args(list(argv))
    path = args.config or (Path(environ["METAEMU_WEBHOOK_CONFIG"]) if environ.get("METAEMU_WEBHOOK_CONFIG") else None)
    if path is None:
        print("metaemu webhook: --config (or METAEMU_WEBHOOK_CONFIG) is required", file=sys.stderr)
        return EXIT_CONFIG
    try:
        settings = load_settings(path, env=environ)
        check_sidecar_config(settings)
    except ConfigError as exc:
        print(f"metaemu webhook: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    from metaemu import eventloop
    from metaemu.logs import setup_logging

    setup_logging(settings.log_level)
    try:
        eventloop.run(_serve(settings, environ))
    except (ConfigError, OSError) as exc:
        print(f"metaemu webhook: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return 0


async def _serve(settings: WebhookSettings, environ: Mapping[str, str]) -> None:
    from metaemu.webhook.server import WebhookServer

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with WebhookServer(settings, env=environ):
        await stop.wait()
