"""Unit tests run on fakes: the in-memory store instead of moto's DynamoDB, the
fake publisher instead of RabbitMQ. Offline, in seconds."""

from __future__ import annotations

import pytest

from chalicelib.memstore import InMemoryStore
from tests.conftest import CATALOGUE


@pytest.fixture
def tables() -> InMemoryStore:
    """The store with the test catalogue: in memory, under the same rules as DynamoDB
    (tests/store_contract.py holds both stores to them)."""
    store = InMemoryStore()
    for g in CATALOGUE:
        store.put_goods(g)
    return store
