"""The verifier's start-up line names its PostgreSQL store without any credential."""

from __future__ import annotations

import pytest

from verifier.store_postgres import postgres_location


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://user:s3cret@db.example:5433/fleet", "postgresql://db.example:5433/fleet"),
        ("postgresql://db.example/fleet?user=u&password=s3cret", "postgresql://db.example/fleet"),
        ("postgres://[::1]:5432/fleet?sslpassword=s3cret", "postgres://[::1]:5432/fleet"),
        ("postgresql:///fleet?host=/run/pg&password=s3cret", "postgresql:///fleet"),
        ("postgresql://u:s3cret@[::1:bad/fleet", "postgresql://(unparsable URL)"),
    ],
)
def test_the_store_location_never_shows_a_password(url: str, shown: str) -> None:
    assert postgres_location(url) == shown
    assert "s3cret" not in postgres_location(url)
