""".chalice/ecs-worker.json (the worker as an ECS service on Fargate) and
.chalice/worker.env.example (its settings for `podman run --env-file`), checked
offline (cfn-lint: tests/integration/test_package.py): the container is stopped
no sooner than its longest handler can finish; every setting the worker needs is
given, the secret ones only by ARN from Secrets Manager or SSM (never in
`Environment`), and the execution role reads exactly those ARNs; the task role
has the API's table grants but the carts and the lists' Scan, nothing else; the
service keeps a worker running through a deployment; the env-file example,
filled in, is accepted by `config.check` for the worker's container.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from chalicelib import config, refunds
from chalicelib.config import Settings

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / ".chalice" / "ecs-worker.json"
ENV_EXAMPLE = REPO / ".chalice" / "worker.env.example"
STAGE = "prod"
FARGATE_MAX_STOP_TIMEOUT = 120
# What the worker's container gets from Secrets Manager: setting -> (the template
# parameter holding the secret's full ARN, the JSON key). RMQ_WORKER_URL is in a
# secret of the worker's own (README "RabbitMQ users": the API's functions must not
# read it); the private key is the stage's secret's.
SECRETS = {"RMQ_WORKER_URL": ("SecretArn", "RMQ_WORKER_URL"),
           "ALIPAY_APP_PRIVATE_KEY": ("StageSecretArn",
                                      config.SECRET_KEYS["ALIPAY_APP_PRIVATE_KEY"])}
# Settings that are secrets anywhere: never in a container's plain environment.
SECRET_SETTINGS = set(config.SECRET_KEYS) | {"RMQ_WORKER_URL"}
# What only API routes touch (chalicelib/handlers.py list_goods/get_cart/...,
# seckill.list_sales): the worker's role has the API's grants but these.
API_ONLY = {"tables": {"carts"}, "actions": {"dynamodb:Scan"}}
_FAKE = {"SecretArn": "arn:aws:secretsmanager:us-east-1:123456789012:secret:"
                      "shop-pay/prod-worker-AbCdEf",
         "StageSecretArn": "arn:aws:secretsmanager:us-east-1:123456789012:secret:"
                           "shop-pay/prod-XyZ123",
         "Stage": STAGE, "AWS::Partition": "aws", "AWS::Region": "us-east-1",
         "AWS::AccountId": "123456789012"}


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return dict(json.loads(TEMPLATE.read_text(encoding="utf-8")))


def _sub(value: Any, names: dict[str, str] = _FAKE) -> str:
    """A Ref or Fn::Sub of the template as a string, with made-up parameter values."""
    if isinstance(value, str):
        return value
    if "Ref" in value:
        return names.get(value["Ref"], f"<{value['Ref']}>")
    if "Fn::GetAtt" in value:
        return "<{}.{}>".format(*value["Fn::GetAtt"])
    text = value["Fn::Sub"]
    return re.sub(r"\$\{([^}]+)\}", lambda m: names.get(m.group(1), f"<{m.group(1)}>"), text)


def _container(template: dict[str, Any]) -> dict[str, Any]:
    (task,) = [r for r in template["Resources"].values()
               if r["Type"] == "AWS::ECS::TaskDefinition"]
    (container,) = task["Properties"]["ContainerDefinitions"]
    return dict(container)


def _statements(template: dict[str, Any], role: str) -> list[dict[str, Any]]:
    (policy,) = template["Resources"][role]["Properties"]["Policies"]
    return list(policy["PolicyDocument"]["Statement"])


def _listed(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _worker_chain_seconds() -> float:
    """The longest chain of outbound calls one message's handler makes in the worker
    (config.OUTBOUND_CHAIN_SECONDS names the deployed functions' only; the worker's
    container has FUNCTION_ROLE "" and Alipay's long timeouts):"""
    if "worker" in config.OUTBOUND_CHAIN_SECONDS:
        return config.OUTBOUND_CHAIN_SECONDS["worker"]
    call = config.alipay_call_seconds("")
    publish = config.RABBITMQ_PUBLISH_SECONDS
    chains = {
        "on_check": 2 * call,  # the query, then the close
        "on_paid": call + publish,  # a late payment's refund, its unknown outcome queued
        # waits out ASK_AFTER, queries, asks again, queues an unknown outcome
        "resolve_refund": refunds.ASK_AFTER.total_seconds() + 2 * call + publish,
        "deliver": Settings.webhook_timeout_seconds,  # one attempt, all of it
    }
    return max(chains.values())


def test_a_stop_waits_for_the_longest_handler(template: dict[str, Any]) -> None:
    """SIGTERM: the worker finishes the message in hand, then joins its sweeper and
    relay threads (5 s each, chalicelib/worker run()); ECS's SIGKILL must not come
    sooner. Fargate allows at most 120 s."""
    stop = _container(template)["StopTimeout"]
    chain = _worker_chain_seconds()
    assert chain + 10 <= stop <= FARGATE_MAX_STOP_TIMEOUT, (chain, stop)


def test_every_setting_the_worker_needs_is_given(template: dict[str, Any]) -> None:
    container = _container(template)
    env = {e["Name"]: e["Value"] for e in container["Environment"]}
    secrets = {s["Name"]: s["ValueFrom"] for s in container["Secrets"]}
    assert not set(env) & set(secrets)
    # RMQ_WORKER_URL stands in for RMQ_URL in the worker's container (config.check).
    needs = {"RMQ_WORKER_URL" if n == "RMQ_URL" else n for n in config.ROLE_NEEDS[""]}
    assert needs <= set(secrets), sorted(needs - set(secrets))
    assert env["STAGE"] == {"Ref": "Stage"}
    # The API's URL and the token secret are not the worker's.
    assert not {"RMQ_URL", "JWT_SECRET", "SECRET_ID"} & (set(env) | set(secrets))
    # The reconciler function runs the days (it has the bucket); never the worker.
    assert env["RECONCILE_INLINE"] == "0" and "BILLS_BUCKET" not in env
    # The stage's settings as the functions have them (.chalice/config.json).
    chalice = json.loads((REPO / ".chalice" / "config.json").read_text())
    stage_env = {**chalice["environment_variables"],
                 **chalice["stages"][STAGE]["environment_variables"]}
    params = template["Parameters"]
    for name, want in stage_env.items():
        assert name in env, name
        value = env[name]
        if isinstance(value, dict) and value.get("Ref") in params:
            value = str(params[value["Ref"]].get("Default"))
        assert _sub(value) == want, name


def test_secrets_come_by_arn_and_none_is_in_the_environment(template: dict[str, Any]) -> None:
    container = _container(template)
    env = {e["Name"]: e["Value"] for e in container["Environment"]}
    secrets = {s["Name"]: _sub(s["ValueFrom"]) for s in container["Secrets"]}
    assert not SECRET_SETTINGS & set(env)
    for value in map(_sub, env.values()):
        assert not re.search(r"amqps?://[^/@\s]+:[^/@\s]+@|-----BEGIN|{{resolve:", value), value
    arn = re.compile(r"arn:aws:(secretsmanager|ssm):us-east-1:123456789012:(secret|parameter)"
                     r"[:/]\S+")
    for name, value_from in secrets.items():
        assert arn.fullmatch(value_from), (name, value_from)
    # The secret ones from Secrets Manager by full ARN and JSON key ("arn:key::"),
    # the rest from the stage's SSM parameters, the ones the functions resolve.
    for name, (parameter, key) in SECRETS.items():
        assert secrets[name] == f"{_FAKE[parameter]}:{key}::", name
    chalice = json.loads((REPO / ".chalice" / "config.json").read_text())
    api = chalice["stages"][STAGE]["lambda_functions"]["api_handler"]["environment_variables"]
    from_ssm = {n: re.fullmatch(r"\{\{resolve:ssm:([^}:]+)\}\}", v) for n, v in api.items()
                if isinstance(v, str)}
    for name, match in from_ssm.items():
        if match and name in config.ROLE_NEEDS[""]:
            assert secrets[name] == (f"arn:aws:ssm:us-east-1:123456789012:parameter"
                                     f"{match.group(1)}"), name
    assert set(secrets) - set(SECRETS) == {n for n, m in from_ssm.items()
                                          if m and n in config.ROLE_NEEDS[""]}
    # The ARNs are parameters that must be full ARNs (the six-character suffix too;
    # a pattern cannot tell a name that ends in "-" and six letters from one).
    for parameter, _ in SECRETS.values():
        pattern = template["Parameters"][parameter]["AllowedPattern"]
        assert re.fullmatch(pattern, _FAKE[parameter])
    partial = _FAKE["StageSecretArn"].rsplit("-", 1)[0]  # ...:secret:shop-pay/prod
    assert not re.fullmatch(template["Parameters"]["StageSecretArn"]["AllowedPattern"], partial)


def test_the_execution_role_reads_exactly_the_tasks_secrets(template: dict[str, Any]) -> None:
    container = _container(template)
    task = next(r for r in template["Resources"].values()
                if r["Type"] == "AWS::ECS::TaskDefinition")["Properties"]
    role = task["ExecutionRoleArn"]["Fn::GetAtt"][0]
    assert role != task["TaskRoleArn"]["Fn::GetAtt"][0]
    statements = _statements(template, role)
    granted: dict[str, set[str]] = {}
    for st in statements:
        assert st["Effect"] == "Allow"
        for action in _listed(st["Action"]):
            granted.setdefault(action, set()).update(_sub(r) for r in _listed(st["Resource"]))
    secret_arns = {_sub(s["ValueFrom"]).rsplit(":", 3)[0] for s in container["Secrets"]
                   if ":secretsmanager:" in _sub(s["ValueFrom"])}
    parameter_arns = {_sub(s["ValueFrom"]) for s in container["Secrets"]
                      if ":ssm:" in _sub(s["ValueFrom"])}
    assert granted.pop("secretsmanager:GetSecretValue") == secret_arns == {
        _FAKE["SecretArn"], _FAKE["StageSecretArn"]}
    assert granted.pop("ssm:GetParameters") == parameter_arns
    # The image's repository, the own log group; ECR's token has no resource.
    assert granted.pop("ecr:GetAuthorizationToken") == {"*"}
    for action in ("ecr:BatchCheckLayerAvailability", "ecr:GetDownloadUrlForLayer",
                   "ecr:BatchGetImage"):
        assert granted.pop(action) == {
            "arn:aws:ecr:us-east-1:123456789012:repository/<RepositoryName>"}
    log_group = container["LogConfiguration"]["Options"]["awslogs-group"]["Ref"]
    for action in ("logs:CreateLogStream", "logs:PutLogEvents"):
        (resource,) = [r for st in statements if action in _listed(st["Action"])
                       for r in _listed(st["Resource"])]
        assert resource == {"Fn::GetAtt": [log_group, "Arn"]}
        assert granted.pop(action) == {f"<{log_group}.Arn>"}
    assert not granted, f"more than the task's start needs: {sorted(granted)}"


def test_the_task_role_has_the_apis_table_grants_but_carts_and_scan(
        template: dict[str, Any]) -> None:
    def grants(statements: list[dict[str, Any]]) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for st in statements:
            if "Fn::If" in st:  # the VPC mode's network-interface actions
                continue
            for resource in map(_sub, _listed(st["Resource"])):
                if ":dynamodb:" in resource:
                    out.setdefault(resource.split(":table/")[1], set()).update(
                        _listed(st["Action"]))
        return out

    api = grants(json.loads((REPO / ".chalice" / f"policy-{STAGE}.json").read_text())[
        "Statement"])
    want = {r: a - API_ONLY["actions"] for r, a in api.items()
            if r.split("/")[0].removeprefix(f"shop-{STAGE}-") not in API_ONLY["tables"]}
    task = next(r for r in template["Resources"].values()
                if r["Type"] == "AWS::ECS::TaskDefinition")["Properties"]
    statements = _statements(template, task["TaskRoleArn"]["Fn::GetAtt"][0])
    assert grants(statements) == {r: a for r, a in want.items() if a}
    actions = {a for st in statements for a in _listed(st["Action"])}
    assert all(a.startswith("dynamodb:") for a in actions), actions  # no S3, no logs
    assert "*" not in json.dumps([st["Resource"] for st in statements])


def test_the_service_drains_a_handler_through_a_deployment(template: dict[str, Any]) -> None:
    (service,) = [r["Properties"] for r in template["Resources"].values()
                  if r["Type"] == "AWS::ECS::Service"]
    assert service["LaunchType"] == "FARGATE"
    assert service["DeploymentConfiguration"]["MinimumHealthyPercent"] == 100
    assert service["DeploymentConfiguration"]["MaximumPercent"] == 200
    network = service["NetworkConfiguration"]["AwsvpcConfiguration"]
    assert network["AssignPublicIp"] == "DISABLED"
    task = next(r for r in template["Resources"].values()
                if r["Type"] == "AWS::ECS::TaskDefinition")["Properties"]
    assert task["NetworkMode"] == "awsvpc" and task["RequiresCompatibilities"] == ["FARGATE"]
    assert task["RuntimePlatform"]["CpuArchitecture"] == {"Ref": "CpuArchitecture"}
    assert set(template["Parameters"]["CpuArchitecture"]["AllowedValues"]) == {"X86_64", "ARM64"}
    container = _container(template)
    assert container["LogConfiguration"]["LogDriver"] == "awslogs"
    # The image has no health endpoint: the check is that PID 1 is still the worker.
    assert "chalicelib.worker" in " ".join(container["HealthCheck"]["Command"])


def _example() -> dict[str, str]:
    values: dict[str, str] = {}
    for number, line in enumerate(ENV_EXAMPLE.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        # --env-file takes NAME=VALUE literally: no spaces around =, no quotes.
        match = re.fullmatch(r"([A-Z][A-Z0-9_]*)=(\S*)", line)
        assert match, f"{ENV_EXAMPLE.name}:{number}: not NAME=VALUE: {line!r}"
        assert match.group(1) not in values, f"{ENV_EXAMPLE.name}:{number}: twice"
        values[match.group(1)] = match.group(2)
    return values


def test_the_env_file_example_names_what_the_worker_needs() -> None:
    values = _example()
    needs = {"RMQ_WORKER_URL" if n == "RMQ_URL" else n for n in config.ROLE_NEEDS[""]}
    for name in needs:
        assert name in values or f"{name}_FILE" in values, name
    # A PEM is several lines: never on one line of an env file, only as a mounted file.
    assert "ALIPAY_APP_PRIVATE_KEY" not in values
    assert values["ALIPAY_APP_PRIVATE_KEY_FILE"].startswith("/keys/")
    assert "RMQ_URL" not in values and "JWT_SECRET" not in values
    assert values["STAGE"] == STAGE
    chalice = json.loads((REPO / ".chalice" / "config.json").read_text())
    for name in ("ORDER_CHECK_DELAY_SECONDS", "ORDER_PAY_TIMEOUT_SECONDS"):
        assert values[name] == chalice["environment_variables"][name], name
    assert values["RMQ_QUEUE_TYPE"] == chalice["stages"][STAGE]["environment_variables"][
        "RMQ_QUEUE_TYPE"]


def test_the_env_file_example_filled_in_starts_the_worker(tmp_path: Path) -> None:
    """What `config.check` asks of the worker's container, with the example's values
    and its key file mounted (here: a file in tmp_path)."""
    values = _example()
    key = tmp_path / "app_private.pem"
    key.write_text("-----BEGIN PRIVATE KEY-----\nMII...\n-----END PRIVATE KEY-----\n")
    values["ALIPAY_APP_PRIVATE_KEY_FILE"] = str(key)
    settings = config.check(config.load(values))
    assert settings.function_role == "" and settings.stage == STAGE
    assert settings.alipay_app_private_key.startswith("-----BEGIN")
    assert settings.worker_rmq_url == values["RMQ_WORKER_URL"]
    assert not settings.reconcile_inline
    # Without the key file it refuses to start, naming the setting.
    del values["ALIPAY_APP_PRIVATE_KEY_FILE"]
    with pytest.raises(config.SettingsError, match="ALIPAY_APP_PRIVATE_KEY"):
        config.check(config.load(values))
