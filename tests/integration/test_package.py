"""`make package STAGE=prod`, checked offline: the SAM template chalice writes with
.chalice/resources.json merged in holds the tables (keys and indexes as the
pynamodb models declare them), the functions, the sweeper's schedule, the notify
function URL, a least-privilege policy, and no secret, only references to SSM
and Secrets Manager.

The build is the real one (local.package, as the Makefile runs it). The first
build on a machine downloads the Lambda wheels from PyPI; chalice caches them in
.chalice/deployments/ and later builds take about a second. Nothing talks to AWS.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path
from typing import Any

import pytest

from chalicelib import config
from local import package
from tests.conftest import MODELS

STAGE = "prod"
REPO = Path(__file__).resolve().parents[2]
SECRET_SETTINGS = ("JWT_SECRET", "RMQ_URL", "ALIPAY_APP_PRIVATE_KEY")
SSM_SETTINGS = ("ALIPAY_APP_ID", "ALIPAY_SELLER_ID", "ALIPAY_GATEWAY", "ALIPAY_PUBLIC_KEY")
FUNCTIONS = {  # logical id -> handler
    "APIHandler": "app.app",
    "JwtAuth": "app.jwt_auth",
    "Sweeper": "app.sweeper",
    "AlipayNotifyUrl": "app.alipay_notify_url",
}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, Path]:
    out = tmp_path_factory.mktemp("package") / STAGE
    sam = package.build(STAGE, out)
    text = sam.read_text()
    return json.loads(text), text, out


def resources(template: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in template["Resources"].items() if v["Type"] == kind}


def function_env(template: dict[str, Any], name: str) -> dict[str, Any]:
    return template["Resources"][name]["Properties"]["Environment"]["Variables"]


def test_functions_and_the_sweepers_schedule(built: Any) -> None:
    template, _, out = built
    functions = resources(template, "AWS::Serverless::Function")
    assert {k: v["Properties"]["Handler"] for k, v in functions.items()} == FUNCTIONS
    for fn in functions.values():
        assert fn["Properties"]["Runtime"] == "python3.11"
        assert fn["Properties"]["CodeUri"] == "./deployment.zip"
    events = functions["Sweeper"]["Properties"]["Events"]
    assert [e["Properties"]["Schedule"] for e in events.values()] == ["rate(5 minutes)"]
    assert "RestAPI" in template["Resources"]
    assert (out / "deployment.zip").stat().st_size > 1_000_000


def _model_tables() -> dict[str, dict[str, Any]]:
    """What the pynamodb models declare, by table name suffix (goods, carts, orders ...)."""
    prefix = f"shop-{config.get().stage}-"
    tables: dict[str, dict[str, Any]] = {}
    for model in MODELS.all:  # several models may share one table (same keys, other items)
        name = model.Meta.table_name
        assert name.startswith(prefix), name
        schema = model._get_schema()
        seen = tables.setdefault(name.removeprefix(prefix), schema)
        assert _keys(seen["key_schema"]) == _keys(schema["key_schema"]), name
        seen["attribute_definitions"] = list({a["AttributeName"]: a for a in (
            *seen["attribute_definitions"], *schema["attribute_definitions"])}.values())
        seen["global_secondary_indexes"] = list({i["index_name"]: i for i in (
            *seen["global_secondary_indexes"], *schema["global_secondary_indexes"])}.values())
    return tables


def _keys(schema: list[dict[str, str]]) -> dict[str, str]:
    return {k["AttributeName"]: k["KeyType"] for k in schema}


def test_tables_match_the_models_keys_and_indexes(built: Any) -> None:
    template, _, _ = built
    tables = {t["Properties"]["TableName"]: t
              for t in resources(template, "AWS::DynamoDB::Table").values()}
    declared = _model_tables()
    assert sorted(tables) == sorted(f"shop-{STAGE}-{s}" for s in declared), (
        "every pynamodb model needs its table in .chalice/resources.json")
    for suffix, schema in declared.items():
        table = tables[f"shop-{STAGE}-{suffix}"]
        props = table["Properties"]
        assert table["DeletionPolicy"] == "Retain"
        assert props["BillingMode"] == "PAY_PER_REQUEST"
        assert props["PointInTimeRecoverySpecification"] == {"PointInTimeRecoveryEnabled": True}
        assert _keys(props["KeySchema"]) == _keys(schema["key_schema"]), suffix
        assert ({a["AttributeName"]: a["AttributeType"] for a in props["AttributeDefinitions"]}
                == {a["AttributeName"]: a["AttributeType"]
                    for a in schema["attribute_definitions"]}), suffix
        want = {i["index_name"]: (_keys(i["key_schema"]), i["projection"]["ProjectionType"])
                for i in schema["global_secondary_indexes"]}
        got = {i["IndexName"]: (_keys(i["KeySchema"]), i["Projection"]["ProjectionType"])
               for i in props.get("GlobalSecondaryIndexes", [])}
        assert got == want, suffix


def test_every_function_names_the_tables_of_the_template(built: Any) -> None:
    template, _, _ = built
    names = {t["Properties"]["TableName"]
             for t in resources(template, "AWS::DynamoDB::Table").values()}
    for fn in FUNCTIONS:
        env = function_env(template, fn)
        assert env["STAGE"] == STAGE
        assert {env["GOODS_TABLE"], env["CARTS_TABLE"], env["ORDERS_TABLE"]} <= names


def test_the_notify_function_url(built: Any) -> None:
    template, _, _ = built
    (url_id, url), = resources(template, "AWS::Lambda::Url").items()
    assert url["Properties"] == {"AuthType": "NONE",
                                 "TargetFunctionArn": {"Fn::GetAtt": ["AlipayNotifyUrl", "Arn"]}}
    perms = [p["Properties"] for p in resources(template, "AWS::Lambda::Permission").values()
             if p["Properties"]["FunctionName"] == {"Ref": "AlipayNotifyUrl"}]
    assert {p["Action"] for p in perms} == {"lambda:InvokeFunctionUrl", "lambda:InvokeFunction"}
    assert all(p.get("FunctionUrlAuthType") == "NONE" or p.get("InvokedViaFunctionUrl") is True
               for p in perms)
    # The page pay's notify_url is that URL; the return page's URL is a parameter.
    api_env = function_env(template, "APIHandler")
    assert api_env["ALIPAY_NOTIFY_URL"] == {"Fn::GetAtt": [url_id, "FunctionUrl"]}
    assert api_env["ALIPAY_RETURN_URL"] == {"Ref": "AlipayReturnUrl"}
    assert template["Outputs"]["AlipayNotifyFunctionUrl"]["Value"] == {
        "Fn::GetAtt": [url_id, "FunctionUrl"]}
    # No function refers to its own URL (a cycle CloudFormation refuses).
    assert function_env(template, "AlipayNotifyUrl")["ALIPAY_NOTIFY_URL"] == ""


def test_policy_is_least_privilege(built: Any) -> None:
    template, _, _ = built
    tables = sorted(t["Properties"]["TableName"]
                    for t in resources(template, "AWS::DynamoDB::Table").values())
    indexes = sorted(f"{t['Properties']['TableName']}/index/{i['IndexName']}"
                     for t in resources(template, "AWS::DynamoDB::Table").values()
                     for i in t["Properties"].get("GlobalSecondaryIndexes", []))
    roles = resources(template, "AWS::IAM::Role")
    assert roles
    for name, role in roles.items():
        (policy,) = role["Properties"]["Policies"]
        statements = policy["PolicyDocument"]["Statement"]
        for st in statements:
            assert st["Effect"] == "Allow"
            actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
            res = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
            assert all(a.startswith(("logs:", "dynamodb:")) and "*" not in a for a in actions), (
                name, actions)
            if actions[0].startswith("logs:"):
                assert res == [f"arn:aws:logs:*:*:log-group:/aws/lambda/shop-pay-{STAGE}*"]
            else:
                assert all(re.fullmatch(r"arn:aws:dynamodb:\*:\*:table/[\w./-]+", r) for r in res)
        dynamo = sorted(r.split(":table/")[1] for st in statements
                        for r in (st["Resource"] if isinstance(st["Resource"], list)
                                  else [st["Resource"]]) if ":dynamodb:" in r)
        assert dynamo == sorted(tables + indexes), name


def test_settings_come_from_ssm_and_secrets_manager(built: Any) -> None:
    template, _, _ = built
    for fn in FUNCTIONS:
        env = function_env(template, fn)
        for key in SECRET_SETTINGS:
            assert re.fullmatch(rf"\{{\{{resolve:secretsmanager:shop-pay/{STAGE}:SecretString:"
                                rf"{key}\}}\}}", env[key]), (fn, key)
        for key in SSM_SETTINGS:
            assert re.fullmatch(rf"\{{\{{resolve:ssm:/shop-pay/{STAGE}/[a-z-]+\}}\}}",
                                env[key]), (fn, key)


def test_no_secret_in_the_template_or_the_zip(built: Any) -> None:
    _, text, out = built
    forbidden = ["-----BEGIN", "PRIVATE KEY", config.LOCAL_JWT_SECRET, "guest:guest", "AKIA"]
    keys_dir = REPO / "local" / ".keys"
    if keys_dir.is_dir():  # the local keys' base64 bodies, line by line
        for pem in keys_dir.glob("*.pem"):
            forbidden += [line for line in pem.read_text().splitlines()
                          if line and not line.startswith("-----")][:3]
    for needle in forbidden:
        assert needle not in text, needle
    assert not re.search(r"amqps?://[^:/\"]+:[^@\"]+@", text), "a broker password in the template"
    with zipfile.ZipFile(out / "deployment.zip") as zf:
        names = zf.namelist()
        assert "app.py" in names and "chalicelib/storefront.html" in names
        assert not [n for n in names if n.startswith(("local/", "tests/", ".chalice/"))]
        assert not [n for n in names if n.endswith(".pem") and "cacert" not in n
                    and not n.startswith("certifi/")]
        app_text = zf.read("app.py").decode() + zf.read("chalicelib/config.py").decode()
        assert "-----BEGIN" not in app_text


def test_a_request_without_a_token_gets_the_contracts_401(built: Any) -> None:
    """API Gateway answers a request with no Authorization header itself, before the
    authorizer runs; its GatewayResponse keeps the contract's {"Code","Message"}.
    `make run` serves the same body (local/api.py reads it from the template)."""
    template, _, _ = built
    found = resources(template, "AWS::ApiGateway::GatewayResponse")
    unauthorized = [r["Properties"] for r in found.values()
                    if r["Properties"]["ResponseType"] == "UNAUTHORIZED"]
    assert len(unauthorized) == 1
    props = unauthorized[0]
    assert props["RestApiId"] == {"Ref": "RestAPI"} and props["StatusCode"] == "401"
    body = json.loads(props["ResponseTemplates"]["application/json"])
    assert set(body) == {"Code", "Message"} and body["Code"] == "UnauthorizedError"
