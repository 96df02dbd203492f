"""The store's contract (tests/store_contract.py) on the DynamoDB store, on moto's
server: the reference the in-memory store follows."""

from __future__ import annotations

import pytest

from chalicelib.store import Store
from tests.store_contract import StoreContract


@pytest.fixture
def dynamodb_store(tables: Store) -> Store:
    """The DynamoDB store on fresh tables: `tables` (tests/conftest.py) resets moto's
    server and creates them, seeded with the test catalogue; each contract test puts
    the goods it needs. The one place that builds the store for the contract."""
    tables.warm()  # one client for every model, built before the race tests' threads
    return tables


class TestDynamoDBStore(StoreContract):
    @pytest.fixture
    def store(self, dynamodb_store: Store) -> Store:
        return dynamodb_store
