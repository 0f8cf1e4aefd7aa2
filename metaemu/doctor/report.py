"""The doctor's results: one ``Check`` per step of the chain, collected in a ``Report``, rendered for
people (default) or as JSON (``--json``).

SECURITY: nothing here ever holds token material; checks carry decoded claims and upstream's error
text (which names audiences and accounts, never tokens).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Status = Literal["ok", "warn", "fail", "skip"]
_MARKS: Mapping[Status, str] = {"ok": "[ok]  ", "warn": "[warn]", "fail": "[FAIL]", "skip": "[skip]"}


@dataclass(frozen=True, slots=True, kw_only=True)
class Check:
    """One step. ``diagnosis`` is a stable machine-readable cause (``sts.audience_mismatch``);
    ``upstream`` what the service said (already excerpted); ``fix`` the exact remedy."""

    name: str
    status: Status
    summary: str
    details: Mapping[str, str] = field(default_factory=dict)
    diagnosis: str | None = None
    cause: str | None = None
    fix: str | None = None
    upstream: str | None = None

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "status": self.status, "summary": self.summary,
                               "details": dict(self.details)}
        for key in ("diagnosis", "cause", "fix", "upstream"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


@dataclass(slots=True, kw_only=True)
class Report:
    mode: str
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """The chain works: at least one step ran and none failed (warnings allowed)."""
        return bool(self.checks) and all(c.status != "fail" for c in self.checks)

    @property
    def broken(self) -> bool:
        return any(c.status == "fail" for c in self.checks)

    def add(self, check: Check) -> Check:
        self.checks.append(check)
        return check

    def not_run(self, name: str) -> None:
        self.add(Check(name=name, status="skip", summary="not run: an earlier step failed"))


def render_json(report: Report) -> str:
    return json.dumps({"ok": report.ok, "mode": report.mode, "checks": [c.as_json() for c in report.checks]},
                      indent=2)


def render_human(report: Report) -> str:
    width = max((len(c.name) for c in report.checks), default=0)
    lines = [f"metaemu doctor ({report.mode} mode)"]
    for check in report.checks:
        lines.append(f"{_MARKS[check.status]} {check.name.ljust(width)}  {check.summary}")
        lines.extend(f"         {key}: {value}" for key, value in check.details.items())
        if check.upstream:
            lines.append(f"         upstream said: {check.upstream}")
        if check.cause:
            lines.append(f"         cause: {check.cause}")
        if check.fix:
            lines.extend(f"         {'fix: ' if i == 0 else '     '}{line}"
                         for i, line in enumerate(check.fix.splitlines()))
    verdict = "the chain works" if report.ok else "the chain is broken: fix the first [FAIL] above and run again"
    lines.append(f"metaemu doctor: {verdict}")
    return "\n".join(lines) + "\n"
