"""local.package.policy_problems on a small hand-made template: a clean one passes,
and each planted excess or defect is named: a `*` (or `?`) where none is allowed,
a Scan the code never makes, a setting a function does not use, a secret in a
function's environment, a role that needs a secret without SECRET_ID or without
the grant on the stage's secret, a publisher without reserved concurrency, a
sweeper that may run twice, a timeout no longer than the role's outbound chain,
a function without a fixed name or, in VPC mode, without a VpcConfig. The narrow
exceptions (the own log group's streams, the stage secret's `-??????`, the ENI
actions under the VPC condition) pass and nothing wider does. The real template
is checked by tests/integration/test_package.py."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest

from chalicelib import config
from local.package import VPC_ACTIONS, policy_problems

ARN = "arn:${AWS::Partition}:%s:${AWS::Region}:${AWS::AccountId}:%s"
SSM = "{{resolve:ssm:/shop-pay/prod/%s}}"
SM = "{{resolve:secretsmanager:shop-pay/prod:SecretString:%s}}"
SECRET_ARN = ARN % ("secretsmanager", "secret:shop-pay/prod-??????")
VPC = {"Fn::If": ["InVpc", {"SubnetIds": {"Ref": "SubnetIds"},
                            "SecurityGroupIds": {"Ref": "SecurityGroupIds"}},
                  {"Ref": "AWS::NoValue"}]}


def _timeout(role: str) -> int:
    """A timeout comfortably above the role's chain (the API's within 29 s)."""
    chain = config.OUTBOUND_CHAIN_SECONDS[role]
    return min(29, math.floor(chain) + 2) if role == "api" else math.floor(chain) + 10


def _function(name: str, role_id: str, role: str, env: dict[str, Any],
              **props: Any) -> dict[str, Any]:
    return {"Type": "AWS::Serverless::Function",
            "Properties": {"FunctionName": name, "Handler": "app.x",
                           "Role": {"Fn::GetAtt": [role_id, "Arn"]}, "Timeout": _timeout(role),
                           "VpcConfig": VPC,
                           "Environment": {"Variables": {"STAGE": "prod", "FUNCTION_ROLE": role,
                                                         "SECRET_ID": "shop-pay/prod", **env}},
                           **props}}


def _secret() -> dict[str, Any]:
    return {"Sid": "StageSecret", "Effect": "Allow", "Action": ["secretsmanager:GetSecretValue"],
            "Resource": {"Fn::Sub": SECRET_ARN}}


def _enis(condition: str = "InVpc", actions: Any = None) -> dict[str, Any]:
    return {"Fn::If": [condition, {"Sid": "VpcNetworkInterfaces", "Effect": "Allow",
                                   "Action": sorted(VPC_ACTIONS) if actions is None else actions,
                                   "Resource": "*"}, {"Ref": "AWS::NoValue"}]}


def _role(function_name: str, *statements: dict[str, Any]) -> dict[str, Any]:
    logs = {"Sid": "OwnLogs", "Effect": "Allow",
            "Action": ["logs:CreateLogStream", "logs:PutLogEvents"],
            "Resource": {"Fn::Sub": ARN % ("logs", f"log-group:/aws/lambda/{function_name}:*")}}
    return {"Type": "AWS::IAM::Role", "Properties": {"Policies": [
        {"PolicyName": "p", "PolicyDocument": {"Version": "2012-10-17", "Statement": [
            logs, *statements, _secret(), _enis()]}}]}}


def _table(name: str, *actions: str) -> dict[str, Any]:
    return {"Effect": "Allow", "Action": [f"dynamodb:{a}" for a in actions],
            "Resource": {"Fn::Sub": ARN % ("dynamodb", f"table/{name}")}}


PAYMENT = {"ALIPAY_APP_ID": SSM % "alipay-app-id", "ALIPAY_SELLER_ID": SSM % "alipay-seller-id",
           "ALIPAY_GATEWAY": SSM % "alipay-gateway", "ALIPAY_PUBLIC_KEY": SSM % "alipay-public-key"}


@pytest.fixture
def template() -> dict[str, Any]:
    notify_env = {k: v for k, v in PAYMENT.items() if k != "ALIPAY_GATEWAY"}
    return {"Conditions": {"InVpc": {"Fn::Not": [{"Fn::Equals": ["", ""]}]}}, "Resources": {
        "JwtAuth": _function("shop-pay-prod-jwt_auth", "JwtAuthRole", "authorizer", {}),
        "JwtAuthRole": _role("shop-pay-prod-jwt_auth"),
        "AlipayNotifyUrl": _function("shop-pay-prod-alipay_notify_url", "NotifyRole", "notify",
                                     notify_env, ReservedConcurrentExecutions=10),
        "NotifyRole": _role("shop-pay-prod-alipay_notify_url",
                            _table("shop-prod-orders", "GetItem")),
        "APIHandler": _function("shop-pay-prod", "ApiRole", "api", PAYMENT,
                                ReservedConcurrentExecutions={"Ref": "ApiReservedConcurrency"}),
        "ApiRole": _role("shop-pay-prod", _table("shop-prod-goods", "Scan", "UpdateItem")),
        "Sweeper": _function("shop-pay-prod-sweeper", "SweeperRole", "sweeper", PAYMENT,
                             ReservedConcurrentExecutions=1),
        "SweeperRole": _role("shop-pay-prod-sweeper", _table("shop-prod-orders", "GetItem")),
    }}


def env_of(template: dict[str, Any], function: str) -> dict[str, Any]:
    return template["Resources"][function]["Properties"]["Environment"]["Variables"]


def statements(template: dict[str, Any], role: str) -> list[Any]:
    return template["Resources"][role]["Properties"]["Policies"][0]["PolicyDocument"]["Statement"]


def test_the_clean_template_passes(template: dict[str, Any]) -> None:
    assert policy_problems(template) == []


@pytest.mark.parametrize("plant", [
    lambda st: st[1].update(Action=["dynamodb:*"]),
    lambda st: st[1].update(Action="*"),
    lambda st: st[1].update(Action=["dynamodb:Get?tem"]),
    lambda st: st[1].update(Resource={"Fn::Sub": ARN % ("dynamodb", "table/*")}),
    lambda st: st[1].update(Resource="arn:aws:dynamodb:*:*:table/shop-prod-orders"),
    lambda st: st[1].update(Resource={"Fn::Sub": ARN % ("dynamodb",
                                                        "table/shop-prod-orders/index/*")}),
    # the log wildcard is allowed on the function's own group only
    lambda st: st[0].update(Resource={"Fn::Sub": ARN % ("logs", "log-group:/aws/lambda/*")}),
    lambda st: st[0].update(Resource={"Fn::Sub": ARN % (
        "logs", "log-group:/aws/lambda/shop-pay-prod:*")}),
    # the secret's wildcard is `-??????` on the stage's own secret, GetSecretValue only
    lambda st: st[2].update(Resource={"Fn::Sub": ARN % ("secretsmanager", "secret:shop-pay/*")}),
    lambda st: st[2].update(Resource={"Fn::Sub": ARN % ("secretsmanager",
                                                        "secret:shop-pay/prod-*")}),
    lambda st: st[2].update(Resource={"Fn::Sub": ARN % ("secretsmanager",
                                                        "secret:shop-pay/prod?????")}),
    lambda st: st[2].update(Resource={"Fn::Sub": ARN % ("secretsmanager",
                                                        "secret:shop-pay/prod-?????")}),
    lambda st: st[2].update(Action=["secretsmanager:GetSecretValue",
                                    "secretsmanager:PutSecretValue"]),
    # the ENI actions' `*`: only those actions, only under the VPC condition
    lambda st: st.__setitem__(3, _enis()["Fn::If"][1]),
    lambda st: st.__setitem__(3, _enis("HasAttentionEmail")),
    lambda st: st.__setitem__(3, _enis(actions=[*sorted(VPC_ACTIONS), "ec2:CreateVpc"])),
    lambda st: st.__setitem__(3, {"Fn::If": ["InVpc", {"Ref": "AWS::NoValue"},
                                             _enis()["Fn::If"][1]]}),
], ids=["action-service", "action-all", "action-question-mark", "table", "region-account",
        "index", "logs-all", "logs-other-function", "secret-all", "secret-star",
        "secret-no-dash", "secret-five", "secret-other-action", "enis-always",
        "enis-other-condition", "enis-other-action", "enis-outside-the-vpc"])
def test_a_planted_wildcard_fails(template: dict[str, Any], plant: Any) -> None:
    plant(statements(template, "NotifyRole"))
    problems = policy_problems(template)
    # A planted secret's ARN is no grant on the stage's secret either: said first.
    unread = "AlipayNotifyUrl (notify) may not read its secret: no secretsmanager:GetSecretValue"
    problems = [p for p in problems if not p.startswith(unread)]
    assert problems and all(p.startswith("AlipayNotifyUrl (notify): wildcard")
                            for p in problems), problems


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
    ("AlipayNotifyUrl", "ALIPAY_GATEWAY"),
    ("JwtAuth", "ALIPAY_PUBLIC_KEY"),
    ("APIHandler", "RMQ_WORKER_URL"),
    ("APIHandler", "BILLS_BUCKET"),
])
def test_a_setting_the_function_does_not_use_fails(template: dict[str, Any], function: str,
                                                   name: str) -> None:
    env_of(template, function)[name] = SSM % name.lower()
    (problem,) = policy_problems(template)
    assert problem.endswith(f"is given {name}, which it does not use"), problem


@pytest.mark.parametrize(("function", "name"), [
    ("AlipayNotifyUrl", "ALIPAY_APP_PRIVATE_KEY"),  # not its own
    ("AlipayNotifyUrl", "JWT_SECRET"),
    ("JwtAuth", "JWT_SECRET"),  # its own, but in the environment
    ("JwtAuth", "JWT_PREVIOUS_SECRET"),  # optional, still a secret
    ("APIHandler", "RMQ_URL"),
])
def test_a_secret_in_the_environment_fails(template: dict[str, Any], function: str,
                                           name: str) -> None:
    """Whether its own or not, resolved by CloudFormation or written: a secret in a
    function's environment is readable by anyone with lambda:GetFunctionConfiguration
    and is not renewed when the secret rotates."""
    role = env_of(template, function)["FUNCTION_ROLE"]
    keys = {**config.SECRET_KEYS, **config.OPTIONAL_SECRET_KEYS}
    env_of(template, function)[name] = SM % keys[name]
    assert policy_problems(template) == [
        f"{function}: {name} resolves a Secrets Manager value into the function's environment "
        f"(readable with lambda:GetFunctionConfiguration, stale after a rotation)",
        f"{function} ({role}) has {name} in its environment: a secret is read at run time "
        f"from SECRET_ID"]
    env_of(template, function)[name] = "amqps://notify:hunter2@broker:5671/%2F"
    assert policy_problems(template) == [
        f"{function} ({role}) has {name} in its environment: a secret is read at run time "
        f"from SECRET_ID"]
    # Any variable that resolves a secret, whatever its name.
    del env_of(template, function)[name]
    env_of(template, function)["SOMETHING"] = {"Fn::Sub": SM % "X"}
    (problem,) = policy_problems(template)
    assert problem.startswith(f"{function}: SOMETHING resolves a Secrets Manager value")


def test_a_setting_written_into_the_template_fails(template: dict[str, Any]) -> None:
    env_of(template, "AlipayNotifyUrl")["ALIPAY_APP_ID"] = "2021000000000000"
    assert policy_problems(template) == [
        "AlipayNotifyUrl: ALIPAY_APP_ID is written in the template, not resolved from SSM"]


def test_a_missing_setting_or_role_fails(template: dict[str, Any]) -> None:
    env = env_of(template, "AlipayNotifyUrl")
    del env["ALIPAY_PUBLIC_KEY"]
    assert policy_problems(template) == [
        "AlipayNotifyUrl (notify) lacks ALIPAY_PUBLIC_KEY: it would refuse to start"]
    env = env_of(template, "JwtAuth")
    del env["FUNCTION_ROLE"]
    roles = ("api", "authorizer", "notify", "sweeper", "reconciler", "relay", "worker")
    assert policy_problems(template) == [
        f"JwtAuth: FUNCTION_ROLE None is none of {roles}",
        "AlipayNotifyUrl (notify) lacks ALIPAY_PUBLIC_KEY: it would refuse to start"]


def test_the_secret_is_named_and_readable_by_exactly_the_roles_that_need_it(
        template: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    other = copy.deepcopy(template)
    del env_of(template, "JwtAuth")["SECRET_ID"]
    assert policy_problems(template) == [
        "JwtAuth (authorizer) lacks SECRET_ID (its JWT_SECRET): it would refuse to start"]
    env_of(template, "JwtAuth")["SECRET_ID"] = "shop-pay/dev"
    assert policy_problems(template) == [
        "JwtAuth (authorizer): SECRET_ID 'shop-pay/dev' is not the stage's secret "
        "'shop-pay/prod'"]
    # The grant: on the stage's secret, and only for a role that needs one.
    del statements(other, "SweeperRole")[2]
    assert policy_problems(other) == [
        "Sweeper (sweeper) may not read its secret: no secretsmanager:GetSecretValue on "
        "shop-pay/prod-??????"]
    statements(other, "SweeperRole").insert(2, {**_secret(), "Resource": {
        "Fn::Sub": ARN % ("secretsmanager", "secret:shop-pay/dev-??????")}})
    assert policy_problems(other)[0].startswith("Sweeper (sweeper) may not read its secret")
    # A role that needs no secret gets neither the name nor the grant.
    clean = copy.deepcopy(other)
    statements(clean, "SweeperRole")[2] = _secret()
    monkeypatch.setitem(config.ROLE_NEEDS, "authorizer", ())
    assert policy_problems(clean) == [
        "JwtAuth (authorizer) is given SECRET_ID, which it does not use",
        "JwtAuth (authorizer) may read the stage's secret, which it does not use"]
    del env_of(clean, "JwtAuth")["SECRET_ID"]
    del statements(clean, "JwtAuthRole")[1]
    assert policy_problems(clean) == []


@pytest.mark.parametrize("function", ["AlipayNotifyUrl", "APIHandler", "Sweeper"])
def test_a_publisher_needs_reserved_concurrency(template: dict[str, Any], function: str) -> None:
    """Each warm instance of a function that publishes holds one broker connection:
    reserved concurrency is what bounds them under the broker's limit."""
    props = template["Resources"][function]["Properties"]
    del props["ReservedConcurrentExecutions"]
    role = props["Environment"]["Variables"]["FUNCTION_ROLE"]
    problems = policy_problems(template)
    assert problems[0] == (f"{function} ({role}) has no reserved concurrency: each warm "
                           f"instance holds a broker connection, and nothing bounds them")
    assert problems[1:] == ([f"{function} (sweeper) may run twice at once: reserve "
                             f"concurrency 1"] if role == "sweeper" else [])


