"""docs/api.md documents exactly the operations of chalicelib/openapi.json.

The convention the docs follow, and this test parses:

- each operation is a level-3 heading `### METHOD /path`, the path spelt as in
  openapi.json (path parameters included: `/orders/{order_id}`);
- the operation's section runs from its heading to the next heading of level 1
  to 3 (headings inside fenced code blocks do not count);
- in it, one `**Auth:** ...` line, starting with `bearer` when the operation
  needs the bearer token;
- and an answers table: each status the route answers is a row whose first
  cell is the code, `| 404 | ... |`.

openapi.json itself is checked against app.py's routes by test_openapi.py.
Only files are read: no app import, no moto, no RabbitMQ.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "api.md"
SPEC = ROOT / "chalicelib" / "openapi.json"
METHODS = ("get", "put", "post", "delete", "patch", "head", "options")

Operation = tuple[str, str]  # ("GET", "/orders/{order_id}")

_ROUTE = re.compile(r"^###[ \t]+(GET|PUT|POST|DELETE|PATCH|HEAD|OPTIONS)[ \t]+(/\S*)[ \t]*$")
_ROUTE_LIKE = re.compile(r"^#+[ \t]+`?(?:GET|PUT|POST|DELETE|PATCH|HEAD|OPTIONS)\b", re.I)
_SECTION_END = re.compile(r"^#{1,3}[ \t]")
_FENCE = re.compile(r"^[ \t]*(```|~~~)")
_STATUS_ROW = re.compile(r"^[ \t]*\|[ \t]*`?([1-5][0-9]{2})`?[ \t]*\|")
_AUTH = re.compile(r"^\*\*Auth:\*\*[ \t]*(\S.*)$")


# --- parsing ----------------------------------------------------------------------


def spec_operations(spec: dict[str, Any]) -> dict[Operation, dict[str, Any]]:
    """(METHOD, path) -> the operation object, for every operation of `paths`."""
    return {(method.upper(), path): operation
            for path, item in spec["paths"].items()
            for method, operation in item.items() if method in METHODS}


def doc_sections(text: str) -> tuple[dict[Operation, list[str]], list[str]]:
    """(METHOD, path) -> the lines of its section; and the problems of the layout
    itself (a route documented twice, a heading that looks like a route but is not
    in the convention)."""
    sections: dict[Operation, list[str]] = {}
    problems: list[str] = []
    current: list[str] | None = None
    in_fence = False
    for number, line in enumerate(text.splitlines(), start=1):
        if _FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence and _SECTION_END.match(line):
            current = None
            found = _ROUTE.match(line)
            if found:
                key = (found[1], found[2])
                if key in sections:
                    problems.append(f"line {number}: {key[0]} {key[1]} is documented twice")
                current = sections.setdefault(key, [])
                continue
            if _ROUTE_LIKE.match(line):
                problems.append(f"line {number}: {line!r} is not `### METHOD /path`")
        elif not in_fence and _ROUTE_LIKE.match(line):
            problems.append(f"line {number}: {line!r} is not `### METHOD /path`")
        if current is not None:
            current.append("" if in_fence else line)  # rows in code blocks do not count
    return sections, problems


def documented_statuses(section: list[str]) -> set[str]:
    return {found[1] for line in section if (found := _STATUS_ROW.match(line))}


def documented_auth(section: list[str]) -> list[str]:
    return [found[1] for line in section if (found := _AUTH.match(line))]


def problems(spec: dict[str, Any], text: str) -> list[str]:
    """Everything in which the docs and the OpenAPI document differ; [] when in step."""
    operations = spec_operations(spec)
    sections, found = doc_sections(text)
    for method, path in sorted(operations.keys() - sections.keys()):
        found.append(f"{method} {path}: in openapi.json, not in docs/api.md")
    for method, path in sorted(sections.keys() - operations.keys()):
        found.append(f"{method} {path}: in docs/api.md, not in openapi.json")
    for key in sorted(operations.keys() & sections.keys()):
        name = f"{key[0]} {key[1]}"
        operation, section = operations[key], sections[key]
        declared = {str(code) for code in operation.get("responses", {})}
        listed = documented_statuses(section)
        for code in sorted(declared - listed):
            found.append(f"{name}: status {code} is declared but not in its answers table")
        for code in sorted(listed - declared):
            found.append(f"{name}: status {code} is in its answers table but not declared")
        auth = documented_auth(section)
        if len(auth) != 1:
            found.append(f"{name}: {len(auth)} `**Auth:**` lines, want one")
        elif auth[0].lower().startswith("bearer") != bool(operation.get("security")):
            found.append(f"{name}: `**Auth:** {auth[0]}` differs from openapi.json's security")
    return found


def _spec() -> dict[str, Any]:
    return dict(json.loads(SPEC.read_text(encoding="utf-8")))


def _docs() -> str:
    return DOCS.read_text(encoding="utf-8")


# --- the real files ----------------------------------------------------------------


def test_the_docs_document_every_operation_of_openapi_json() -> None:
    sections, _ = doc_sections(_docs())
    missing = spec_operations(_spec()).keys() - sections.keys()
    assert missing == set(), "operations of chalicelib/openapi.json missing from docs/api.md"


def test_every_route_the_docs_list_is_in_openapi_json() -> None:
    sections, _ = doc_sections(_docs())
    extra = sections.keys() - spec_operations(_spec()).keys()
    assert extra == set(), "routes in docs/api.md that chalicelib/openapi.json does not declare"


def test_docs_and_openapi_json_are_in_step() -> None:
    """Statuses, auth and layout too; every difference at once."""
    found = problems(_spec(), _docs())
    assert found == [], "docs/api.md and chalicelib/openapi.json differ:\n" + "\n".join(found)


# --- the checker itself ------------------------------------------------------------


def _new_problems(spec: dict[str, Any]) -> set[str]:
    """What `spec` finds in the real docs beyond what the real openapi.json finds."""
    return set(problems(spec, _docs())) - set(problems(_spec(), _docs()))


def test_a_route_added_to_openapi_json_without_docs_is_caught() -> None:
    spec = copy.deepcopy(_spec())
    spec["paths"]["/orders/{order_id}/refunds"] = {
        "post": {"responses": {"201": {"description": "refund"}}}}
    assert _new_problems(spec) == {
        "POST /orders/{order_id}/refunds: in openapi.json, not in docs/api.md"}


def test_a_status_added_to_openapi_json_without_docs_is_caught() -> None:
    spec = copy.deepcopy(_spec())
    spec["paths"]["/goods"]["get"]["responses"]["429"] = {"description": "slow down"}
    assert _new_problems(spec) == {
        "GET /goods: status 429 is declared but not in its answers table"}


def test_the_parser_on_a_small_document() -> None:
    spec = {"paths": {
        "/a/{a_id}": {"parameters": [], "get": {"responses": {"200": {}, "404": {}}},
                      "put": {"security": [{"bearer": []}], "responses": {"200": {}}}},
    }}
    text = "\n".join([
        "# API", "", "## Things",
        "### GET /a/{a_id}", "**Auth:** none", "", "| status | when |", "|---|---|",
        "| 200 | found |", "| `404` | unknown |",
        "```", "### PUT /a/{a_id}", "| 500 | in a code block: not a row, not a heading |", "```",
        "#### an example, still in the section",
        "## Other things", "| 409 | outside every route |",
        "### PUT /a/{a_id}", "**Auth:** bearer token", "| 200 | set |",
    ])
    sections, layout = doc_sections(text)
    assert layout == []
    assert set(sections) == {("GET", "/a/{a_id}"), ("PUT", "/a/{a_id}")}
    assert documented_statuses(sections[("GET", "/a/{a_id}")]) == {"200", "404"}
    assert problems(spec, text) == []
    assert problems(spec, text.replace("| `404` |", "| 410 |")) == [
        "GET /a/{a_id}: status 404 is declared but not in its answers table",
        "GET /a/{a_id}: status 410 is in its answers table but not declared",
    ]
    assert problems(spec, text.replace("**Auth:** bearer token", "**Auth:** none")) == [
        "PUT /a/{a_id}: `**Auth:** none` differs from openapi.json's security"]
    assert problems(spec, text + "\n### GET /a/{id}\n**Auth:** none\n") == [
        "GET /a/{id}: in docs/api.md, not in openapi.json"]
    assert problems(spec, text + "\n### `get /b`\n") == [
        "line 21: '### `get /b`' is not `### METHOD /path`"]
