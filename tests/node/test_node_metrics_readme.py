"""The README's node-mode metrics table names exactly the metrics node mode registers."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from metaemu.metrics import create_metrics
from metaemu.node_setup import create_interception_metrics
from metaemu.pods.pod_metrics import create_pod_metrics
from metaemu.pods.startup_taint import create_startup_taint_metrics


def test_the_readme_node_metrics_table_names_only_metrics_node_mode_exports() -> None:
    """Every metric the README's node-mode table documents is one the agent registers, and every
    one it registers beyond the sidecar's is documented there."""

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = readme[readme.index("Node mode adds"):readme.index("### Alerts and runbooks")]
    documented = set(re.findall(r"^\| `(metaemu_[a-z_]+)", table, flags=re.M))
    base = names(create_metrics().registry)
    metrics = create_metrics()
    create_pod_metrics(metrics.registry)
    create_interception_metrics(metrics.registry)
    create_startup_taint_metrics(metrics.registry)
    exported = names(metrics.registry)
    assert documented <= exported, documented - exported
    undocumented = {n.removesuffix("_total") for n in exported - base}
    undocumented = {n for n in undocumented if not n.endswith("_created")}
    assert {n for n in undocumented if n not in documented and f"{n}_total" not in documented} == set()
    assert len(documented) == 11


def names(registry: CollectorRegistry) -> set[str]:
    exported = {f.name for f in text_string_to_metric_families(generate_latest(registry).decode())}
    return exported | {f"{name}_total" for name in exported}  # counters' sample names