def test_the_sweeper_runs_once_at_a_time(template: dict[str, Any]) -> None:
    template["Resources"]["Sweeper"]["Properties"]["ReservedConcurrentExecutions"] = 2
    assert policy_problems(template) == [
        "Sweeper (sweeper) may run twice at once: reserve concurrency 1"]


def test_a_timeout_within_the_outbound_chain_fails(template: dict[str, Any]) -> None:
    chain = config.OUTBOUND_CHAIN_SECONDS["sweeper"]
    template["Resources"]["Sweeper"]["Properties"]["Timeout"] = math.floor(chain)
    assert policy_problems(template) == [
        f"Sweeper (sweeper): its timeout {math.floor(chain)!r} s is not longer than its longest "
        f"chain of outbound calls ({chain:g} s)"]
    # The API: longer than its chain, and within what API Gateway waits.
    template["Resources"]["Sweeper"]["Properties"]["Timeout"] = _timeout("sweeper")
    template["Resources"]["APIHandler"]["Properties"]["Timeout"] = 30
    assert policy_problems(template) == [
        "APIHandler (api): its timeout 30 s is longer than API Gateway waits (29 s)"]
    assert config.OUTBOUND_CHAIN_SECONDS["api"] < 29


def test_a_function_needs_a_fixed_name_and_in_vpc_mode_a_vpc_config(
        template: dict[str, Any]) -> None:
    """The log grant names the function's group, so the name cannot follow the
    stack's; in VPC mode a function outside it cannot reach a private broker."""
    props = template["Resources"]["JwtAuth"]["Properties"]
    del props["VpcConfig"]
    assert policy_problems(template) == [
        "JwtAuth (authorizer) has no VpcConfig: in VPC mode it would run outside the VPC, "
        "away from a private broker"]
    del template["Conditions"]["InVpc"]
    for name in ("APIHandler", "AlipayNotifyUrl", "Sweeper"):
        del template["Resources"][name]["Properties"]["VpcConfig"]
    assert policy_problems(template) == []
    props["FunctionName"] = {"Fn::Sub": "${AWS::StackName}-jwt_auth"}
    problems = policy_problems(template)
    assert problems[0] == ("JwtAuth (authorizer) has no fixed FunctionName: its log group, and "
                           "its role's grant on it, would depend on the stack's name")
    assert problems[1].startswith("JwtAuth (authorizer): wildcard resource")  # its logs' `*`
