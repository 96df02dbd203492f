"""chalicelib/openapi.json describes exactly the routes app.py has, and is served."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from openapi_spec_validator import validate

from tests.conftest import body

DOC = Path(__file__).resolve().parents[2] / "chalicelib" / "openapi.json"
METHODS = {"get", "put", "post", "delete", "patch", "head", "options"}


def _doc() -> dict[str, Any]:
    return dict(json.loads(DOC.read_text(encoding="utf-8")))


def _documented() -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in _doc()["paths"].items()
            for method in item if method in METHODS}


def _routed() -> set[tuple[str, str]]:
    from app import app

    return {(method, path) for path, methods in app.routes.items() for method in methods}


def test_the_document_is_valid_openapi() -> None:
    validate(_doc())


def test_every_route_is_documented_and_every_documented_route_exists() -> None:
    documented, routed = _documented(), _routed()
    assert routed - documented == set(), "routes missing from chalicelib/openapi.json"
    assert documented - routed == set(), "documented operations that app.py does not route"


def test_auth_routes_say_so() -> None:
    from app import app

    doc = _doc()
    for path, methods in app.routes.items():
        for method, entry in methods.items():
            operation = doc["paths"][path][method.lower()]
            assert bool(operation.get("security")) == (entry.authorizer is not None), \
                f"{method} {path}: security differs from the route's authorizer"
            params = {p["name"] for p in
                      doc["paths"][path].get("parameters", []) + operation.get("parameters", [])
                      if p["in"] == "path"}
            assert params == set(re.findall(r"{(\w+)}", path)), f"{method} {path} parameters"


def test_served_at_openapi_json(client: Any) -> None:
    r = client.http.get("/openapi.json")
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("application/json")
    assert body(r) == _doc()
