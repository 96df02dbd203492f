"""What every part of the DynamoDB store shares: the models of its tables, one
connection, and the mapping of DynamoDB's failures to `Unavailable`."""

from __future__ import annotations

import base64
import binascii
import json
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pynamodb.connection import Connection
from pynamodb.exceptions import (
    DeleteError,
    DoesNotExist,
    GetError,
    PutError,
    PynamoDBConnectionError,
    QueryError,
    ScanError,
    TableError,
    TransactWriteError,
    UpdateError,
)
from pynamodb.transactions import TransactWrite

from chalicelib.config import Tables
from chalicelib.domain import Invalid, Unavailable
from chalicelib.store.models import (
    CONNECT_TIMEOUT_SECONDS,
    MAX_RETRY_ATTEMPTS,
    READ_TIMEOUT_SECONDS,
    Models,
    models_for,
)

DYNAMO_ERRORS = (
    PynamoDBConnectionError,
    GetError,
    PutError,
    UpdateError,
    DeleteError,
    QueryError,
    ScanError,
    TableError,
)


@contextmanager
def dynamo() -> Iterator[None]:
    """DynamoDB not answering (connection lost, timeouts, retries spent): Unavailable,
    which the routes answer with 503 and the worker retries."""
    try:
        yield
    except DYNAMO_ERRORS as exc:
        raise Unavailable("dynamodb is not answering") from exc


def get_item(model: Any, key: str, *, consistent: bool = True,
             range_key: str | None = None) -> Any | None:
    """The item, or None when there is none."""
    try:
        return model.get(key, range_key, consistent_read=consistent)
    except DoesNotExist:
        return None
    except DYNAMO_ERRORS as exc:
        raise Unavailable("dynamodb is not answering") from exc


@dataclass
class Condition:
    held: bool = True


@contextmanager
def conditional() -> Iterator[Condition]:
    """A write with a condition: `.held` is False after the block when the condition
    failed (nothing was written); DynamoDB not answering raises Unavailable."""
    outcome = Condition()
    try:
        yield outcome
    except (UpdateError, PutError) as exc:
        if exc.cause_response_code != "ConditionalCheckFailedException":
            raise Unavailable("dynamodb is not answering") from exc
        outcome.held = False
    except DYNAMO_ERRORS as exc:
        raise Unavailable("dynamodb is not answering") from exc


def write_transaction(connection: Connection, build: Callable[[TransactWrite], None], *,
                      attempts: int = 1) -> None:
    """Commits the transaction `build` fills. Cancelled only because another
    transaction held one of its items (no condition failed), it is tried again
    after a short pause, `attempts` times in all. Otherwise the TransactWriteError
    is raised for the caller to read its reasons; DynamoDB not answering:
    Unavailable."""
    for attempt in range(1, attempts + 1):
        try:
            with TransactWrite(connection=connection) as tx:
                build(tx)
            return
        except TransactWriteError as exc:
            if (attempt < attempts and retryable(exc)
                    and "ConditionalCheckFailed" not in reasons(exc)):
                time.sleep(random.uniform(0.02, 0.1) * attempt)
                continue
            raise
        except DYNAMO_ERRORS as exc:
            raise Unavailable("dynamodb is not answering") from exc


def transaction_held(connection: Connection, build: Callable[[TransactWrite], None], what: str,
                     *, attempts: int = 1) -> bool:
    """`write_transaction`, answering False when one of its conditions failed (nothing
    was written); any other cancellation is Unavailable, naming `what`."""
    try:
        write_transaction(connection, build, attempts=attempts)
        return True
    except TransactWriteError as exc:
        if "ConditionalCheckFailed" in reasons(exc):
            return False
        raise Unavailable(f"{what}: {reasons(exc)}") from exc


def reasons(exc: TransactWriteError) -> list[str | None]:
    """The cancellation reason of each action of a cancelled transaction, in order."""
    return [r.code if r is not None else None for r in exc.cancellation_reasons]


def retryable(exc: TransactWriteError) -> bool:
    return exc.cause_response_code == "TransactionInProgressException" or any(
        r in ("TransactionConflict", "ThrottlingError") for r in reasons(exc))


def encode_cursor(position: dict[str, Any]) -> str:
    """A page's position as an opaque, URL-safe string."""
    raw = json.dumps(position, separators=(",", ":"), sort_keys=True).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> dict[str, Any]:
    """The position a cursor names; Invalid when it is not one of ours."""
    if not cursor:
        return {}
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        position = json.loads(raw)
    except (ValueError, binascii.Error) as exc:
        raise Invalid("cursor is not one this API gave") from exc
    if not isinstance(position, dict):
        raise Invalid("cursor is not one this API gave")
    return position


class StoreBase:
    """The tables' models and the one connection every part uses. Opens nothing
    until the first call that needs DynamoDB."""

    def __init__(self, tables: Tables, region: str) -> None:
        self.tables = tables
        self.region = region
        self.models: Models = models_for(tables, region)
        self._connection: Connection | None = None

    @property
    def connection(self) -> Connection:
        if self._connection is None:
            self._connection = Connection(
                region=self.region,
                connect_timeout_seconds=CONNECT_TIMEOUT_SECONDS,
                read_timeout_seconds=READ_TIMEOUT_SECONDS,
                max_retry_attempts=MAX_RETRY_ATTEMPTS,
            )
        return self._connection

    def create_tables(self) -> None:
        for model in self.models.all:
            if not model.exists():
                model.create_table(billing_mode="PAY_PER_REQUEST", wait=True)

    def warm(self) -> None:
        """One botocore client for every model and the transactions, built now.

        pynamodb builds a client per model class on first use (about 10 MB each,
        and threads that first use a class together each build one). A botocore
        client is safe to share between threads once built, and every model has the
        same region, endpoint and timeouts, so they all get this one. The worker
        calls this before it starts its threads."""
        client = self.connection.client
        for model in self.models.all:
            model._get_connection().connection._client = client

    def ping(self) -> None:
        try:
            self.models.Order.describe_table()
        except DYNAMO_ERRORS as exc:
            raise Unavailable(f"dynamodb: {exc}") from exc
