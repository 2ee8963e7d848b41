"""The verifier's Prometheus metrics: what the collector reports follows what the verifier did,
and `verifier run --metrics-port` serves them over HTTP."""

from __future__ import annotations

import re
import time
import urllib.request

from prometheus_client import generate_latest

from strongroom import topics
from strongroom.mqtt import Inbound
from tests.fleet import Fleet, free_port, wait_until
from tests.verifier_rig import Rig


def _value(text: str, sample: str) -> float:
    match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
    assert match, f"{sample} not in metrics"
    return float(match.group(1))


def test_metrics_follow_appraisals_rejections_and_latency(rig: Rig) -> None:
    arrived = time.monotonic() - 0.05
    good = [rig.evidence("cam-a"), rig.evidence("cam-b")]
    batch = [Inbound(m.topic, m.payload, False, arrived) for m in good]
    batch.append(Inbound(topics.device_topic("cam-a", topics.EVIDENCE), b"junk", False, arrived))
    rig.verifier.handle_batch(batch)
    text = generate_latest(rig.verifier.metrics.registry).decode()
    assert _value(text, "strongroom_evidence_received_total") == 3
    assert _value(text, 'strongroom_appraisals_total{status="affirming"}') == 2
    assert _value(text, 'strongroom_appraisals_total{status="contraindicated"}') == 0
    assert _value(text, "strongroom_messages_rejected_total") == 1
    assert _value(text, "strongroom_appraisal_latency_seconds_count") == 2
    assert _value(text, "strongroom_appraisal_latency_seconds_sum") >= 0.1
    assert _value(text, 'strongroom_appraisal_latency_seconds_bucket{le="0.01"}') == 0
    assert _value(text, "strongroom_inbox_depth") == 0


def test_the_verifier_serves_metrics_over_http(fleet: Fleet) -> None:
    port = free_port()
    fleet.start(verifier_args=("--metrics-port", str(port)))
    fleet.enroll("cam-1")
    fleet.agent("cam-1")
    assert fleet.observer is not None
    fleet.observer.wait_result("cam-1", "affirming")

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    def released() -> str | None:
        text = scrape()
        return text if _value(text, "strongroom_key_releases_total") >= 1 else None

    text = wait_until(released, 30, "a key release in the metrics")
    assert _value(text, 'strongroom_appraisals_total{status="affirming"}') >= 1
    assert _value(text, "strongroom_appraisal_latency_seconds_count") >= 1
    assert "strongroom_inbox_depth" in text
