"""local.package.policy_problems on a small hand-made template: a clean one passes,
and each planted excess (a `*`, a Scan the code never makes, a secret a function
does not use, a notify without reserved concurrency) is named. The real template
is checked by tests/integration/test_package.py."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from local.package import policy_problems

ARN = "arn:${AWS::Partition}:%s:${AWS::Region}:${AWS::AccountId}:%s"
SM = "{{resolve:secretsmanager:shop-pay/prod:SecretString:%s}}"
SSM = "{{resolve:ssm:/shop-pay/prod/%s}}"


def _function(name: str, role_id: str, env: dict[str, Any], **props: Any) -> dict[str, Any]:
    return {"Type": "AWS::Serverless::Function",
            "Properties": {"FunctionName": name, "Handler": "app.x",
                           "Role": {"Fn::GetAtt": [role_id, "Arn"]},
                           "Environment": {"Variables": {"STAGE": "prod", **env}}, **props}}


def _role(function_name: str, *statements: dict[str, Any]) -> dict[str, Any]:
    logs = {"Sid": "OwnLogs", "Effect": "Allow",
            "Action": ["logs:CreateLogStream", "logs:PutLogEvents"],
            "Resource": {"Fn::Sub": ARN % ("logs", f"log-group:/aws/lambda/{function_name}:*")}}
    return {"Type": "AWS::IAM::Role", "Properties": {"Policies": [
        {"PolicyName": "p", "PolicyDocument": {"Version": "2012-10-17",
                                               "Statement": [logs, *statements]}}]}}


def _table(name: str, *actions: str) -> dict[str, Any]:
    return {"Effect": "Allow", "Action": [f"dynamodb:{a}" for a in actions],
            "Resource": {"Fn::Sub": ARN % ("dynamodb", f"table/{name}")}}


@pytest.fixture
def template() -> dict[str, Any]:
    return {"Resources": {
        "JwtAuth": _function("shop-pay-prod-jwt_auth", "JwtAuthRole",
                             {"FUNCTION_ROLE": "authorizer", "JWT_SECRET": SM % "JWT_SECRET"}),
        "JwtAuthRole": _role("shop-pay-prod-jwt_auth"),
        "AlipayNotifyUrl": _function(
            "shop-pay-prod-alipay_notify_url", "NotifyRole",
            {"FUNCTION_ROLE": "notify", "RMQ_URL": SM % "RMQ_PUBLISH_URL",
             "ALIPAY_APP_ID": SSM % "alipay-app-id", "ALIPAY_SELLER_ID": SSM % "alipay-seller-id",
             "ALIPAY_PUBLIC_KEY": SSM % "alipay-public-key"},
            ReservedConcurrentExecutions=10),
        "NotifyRole": _role("shop-pay-prod-alipay_notify_url",
                            _table("shop-prod-orders", "GetItem")),
        "APIHandler": _function(
            "shop-pay-prod", "ApiRole",
            {"FUNCTION_ROLE": "api", "RMQ_URL": SM % "RMQ_PUBLISH_URL",
             "ALIPAY_APP_ID": SSM % "alipay-app-id", "ALIPAY_SELLER_ID": SSM % "alipay-seller-id",
             "ALIPAY_GATEWAY": SSM % "alipay-gateway",
             "ALIPAY_APP_PRIVATE_KEY": SM % "ALIPAY_APP_PRIVATE_KEY",
             "ALIPAY_PUBLIC_KEY": SSM % "alipay-public-key"}),
        "ApiRole": _role("shop-pay-prod", _table("shop-prod-goods", "Scan", "UpdateItem")),
    }}


def test_the_clean_template_passes(template: dict[str, Any]) -> None:
    assert policy_problems(template) == []


def statements(template: dict[str, Any], role: str) -> list[dict[str, Any]]:
    return template["Resources"][role]["Properties"]["Policies"][0]["PolicyDocument"]["Statement"]


@pytest.mark.parametrize("plant", [
    lambda st: st[1].update(Action=["dynamodb:*"]),
    lambda st: st[1].update(Action="*"),
    lambda st: st[1].update(Resource={"Fn::Sub": ARN % ("dynamodb", "table/*")}),
    lambda st: st[1].update(Resource="arn:aws:dynamodb:*:*:table/shop-prod-orders"),
    lambda st: st[1].update(Resource={"Fn::Sub": ARN % ("dynamodb",
                                                        "table/shop-prod-orders/index/*")}),
    # the log wildcard is allowed on the function's own group only
    lambda st: st[0].update(Resource={"Fn::Sub": ARN % ("logs", "log-group:/aws/lambda/*")}),
    lambda st: st[0].update(Resource={"Fn::Sub": ARN % (
        "logs", "log-group:/aws/lambda/shop-pay-prod:*")}),
], ids=["action-service", "action-all", "table", "region-account", "index", "logs-all",
        "logs-other-function"])
def test_a_planted_star_fails(template: dict[str, Any], plant: Any) -> None:
    plant(statements(template, "NotifyRole"))
    (problem,) = policy_problems(template)
    assert problem.startswith("AlipayNotifyUrl (notify): wildcard"), problem


def test_a_scan_the_code_does_not_make_fails(template: dict[str, Any]) -> None:
    other = copy.deepcopy(template)
    statements(template, "NotifyRole")[1]["Action"].append("dynamodb:Scan")
    assert policy_problems(template) == [
        "AlipayNotifyUrl (notify): dynamodb:Scan on "
        f"'{ARN % ('dynamodb', 'table/shop-prod-orders')}', which the code never scans"]
    # The API scans goods and sales; the same action on another table is refused.
    statements(other, "ApiRole")[1]["Resource"] = {"Fn::Sub": ARN % (
        "dynamodb", "table/shop-prod-orders")}
    assert policy_problems(other) == [
        "APIHandler (api): dynamodb:Scan on "
        f"'{ARN % ('dynamodb', 'table/shop-prod-orders')}', which the code never scans"]


@pytest.mark.parametrize(("function", "name"), [
    ("AlipayNotifyUrl", "ALIPAY_APP_PRIVATE_KEY"),
    ("AlipayNotifyUrl", "JWT_SECRET"),
    ("JwtAuth", "RMQ_URL"),
    ("APIHandler", "JWT_SECRET"),
    ("APIHandler", "RMQ_WORKER_URL"),
])
def test_a_planted_secret_fails(template: dict[str, Any], function: str, name: str) -> None:
    env = template["Resources"][function]["Properties"]["Environment"]["Variables"]
    env[name] = SM % name
    (problem,) = policy_problems(template)
    assert problem.endswith(f"is given {name}, which it does not use"), problem


def test_a_secret_written_into_the_template_fails(template: dict[str, Any]) -> None:
    env = template["Resources"]["AlipayNotifyUrl"]["Properties"]["Environment"]["Variables"]
    env["RMQ_URL"] = "amqps://notify:hunter2@broker:5671/%2F"
    assert policy_problems(template) == [
        "AlipayNotifyUrl: RMQ_URL is written in the template, not resolved from SSM or "
        "Secrets Manager"]


def test_a_missing_setting_or_role_fails(template: dict[str, Any]) -> None:
    env = template["Resources"]["JwtAuth"]["Properties"]["Environment"]["Variables"]
    del env["JWT_SECRET"]
    assert policy_problems(template) == [
        "JwtAuth (authorizer) lacks JWT_SECRET: it would refuse to start"]
    del env["FUNCTION_ROLE"]
    roles = ("api", "authorizer", "notify", "sweeper", "reconciler", "relay", "worker")
    assert policy_problems(template) == [f"JwtAuth: FUNCTION_ROLE None is none of {roles}"]


def test_the_notify_function_needs_reserved_concurrency(template: dict[str, Any]) -> None:
    del template["Resources"]["AlipayNotifyUrl"]["Properties"]["ReservedConcurrentExecutions"]
    assert policy_problems(template) == ["AlipayNotifyUrl (notify) has no reserved concurrency"]
