"""Prometheus metrics of one verifier process, served over HTTP when its configuration names a
port (`strongroom verifier run --metrics-port P`).

Counts are not kept twice: a collector reads the verifier's own event counts when scraped. Only
the appraisal latency (a message's arrival at the MQTT adapter to its result or reply being
sent) is recorded here, as a histogram. Its own registry, not the library's global one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from strongroom.ear import TIERS
from strongroom.errors import EnvironmentFault

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# metric name, help, the verifier's count it reads
COUNTERS = (
    ("strongroom_evidence_received", "Evidence messages received", "evidence"),
    ("strongroom_key_requests_received", "Key requests received", "key_requests"),
    ("strongroom_key_releases", "Data keys released to attested enclaves", "keys_released"),
    ("strongroom_key_refusals", "Data keys refused", "keys_refused"),
    ("strongroom_revocations", "Revocations sent (automatic and by operators)", "revocations"),
    ("strongroom_messages_rejected", "Messages rejected (malformed, forged, replayed)", "rejected"),
    ("strongroom_challenges_sent", "Challenges sent", "challenges"),
    (
        "strongroom_internal_errors",
        "Messages whose handling met a defect (rejected)",
        "internal_errors",
    ),
    (
        "strongroom_replies_not_published",
        "Replies (key responses, challenges) the broker did not take; no device is blamed",
        "replies_not_published",
    ),
    (
        "strongroom_retained_cleared",
        "Retained evidence or key requests ignored and cleared",
        "retained_cleared",
    ),
)
# what was dropped because a device exceeded its rate limit: label value, the verifier's count
SUPPRESSED = (
    ("status", "status_suppressed"),
    ("challenges", "challenges_suppressed"),
    ("alerts", "alerts_suppressed"),
)


class VerifierMetrics(Collector):
    def __init__(self, counts: Mapping[str, int], queue_depth: Callable[[], int]) -> None:
        self._counts, self._queue_depth = counts, queue_depth
        self.registry = CollectorRegistry(auto_describe=True)
        self.latency = Histogram(
            "strongroom_appraisal_latency_seconds",
            "Time from a message's arrival to its appraisal's result or reply being sent",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(self)

    def collect(self) -> Iterator[Metric]:
        counts = dict(self._counts)  # one consistent copy per scrape
        for name, text, key in COUNTERS:
            yield CounterMetricFamily(name, text, value=counts.get(key, 0))
        appraisals = CounterMetricFamily(
            "strongroom_appraisals", "Appraisals by attestation result status", labels=["status"]
        )
        for status in TIERS:
            appraisals.add_metric([status], counts.get(f"appraised_{status}", 0))
        yield appraisals
        suppressed = CounterMetricFamily(
            "strongroom_rate_limited",
            "Work a device triggered over its rate limit, dropped",
            labels=["kind"],
        )
        for kind, key in SUPPRESSED:
            suppressed.add_metric([kind], counts.get(key, 0))
        yield suppressed
        yield GaugeMetricFamily(
            "strongroom_inbox_depth",
            "Messages waiting in the verifier's inbox",
            self._queue_depth(),
        )

    def serve(self, port: int, bind: str) -> Any:
        """Serve /metrics on `bind:port` from a daemon thread; returns the server."""
        try:
            server, _thread = start_http_server(port, addr=bind, registry=self.registry)
        except OSError as e:
            raise EnvironmentFault(
                f"cannot serve metrics on {bind}:{port}: {e.strerror}",
                hint="choose a free port with --metrics-port",
            ) from e
        return server
