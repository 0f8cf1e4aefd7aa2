"""Running ``metaemu doctor`` in process against the Google stand-ins on loopback (issue #14)."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from metaemu.clock import Clock
from metaemu.doctor.cli import doctor
from metaemu.doctor.reachability import Resolver, system_resolver
from metaemu.netfilter import CommandRunner
from metaemu.testing.world import World
from metaemu.transport import AiohttpClient


@dataclass(frozen=True, slots=True)
class Outcome:
    status: int
    report: dict[str, Any]
    text: str

    def check(self, name: str) -> dict[str, Any]:
        found: dict[str, Any] = next(c for c in self.report["checks"] if c["name"] == name)
        return found

    @property
    def statuses(self) -> dict[str, str]:
        return {c["name"]: c["status"] for c in self.report["checks"]}

    @property
    def failed(self) -> dict[str, Any]:
        failures: list[dict[str, Any]] = [c for c in self.report["checks"] if c["status"] == "fail"]
        (first,) = failures
        return first


def write_config(world: World, directory: Path, google_url: str, *, impersonate: bool = True,
                 overrides: dict[str, str] | None = None) -> Path:
    raw = world.config(sts_url=f"{google_url}/v1/token", iam_url=f"{google_url}/v1", impersonate=impersonate)
    for key, value in (overrides or {}).items():
        if key in ("audience", "service_account"):
            raw["workload_identity"][key] = value
        else:
            raw[key] = value
    path = directory / "metaemu.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


async def run_doctor(args: Sequence[str], *, clock: Clock, resolver: Resolver = system_resolver,
                     runner: CommandRunner | None = None, environ: dict[str, str] | None = None) -> Outcome:
    """The doctor once with ``--json`` and once human, on the same inputs; both must agree on the exit."""
    results = []
    for extra in (["--json"], []):
        out = io.StringIO()
        http = AiohttpClient()
        try:
            status = await doctor([*args, *extra], environ=environ or {}, clock=clock, http=http, resolver=resolver,
                                  out=out, runner=runner)
        finally:
            await http.close()
        results.append((status, out.getvalue()))
    (json_status, json_text), (human_status, human_text) = results
    assert json_status == human_status
    return Outcome(json_status, json.loads(json_text), human_text)
