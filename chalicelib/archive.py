"""The provider's raw bills, kept unchanged in S3 (the BillArchive port).

The only module that talks to S3. A bill is stored under

    bills/trade/<yyyy-MM-dd>/<UTC time, microseconds>-<name>

so a day downloaded twice (a rerun, a failed run and its retry) keeps both
files: the copy a report was made from is never overwritten by a later one.
The write streams the file (`upload_fileobj`: multipart beyond its threshold),
so a day of 200,000 rows is never held in memory.

The endpoint is botocore's own: AWS on a stage, `AWS_ENDPOINT_URL_S3` (moto's
server) on the local stack. Any failure to store is `Unavailable`, for the run
to fail with the reason and try again on its next round.
"""

from __future__ import annotations

import logging
import os
import threading
from datetime import UTC, date, datetime
from typing import IO, Any

from chalicelib.config import Settings
from chalicelib.domain import Unavailable
from chalicelib.ports import BillArchive

log = logging.getLogger(__name__)

KEY_PREFIX = "bills/trade"
CONTENT_TYPE = "application/zip"  # Alipay serves the trade bill as a zip
# Short enough that a stuck S3 fails the run within the reconciler's 15 minutes,
# long enough for one multipart part on a slow link.
CONNECT_TIMEOUT_SECONDS = 3
READ_TIMEOUT_SECONDS = 30
MAX_ATTEMPTS = 3
# Parts in flight at once (8 MB each): bounds the memory a big bill's upload takes
# beside the run's own, in a 512 MB function.
MAX_CONCURRENCY = 4


def bill_key(day: date, name: str, now: datetime) -> str:
    """Where the bill `name` of `day` downloaded at `now` is kept."""
    if not name or "/" in name:
        raise ValueError(f"a bill's name is a file name, not {name!r}")
    stamp = now.astimezone(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    return f"{KEY_PREFIX}/{day.isoformat()}/{stamp}-{name}"


def _custom_endpoint() -> bool:
    return bool(os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))


class S3BillArchive:
    """BillArchive on the S3 bucket `bucket`. `client`: an S3 client to use (tests);
    else one is built on first use, in `region`."""

    def __init__(self, bucket: str, client: Any = None, *, region: str = "us-east-1") -> None:
        if not bucket:
            raise ValueError("a bills bucket needs a name")
        self.bucket = bucket
        self.region = region
        self._client = client
        self._lock = threading.Lock()

    @property
    def client(self) -> Any:
        # Built on first use: a process that never keeps a bill (most API calls)
        # pays nothing for it. The lock: two threads keeping at once build one.
        with self._lock:
            if self._client is None:
                self._client = self._build_client()
            return self._client

    def _build_client(self) -> Any:
        try:
            import boto3
            from botocore.config import Config
        except ImportError as exc:  # requirements.txt ships botocore only; Lambda has boto3
            raise Unavailable("S3: boto3 is not installed, so no bill can be kept") from exc
        s3: dict[str, str] = {}
        if _custom_endpoint():
            # moto's server (or any stand-in) is one host: a bucket in the host name
            # (virtual-hosted style) would not resolve, so the bucket goes in the path.
            s3["addressing_style"] = "path"
        config = Config(connect_timeout=CONNECT_TIMEOUT_SECONDS,
                        read_timeout=READ_TIMEOUT_SECONDS,
                        retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"}, s3=s3)
        return boto3.session.Session().client("s3", region_name=self.region, config=config)

    def keep(self, day: date, name: str, source: IO[bytes]) -> str:
        client = self.client  # Unavailable when boto3 is missing
        from boto3.exceptions import Boto3Error
        from boto3.s3.transfer import TransferConfig
        from botocore.exceptions import BotoCoreError, ClientError

        key = bill_key(day, name, datetime.now(UTC))
        try:
            client.upload_fileobj(
                source, self.bucket, key,
                ExtraArgs={"ContentType": CONTENT_TYPE, "ServerSideEncryption": "AES256"},
                Config=TransferConfig(max_concurrency=MAX_CONCURRENCY))
        except ClientError as exc:
            error = exc.response.get("Error", {})
            raise Unavailable(f"S3 refused the bill {name} of {day} (s3://{self.bucket}/{key}): "
                              f"{error.get('Code', '?')} {error.get('Message', '')}".rstrip()
                              ) from exc
        except (BotoCoreError, Boto3Error) as exc:
            raise Unavailable(f"S3 did not take the bill {name} of {day} "
                              f"(s3://{self.bucket}/{key}): {exc}") from exc
        log.info("bill %s of %s kept as s3://%s/%s", name, day, self.bucket, key,
                 extra={"day": day.isoformat(), "bucket": self.bucket, "key": key})
        return key


def archive_for(settings: Settings) -> BillArchive | None:
    """The settings' archive: None when no bills bucket is set (nothing is kept)."""
    if not settings.bills_bucket:
        return None
    return S3BillArchive(settings.bills_bucket, region=settings.aws_region)
