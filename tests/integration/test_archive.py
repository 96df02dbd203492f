"""chalicelib/archive.py on moto's S3 (the session's moto server, as `make run`
serves it: `mock_aws` would reset that server's tables when it stops): a bill is kept
byte for byte, encrypted, as a zip, under a key of its day; a day downloaded
twice keeps both files; S3 failing is Unavailable, with the reason."""

from __future__ import annotations

import io
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import date
from typing import Any

import boto3
import pytest

from chalicelib import archive
from chalicelib.archive import S3BillArchive, archive_for
from chalicelib.domain import Unavailable
from tests.conftest import SETTINGS

BUCKET = f"shop-test-bills-{uuid.uuid4().hex[:8]}"
DAY = date(2026, 12, 1)
NAME = "20261201_trade.zip"


@pytest.fixture
def s3(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_server)
    client = boto3.client("s3", region_name="us-east-1", endpoint_url=moto_server)
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    if BUCKET not in existing:
        client.create_bucket(Bucket=BUCKET)
    for kept in client.list_objects_v2(Bucket=BUCKET).get("Contents", []):  # a test's own
        client.delete_object(Bucket=BUCKET, Key=kept["Key"])
    yield client


def test_a_bill_is_kept_unchanged_under_its_day(s3: Any) -> None:
    # More than one multipart part (8 MB): the upload streams, and the parts join up.
    body = os.urandom(9 * 1024 * 1024) + b"PK\x05\x06 end"
    source = io.BytesIO(b"already read" + body)
    source.seek(len(b"already read"))  # kept from where the source stands
    key = S3BillArchive(BUCKET).keep(DAY, NAME, source)
    assert re.fullmatch(r"bills/trade/2026-12-01/\d{8}T\d{6}\.\d{6}Z-20261201_trade\.zip", key)
    got = s3.get_object(Bucket=BUCKET, Key=key)
    assert got["Body"].read() == body
    assert got["ContentType"] == "application/zip"
    assert got["ServerSideEncryption"] == "AES256"


def test_a_day_kept_twice_keeps_both_files(s3: Any) -> None:
    kept = S3BillArchive(BUCKET, client=s3)
    first = kept.keep(DAY, NAME, io.BytesIO(b"first download"))
    second = kept.keep(DAY, NAME, io.BytesIO(b"second download"))
    assert first != second
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix="bills/trade/2026-12-01/")
    assert sorted(o["Key"] for o in listed["Contents"]) == sorted([first, second])
    assert s3.get_object(Bucket=BUCKET, Key=first)["Body"].read() == b"first download"
    assert s3.get_object(Bucket=BUCKET, Key=second)["Body"].read() == b"second download"


def test_a_missing_bucket_is_unavailable_with_the_reason(s3: Any) -> None:
    with pytest.raises(Unavailable, match=r"NoSuchBucket.*") as caught:
        S3BillArchive("shop-test-no-such-bucket").keep(DAY, NAME, io.BytesIO(b"bill"))
    assert "shop-test-no-such-bucket" in str(caught.value)


def test_s3_not_answering_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing listens there: the short timeouts and three attempts end in Unavailable."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # discard: refused
    kept = S3BillArchive(BUCKET)
    assert kept.client.meta.config.connect_timeout == archive.CONNECT_TIMEOUT_SECONDS
    assert kept.client.meta.config.retries["mode"] == "standard"
    with pytest.raises(Unavailable, match="S3 did not take the bill"):
        kept.keep(DAY, NAME, io.BytesIO(b"bill"))


def test_the_settings_name_the_bucket_or_keep_nothing() -> None:
    assert archive_for(replace(SETTINGS, bills_bucket="")) is None
    kept = archive_for(replace(SETTINGS, bills_bucket=BUCKET, aws_region="eu-west-1"))
    assert isinstance(kept, S3BillArchive)
    assert (kept.bucket, kept.region) == (BUCKET, "eu-west-1")


def test_a_name_is_a_file_name() -> None:
    with pytest.raises(ValueError):
        archive.bill_key(DAY, "../other/x.zip", archive.datetime.now(archive.UTC))
