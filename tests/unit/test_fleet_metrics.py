"""/metrics for a fleet: per-worker series carry worker_id, table-wide gauges do not; the Grafana dashboard
and the Prometheus alert rules in deploy/ query only metrics that /metrics exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.db import migrated_engine
from worker.live.events import LiveSink
from worker.live.http_server import LiveServer
from worker.live.metrics import TABLE_METRICS, WORKER_METRICS
from worker.live.monitor import GpuReading, ResourceMonitor
from worker.store.repository import SqlTaskRepository
from worker.task import NewTask

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy/grafana/wan-worker-dashboard.json"
ALERTS = ROOT / "deploy/prometheus/alerts.yml"
# PromQL words that look like metric names but are functions, keywords or label names.
NOT_METRICS = {
    "by",
    "without",
    "on",
    "and",
    "or",
    "unless",
    "le",
    "worker_id",
    "outcome",
    "status",
    "max",
    "sum",
    "min",
}
# (aggregations followed by "by (...)" are not followed by "(" directly)


class _Probe:
    name = "Fake GPU"

    def read(self) -> GpuReading:
        return GpuReading(3 * 2**30, 80 * 2**30, 40.0, 55.0)


def _scrape(tmp_path: Path) -> dict[str, list[dict[str, str]]]:
    """Sample name -> label sets, from a server with every series populated."""
    repository = SqlTaskRepository(migrated_engine(f"sqlite:///{tmp_path / 'tasks.db'}"))
    repository.insert(NewTask("t2v", {"model": "tiny_t2v", "prompt": "a cat"}))
    sink = LiveSink(monitor=ResourceMonitor(probe=_Probe()), outbox_size=10)
    sink.monitor.sample()  # type: ignore[union-attr]
    server = LiveServer(repository, sink, "127.0.0.1", 0, worker_id="gpu-7")
    server.hub.current = {"task_id": "t", "progress": {"eta_seconds": 12.0, "percent": 50.0}}
    server.metrics.on_event({"event": "generation_completed", "step_times": [0.2, 0.3]})
    samples: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(server.metrics.text().decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(dict(sample.labels))
    return samples


def test_per_worker_series_carry_worker_id_and_table_gauges_do_not(tmp_path: Path) -> None:
    samples = _scrape(tmp_path)
    for name in TABLE_METRICS:
        assert name in samples and all("worker_id" not in labels for labels in samples[name]), name
    for name in WORKER_METRICS:
        found = [s for s in samples if s == name or s.startswith(name + "_")]
        assert found, f"{name} is not exported"
        for sample in found:
            assert all(labels.get("worker_id") == "gpu-7" for labels in samples[sample]), sample
    assert samples["wan_table_queue_depth"] == [{}]  # one unlabelled series: max() over workers is the table's


def _queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    rules = yaml.safe_load(ALERTS.read_text())
    exprs += [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    return exprs


def test_the_dashboard_and_alerts_query_only_exported_metrics(tmp_path: Path) -> None:
    exported = set(_scrape(tmp_path))
    exprs = _queries()
    assert len(exprs) >= 10
    named = set()
    for expr in exprs:
        without_labels = re.sub(r"\{[^}]*\}", "", re.sub(r"\[[^\]]*\]", "", expr))
        for word in re.findall(r"\b[a-z_][a-z0-9_]*\b(?!\s*\()", without_labels):
            if word.startswith("wan_"):
                named.add(word)
                assert word in exported, f"{word!r} in {expr!r} is not a metric /metrics exports"
            else:
                assert word in NOT_METRICS, f"unexpected word {word!r} in {expr!r}"
    assert {"wan_table_queue_depth", "wan_table_tasks", "wan_step_seconds_bucket", "wan_gpu_memory_used_bytes"} <= named
    assert any('outcome="failed"' in e for e in exprs)
    # Table-wide gauges are never summed across the fleet.
    assert not [e for e in exprs if re.search(r"sum[^()]*\([^()]*wan_table_", e)]


@pytest.mark.parametrize("alert", ["WanQueueStalled", "WanWorkerCrashLooping"])
def test_the_required_alerts_exist(alert: str) -> None:
    rules = yaml.safe_load(ALERTS.read_text())
    assert alert in [rule["alert"] for group in rules["groups"] for rule in group["rules"]]
