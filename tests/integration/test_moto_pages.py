"""local/dynamodb.py's paged index queries: pages of one sort kept while nothing
is written give exactly the items, order and page ends moto's own query gives,
with a Limit, over several 1 MB pages, and with writes between the pages."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pytest

N = 900  # three days of 300, 3-7 KB each: a day spans two 1 MB pages


@pytest.fixture(scope="module")
def table(moto_server: str) -> Iterator[tuple[Any, str]]:
    client = boto3.client("dynamodb", region_name="us-east-1", endpoint_url=moto_server)
    name = f"pages-{uuid.uuid4().hex[:8]}"
    client.create_table(
        TableName=name, BillingMode="PAY_PER_REQUEST",
        AttributeDefinitions=[{"AttributeName": a, "AttributeType": "S"} for a in ("id", "day")],
        KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
        GlobalSecondaryIndexes=[{
            "IndexName": "by-day", "Projection": {"ProjectionType": "ALL"},
            "KeySchema": [{"AttributeName": "day", "KeyType": "HASH"},
                          {"AttributeName": "id", "KeyType": "RANGE"}]}])
    for start in range(0, N, 25):
        client.batch_write_item(RequestItems={name: [
            {"PutRequest": {"Item": {"id": {"S": f"o{i:05d}"}, "day": {"S": f"d{i % 3}"},
                                     "pad": {"S": "x" * (3000 + i * 37 % 4000)}}}}
            for i in range(start, min(N, start + 25))]})
    yield client, name
    client.delete_table(TableName=name)


def read(client: Any, name: str, day: str, *, limit: int | None = None,
         forward: bool = True, write_between: bool = False) -> tuple[list[str], int]:
    found: list[str] = []
    pages = 0
    more: dict[str, Any] = {}
    while True:
        page = client.query(
            TableName=name, IndexName="by-day", KeyConditionExpression="#d = :d",
            ExpressionAttributeNames={"#d": "day"},
            ExpressionAttributeValues={":d": {"S": day}}, ScanIndexForward=forward,
            **({"Limit": limit} if limit else {}), **more)
        pages += 1
        found += [item["id"]["S"] for item in page["Items"]]
        if write_between:
            client.put_item(TableName=name, Item={"id": {"S": f"w{uuid.uuid4().hex}"},
                                                  "day": {"S": "elsewhere"}})
        if "LastEvaluatedKey" not in page:
            return found, pages
        more = {"ExclusiveStartKey": page["LastEvaluatedKey"]}


@pytest.mark.parametrize("day", ["d0", "d1", "d2"])
def test_every_way_of_paging_gives_the_days_items_in_order(table: tuple[Any, str],
                                                           day: str) -> None:
    client, name = table
    expected = sorted(f"o{i:05d}" for i in range(N) if f"d{i % 3}" == day)
    whole, pages = read(client, name, day)
    assert whole == expected and pages > 1  # several 1 MB pages
    assert read(client, name, day, limit=7)[0] == expected
    assert read(client, name, day, limit=len(expected))[0] == expected
    assert read(client, name, day, limit=50, write_between=True)[0] == expected
    assert read(client, name, day, forward=False)[0] == expected[::-1]


def test_a_write_between_pages_shows_in_the_next_page(table: tuple[Any, str]) -> None:
    client, name = table
    first = client.query(TableName=name, IndexName="by-day", Limit=5,
                         KeyConditionExpression="#d = :d",
                         ExpressionAttributeNames={"#d": "day"},
                         ExpressionAttributeValues={":d": {"S": "d0"}})
    last = first["LastEvaluatedKey"]["id"]["S"]  # o00012: d0's fifth
    client.put_item(TableName=name, Item={"id": {"S": f"{last}z"}, "day": {"S": "d0"}})
    try:
        rest = client.query(TableName=name, IndexName="by-day", Limit=5,
                            KeyConditionExpression="#d = :d",
                            ExpressionAttributeNames={"#d": "day"},
                            ExpressionAttributeValues={":d": {"S": "d0"}},
                            ExclusiveStartKey=first["LastEvaluatedKey"])
        assert rest["Items"][0]["id"]["S"] == f"{last}z"  # sorts right after the last
    finally:
        client.delete_item(TableName=name, Key={"id": {"S": f"{last}z"}})
