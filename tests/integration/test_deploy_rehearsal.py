"""A deploy rehearsal that runs here: `make package`'s SAM template, translated to
plain CloudFormation offline (aws-sam-translator, as `sam deploy`'s transform
does on AWS), then created as a stack in moto's CloudFormation and read back
through boto3 as an operator would read the real one.

What it proves beyond tests/integration/test_package.py (which reads the SAM
template): the SAM transform accepts the template; the stack's references
(Ref, Fn::GetAtt, Fn::Sub, DependsOn) all point at something; the dynamic
references name the SSM parameters and the secret's keys that the README's step
2 makes, and resolve to their values; and what the template declares is what a
stack holds (the tables' keys and indexes, the roles and their policies, the
functions' runtime, handler, timeout, settings, role, reserved concurrency and
VPC, the schedules and their targets, the outbox stream's mapping, the log
groups, the bucket, the topic, the VPC endpoints). Twice: the public mode and
the VPC mode (`MODES`). Then the worker's stack (.chalice/ecs-worker.json)
beside it: its secrets and SSM parameters exist, its role names the stack's
tables and indexes.

What it cannot prove: moto's CloudFormation has no model for some resource
types (`SKIPPED_TYPES`). They are taken out before the stack is made and
named here, so that a new type it cannot take fails this test until someone
looks at it; so is the API's deployment (`MOTO_FAILS`: moto ignores the
RestApi's swagger body). A reference to one of them from a kept resource gets a
stand-in string (`STAND_INS`, named too), and a property moto wants that
CloudFormation does not is filled in as CloudFormation would (`_fill_moto_gaps`).
The function URL is made afterwards through Lambda's own API with the template's
properties. moto resolves no dynamic
reference (`{{resolve:...}}`), so this module resolves them, against moto's
SSM and Secrets Manager, before the stack is made: a reference to a parameter
or a key the setup did not make fails.

Nothing talks to AWS: everything below is moto (`mock_aws`), in this process.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws
from moto.cloudformation.parsing import resource_class_from_type
from samtranslator.translator.transform import transform

from chalicelib import config
from local import package

# mock_aws resets moto's in-process state when it stops, the suite's DynamoDB
# server's tables included (tests/conftest.py): this module runs in a pytest
# process of its own (`make test` runs `pytest -m isolated` after the rest).
pytestmark = pytest.mark.isolated

STAGE = "prod"
REGION = "us-east-1"
STACK = f"shop-pay-{STAGE}"
REPO = Path(__file__).resolve().parents[2]
WORKER_TEMPLATE = REPO / ".chalice" / "ecs-worker.json"
WORKER_STACK = f"shop-pay-{STAGE}-worker"
# Where `sam package` / `aws cloudformation package` would put the code.
ARTIFACTS_BUCKET = "shop-pay-rehearsal-artifacts"
# The types moto (requirements-dev.txt's version) cannot create through
# CloudFormation (moto.cloudformation.parsing has no model for them). A type that
# joins this list is a part of the deployment this rehearsal no longer covers.
SKIPPED_TYPES = {
    "AWS::ApiGateway::Stage",  # the `api` stage the RestApi is served on
    "AWS::CloudWatch::Alarm",  # the attention alarms
    "AWS::Lambda::Url",  # the notify function's URL (made below through Lambda's API)
    "AWS::S3::BucketPolicy",  # the bills bucket's TLS-only policy
    "AWS::SNS::Subscription",  # AttentionEmail's subscription
}
# Types moto has a model for but cannot create from this template, taken out too:
# moto's RestApi ignores Body (the API's swagger; its import takes OpenAPI 3 only),
# so the API has no methods and moto refuses to deploy it.
MOTO_FAILS = {"AWS::ApiGateway::Deployment"}
# (kept resource, skipped resource it refers to): the reference becomes a string.
STAND_INS = {("APIHandler", "AlipayNotifyFunctionUrl")}
# The stage's parameters as a deploy would give them, per mode (a parameter the
# template does not have is not given; the others keep their default). "@..." is a
# moto EC2 object made for the rehearsal: the public mode has no VPC; the VPC mode
# puts the functions in two private subnets with the endpoints.
MODES: dict[str, dict[str, str]] = {
    "public": {"AttentionEmail": "ops@example.com"},
    "vpc": {"AttentionEmail": "ops@example.com", "SubnetIds": "@subnets",
            "SecurityGroupIds": "@security-group", "VpcId": "@vpc",
            "RouteTableIds": "@route-table", "InterfaceEndpoints": "true"},
}
_DYNAMIC = re.compile(r"\{\{resolve:([a-z-]+):([^}]+)\}\}")
_NO_VALUE = object()  # AWS::NoValue
_SUB_NAME = re.compile(r"\$\{([^}!][^}]*)\}")


class _NoManagedPolicies:
    """The translator's managed-policy loader, offline (the real one asks IAM): the
    template names no managed policy by name (the roles are chalice's own, with
    inline policies), so an empty map is all the transform needs."""

    def load(self) -> dict[str, str]:
        return {}


@dataclass
class Rehearsal:
    sam: dict[str, Any]  # chalice's template as `make package` writes it
    cfn: dict[str, Any]  # after the SAM transform, before anything is taken out
    skipped: dict[str, str]  # logical id -> type moto cannot create
    stand_ins: set[tuple[str, str]]
    setup: dict[str, str]  # dynamic reference -> the value made in SSM / Secrets Manager
    physical: dict[str, str]  # logical id -> physical id, from the stack
    status: str
    zip_size: int
    secret_id: str
    stack_resources: list[dict[str, Any]] = field(default_factory=list)
    patched: list[str] = field(default_factory=list)  # moto's gaps filled in
    parameters: dict[str, str] = field(default_factory=dict)  # given to the stack
    worker: dict[str, Any] = field(default_factory=dict)  # the worker's stack (ECS)

    def parameter(self, name: str) -> Any:
        """A stack parameter's value: given, else its default (a list for a list type)."""
        spec = self.cfn.get("Parameters", {}).get(name)
        assert spec is not None, f"no parameter {name}"
        raw = self.parameters.get(name, spec.get("Default"))
        assert raw is not None, f"parameter {name}: no value"
        if spec["Type"] == "CommaDelimitedList" or spec["Type"].startswith("List<"):
            return [x for x in str(raw).split(",")] if raw != "" else [""]
        return raw

    def condition(self, name: str) -> bool:
        return bool(self.value(self.cfn["Conditions"][name]))

    def value(self, node: Any) -> Any:
        """`node` as the stack sees it: Refs to parameters, conditions and Fn::If
        evaluated, AWS::NoValue left out (the few functions the templates use)."""
        if isinstance(node, list):
            return [v for v in (self.value(x) for x in node) if v is not _NO_VALUE]
        if not isinstance(node, dict):
            return node
        if len(node) == 1:
            ((key, arg),) = node.items()
            if key == "Ref" and arg == "AWS::NoValue":
                return _NO_VALUE
            if key == "Ref" and arg in self.cfn.get("Parameters", {}):
                return self.parameter(arg)
            if key == "Condition" and isinstance(arg, str):
                return self.condition(arg)
            if key == "Fn::If":
                return self.value(arg[1] if self.condition(arg[0]) else arg[2])
            if key == "Fn::Equals":
                return self.value(arg[0]) == self.value(arg[1])
            if key == "Fn::Not":
                return not self.value(arg[0])
            if key == "Fn::And":
                return all(self.value(x) for x in arg)
            if key == "Fn::Or":
                return any(self.value(x) for x in arg)
            if key == "Fn::Join":
                return str(arg[0]).join(str(x) for x in self.value(arg[1]))
        return {k: v for k, v in ((k, self.value(v)) for k, v in node.items())
                if v is not _NO_VALUE}

    def of_type(self, kind: str) -> dict[str, dict[str, Any]]:
        return {k: v for k, v in self.cfn["Resources"].items() if v["Type"] == kind}


def _document(policy: Any) -> dict[str, Any]:
    """A policy document as moto returns it: a dict, JSON, or (an inline policy made
    through CloudFormation) the repr of the dict it was given."""
    if isinstance(policy, dict):
        return policy
    try:
        return dict(json.loads(policy))
    except json.JSONDecodeError:
        return dict(ast.literal_eval(policy))


def _names_referred(node: Any) -> Iterator[str]:
    """The logical ids (and parameters) a template fragment refers to."""
    if isinstance(node, list):
        for item in node:
            yield from _names_referred(item)
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key == "Ref" and isinstance(value, str):
            yield value
        elif key == "Fn::GetAtt":
            yield value[0] if isinstance(value, list) else str(value).split(".")[0]
        elif key == "Fn::Sub":
            text, local = (value[0], value[1]) if isinstance(value, list) else (value, {})
            yield from (m.split(".")[0] for m in _SUB_NAME.findall(text) if m not in local)
            yield from _names_referred(local)
        else:
            yield from _names_referred(value)


def _stand_in(node: Any, gone: set[str], where: str, seen: set[tuple[str, str]]) -> Any:
    """`node` with each Ref / Fn::GetAtt to a resource in `gone` replaced by a string."""
    if isinstance(node, list):
        return [_stand_in(item, gone, where, seen) for item in node]
    if not isinstance(node, dict):
        return node
    if len(node) == 1:
        ((key, value),) = node.items()
        target = (value if key == "Ref" else value[0] if key == "Fn::GetAtt"
                  and isinstance(value, list) else None)
        if isinstance(target, str) and target in gone:
            seen.add((where, target))
            return f"stand-in-for-{target}"
    return {k: _stand_in(v, gone, where, seen) for k, v in node.items()}


def _readme_setup() -> tuple[list[str], str]:
    """The SSM parameters and the secret that the README's step 2 makes, for STAGE."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Deploy to AWS", 1)[1].split("\n## ", 1)[0]
    stage = r"\$\{?STAGE\}?"
    names = re.findall(rf"ssm put-parameter[^\n]*--name (/shop-pay/{stage}/[\w-]+)", section)
    # (the stage's secret; not the worker's own, shop-pay/$STAGE-worker)
    secrets = re.findall(rf"secretsmanager create-secret --name (shop-pay/{stage})(?=\s)", section)
    assert names and secrets, "README's Deploy to AWS section no longer says what to make"
    fill = re.compile(stage)
    return [fill.sub(STAGE, n) for n in names], fill.sub(STAGE, secrets[0])


def _resolve(match: re.Match[str], ssm: Any, secrets: Any) -> str:
    """One dynamic reference, as CloudFormation resolves it (against moto)."""
    service, rest = match.groups()
    if service == "ssm":
        return str(ssm.get_parameter(Name=rest.split(":")[0])["Parameter"]["Value"])
    if service == "secretsmanager":
        secret_id, *parts = rest.split(":")
        value = str(secrets.get_secret_value(SecretId=secret_id)["SecretString"])
        if len(parts) >= 2 and parts[0] == "SecretString" and parts[1]:
            keys = json.loads(value)
            assert parts[1] in keys, f"{match.group(0)}: the secret has no key {parts[1]}"
            return str(keys[parts[1]])
        return value
    raise AssertionError(f"{match.group(0)}: a dynamic reference this rehearsal cannot resolve")


def _parameter_values(template: dict[str, Any], ec2: Any, mode: str) -> dict[str, str]:
    """MODES[mode] for the parameters the template has, "@..." made in moto's EC2."""
    vpc = ec2.create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
    subnets = [ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.9.{i}.0/24")["Subnet"]["SubnetId"]
               for i in (1, 2)]
    made = {"@vpc": vpc, "@subnets": ",".join(subnets),
            "@security-group": ec2.create_security_group(
                GroupName="rehearsal", Description="rehearsal", VpcId=vpc)["GroupId"],
            "@route-table": ec2.create_route_table(VpcId=vpc)["RouteTable"]["RouteTableId"]}
    values: dict[str, str] = {}
    for name, spec in template.get("Parameters", {}).items():
        if name in MODES[mode]:
            values[name] = made.get(MODES[mode][name], MODES[mode][name])
        elif "Default" not in spec:
            pytest.fail(f"parameter {name} ({spec.get('Type')}) has no default: give the "
                        f"rehearsal a value for it (MODES)")
    return values


def _upload_code(sam: dict[str, Any], out: Path, s3: Any) -> int:
    """What `sam package` does: each function's local CodeUri uploaded to S3 (the
    real deployment.zip, keyed by its MD5 as `sam package` does) and rewritten to
    its s3:// address. Returns the zip's size."""
    size = 0
    s3.create_bucket(Bucket=ARTIFACTS_BUCKET)
    for resource in sam["Resources"].values():
        props = resource.get("Properties", {})
        uri = props.get("CodeUri")
        if resource["Type"] != "AWS::Serverless::Function" or not isinstance(uri, str) \
                or uri.startswith("s3://"):
            continue
        code = (out / uri).resolve()
        key = hashlib.md5(code.read_bytes(), usedforsecurity=False).hexdigest()
        s3.upload_file(str(code), ARTIFACTS_BUCKET, key)
        props["CodeUri"] = f"s3://{ARTIFACTS_BUCKET}/{key}"
        size = code.stat().st_size
    return size


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("rehearsal") / STAGE
    return json.loads(package.build(STAGE, out).read_text()), out


@pytest.fixture(scope="module", params=sorted(MODES))
def rehearsal(request: pytest.FixtureRequest,
              built: tuple[dict[str, Any], Path]) -> Iterator[Rehearsal]:
    sam, out = built
    with pytest.MonkeyPatch.context() as mp:
        # tests/conftest.py points DynamoDB at the local moto server: not here.
        for name in [n for n in os.environ if n.startswith("AWS_ENDPOINT_URL")]:
            mp.delenv(name)
        mp.setenv("AWS_DEFAULT_REGION", REGION)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        with mock_aws():
            yield _rehearse(sam, out, request.param)


def _rehearse(sam: dict[str, Any], out: Path, mode: str) -> Rehearsal:
    s3, ssm = boto3.client("s3"), boto3.client("ssm")
    secrets, cfn_client = boto3.client("secretsmanager"), boto3.client("cloudformation")
    # README step 2, with made-up values.
    setup: dict[str, str] = {}
    names, secret_id = _readme_setup()
    for name in names:
        value = f"rehearsal-{name.rsplit('/', 1)[1]}"
        ssm.put_parameter(Name=name, Value=value, Type="String")
        setup[f"{{{{resolve:ssm:{name}}}}}"] = value
    keys = {key: f"rehearsal-{key.lower()}" for key in config.SECRET_KEYS.values()}
    secrets.create_secret(Name=secret_id, SecretString=json.dumps(keys))
    for key, value in keys.items():
        setup[f"{{{{resolve:secretsmanager:{secret_id}:SecretString:{key}}}}}"] = value

    source = copy.deepcopy(sam)
    zip_size = _upload_code(source, out, s3)
    parameters = _parameter_values(source, boto3.client("ec2"), mode)
    cfn = transform(source, dict(parameters), _NoManagedPolicies())
    assert "Transform" not in cfn and not any(
        r["Type"].startswith("AWS::Serverless::") for r in cfn["Resources"].values())

    # What moto cannot take: out, and references to it from what stays stood in for.
    created = copy.deepcopy(cfn)
    skipped = {k: r["Type"] for k, r in cfn["Resources"].items()
               if resource_class_from_type(r["Type"]) is None or r["Type"] in MOTO_FAILS}
    gone = set(skipped)
    stand_ins: set[tuple[str, str]] = set()
    for logical in gone:
        del created["Resources"][logical]
    for logical, resource in created["Resources"].items():
        depends = resource.get("DependsOn")
        if depends is not None:
            kept = [d for d in ([depends] if isinstance(depends, str) else depends)
                    if d not in gone]
            resource["DependsOn"] = kept
        created["Resources"][logical] = _stand_in(resource, gone, logical, stand_ins)
    created["Outputs"] = {k: v for k, v in created.get("Outputs", {}).items()
                          if not set(_names_referred(v)) & gone}
    patched = _fill_moto_gaps(created)
    for logical, resource in created["Resources"].items():
        dangling = set(_names_referred(resource)) & gone
        assert not dangling, f"{logical} still refers to {dangling}"

    # CloudFormation's dynamic references, resolved against moto (moto does not).
    body = _DYNAMIC.sub(lambda m: _resolve(m, ssm, secrets), json.dumps(created))
    cfn_client.create_stack(
        StackName=STACK, TemplateBody=body, Capabilities=["CAPABILITY_IAM"],
        Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in parameters.items()])
    cfn_client.get_waiter("stack_create_complete").wait(
        StackName=STACK, WaiterConfig={"Delay": 1, "MaxAttempts": 30})
    stack = cfn_client.describe_stacks(StackName=STACK)["Stacks"][0]
    listed = cfn_client.list_stack_resources(StackName=STACK)["StackResourceSummaries"]
    return Rehearsal(sam=sam, cfn=cfn, skipped=skipped, stand_ins=stand_ins, setup=setup,
                     physical={r["LogicalResourceId"]: r["PhysicalResourceId"] for r in listed},
                     status=stack["StackStatus"], zip_size=zip_size, secret_id=secret_id,
                     stack_resources=listed, patched=patched,
                     parameters=parameters, worker=_rehearse_worker(secret_id))


def _rehearse_worker(secret_id: str) -> dict[str, Any]:
    """The worker's stack (.chalice/ecs-worker.json, plain CloudFormation) beside the
    SAM one, as README "The worker on ECS" deploys it: its own secret holding
    RMQ_WORKER_URL, the stage's secret and SSM parameters of README step 2 (made
    above), the rehearsal's private subnets and security group."""
    ec2, secrets = boto3.client("ec2"), boto3.client("secretsmanager")
    cfn_client, ecs = boto3.client("cloudformation"), boto3.client("ecs")
    template = json.loads(WORKER_TEMPLATE.read_text(encoding="utf-8"))
    subnets = ec2.describe_subnets(Filters=[{"Name": "cidr-block",
                                             "Values": ["10.9.1.0/24", "10.9.2.0/24"]}])
    group = ec2.describe_security_groups(Filters=[{"Name": "group-name",
                                                   "Values": ["rehearsal"]}])
    worker_secret = secrets.create_secret(
        Name=f"{secret_id}-worker", SecretString=json.dumps(
            {"RMQ_WORKER_URL": "amqps://shop-worker:rehearsal@broker.invalid:5671/%2F"}))
    parameters = {
        "Stage": STAGE, "ImageUri": f"123456789012.dkr.ecr.{REGION}.amazonaws.com/"
                                    f"shop-pay-worker:rehearsal",
        "Subnets": ",".join(sorted(s["SubnetId"] for s in subnets["Subnets"])),
        "SecurityGroups": group["SecurityGroups"][0]["GroupId"],
        "SecretArn": worker_secret["ARN"],
        "StageSecretArn": secrets.describe_secret(SecretId=secret_id)["ARN"]}
    cfn_client.create_stack(
        StackName=WORKER_STACK, TemplateBody=json.dumps(template),
        Capabilities=["CAPABILITY_IAM"],
        Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in parameters.items()])
    cfn_client.get_waiter("stack_create_complete").wait(
        StackName=WORKER_STACK, WaiterConfig={"Delay": 1, "MaxAttempts": 30})
    stack = cfn_client.describe_stacks(StackName=WORKER_STACK)["Stacks"][0]
    outputs = {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}
    listed = cfn_client.list_stack_resources(StackName=WORKER_STACK)["StackResourceSummaries"]
    (service,) = ecs.describe_services(cluster=outputs["ClusterName"],
                                       services=[outputs["ServiceName"]])["services"]
    task = ecs.describe_task_definition(taskDefinition=service["taskDefinition"])
    return {"status": stack["StackStatus"], "template": template, "parameters": parameters,
            "outputs": outputs, "service": service, "task": task["taskDefinition"],
            "physical": {r["LogicalResourceId"]: r["PhysicalResourceId"] for r in listed
                         if r["LogicalResourceId"]}}


def _fill_moto_gaps(template: dict[str, Any]) -> list[str]:
    """Properties moto insists on that CloudFormation does not, filled in as
    CloudFormation fills them; each named (the test prints them)."""
    patched = []
    for logical, resource in template["Resources"].items():
        props = resource.get("Properties", {})
        # CloudFormation names a RestApi imported from Body after its info.title.
        if resource["Type"] == "AWS::ApiGateway::RestApi" and "Name" not in props:
            props["Name"] = props["Body"]["info"]["title"]
            patched.append(f"{logical}: Name from Body.info.title")
    return patched


def test_every_resource_moto_can_take_is_created(rehearsal: Rehearsal) -> None:
    assert rehearsal.status == "CREATE_COMPLETE"
    kept = {k: r for k, r in rehearsal.cfn["Resources"].items() if k not in rehearsal.skipped}
    # (moto also lists a few entries with no logical id, type or physical id: not ours)
    listed = {r["LogicalResourceId"]: r for r in rehearsal.stack_resources
              if r["LogicalResourceId"]}
    # A resource under a false condition is rightly absent; every other one is there.
    wanted = {k for k, r in kept.items()
              if "Condition" not in r or rehearsal.condition(r["Condition"])}
    assert set(listed) == wanted, (f"not created: {sorted(wanted - set(listed))}; "
                                   f"unexpected: {sorted(set(listed) - wanted)}")
    for logical, summary in listed.items():
        assert summary["ResourceType"] == kept[logical]["Type"], logical
        assert summary["ResourceStatus"] == "CREATE_COMPLETE", logical
    # The SAM resources became what the transform makes of them.
    sam_types = {r["Type"] for r in rehearsal.sam["Resources"].values()}
    assert "AWS::Serverless::Function" in sam_types
    assert len(rehearsal.of_type("AWS::Lambda::Function")) == len(
        [r for r in rehearsal.sam["Resources"].values()
         if r["Type"] == "AWS::Serverless::Function"])


def test_the_types_moto_cannot_take_are_the_known_ones(rehearsal: Rehearsal) -> None:
    skipped_types = set(rehearsal.skipped.values()) - MOTO_FAILS
    print("\nmoto's CloudFormation cannot take:", *sorted(
        f"{k} ({t})" for k, t in rehearsal.skipped.items()), sep="\n  ")
    print("stood in for:", sorted(rehearsal.stand_ins))
    print("filled in for moto:", rehearsal.patched)
    assert skipped_types == SKIPPED_TYPES, (
        f"new: {sorted(skipped_types - SKIPPED_TYPES)}; "
        f"no longer skipped: {sorted(SKIPPED_TYPES - skipped_types)}")
    assert rehearsal.stand_ins == STAND_INS


def test_tables_have_the_templates_keys_and_indexes(rehearsal: Rehearsal) -> None:
    dynamodb = boto3.client("dynamodb")
    tables = rehearsal.of_type("AWS::DynamoDB::Table")
    assert tables
    for logical, resource in tables.items():
        props = resource["Properties"]
        name = rehearsal.physical[logical]
        assert name == props["TableName"]
        table = dynamodb.describe_table(TableName=name)["Table"]
        assert table["KeySchema"] == props["KeySchema"], name
        assert sorted(table["AttributeDefinitions"], key=str) == sorted(
            props["AttributeDefinitions"], key=str), name
        assert table["BillingModeSummary"]["BillingMode"] == props["BillingMode"], name
        want = {i["IndexName"]: (i["KeySchema"], i["Projection"]["ProjectionType"])
                for i in props.get("GlobalSecondaryIndexes", [])}
        have = {i["IndexName"]: (i["KeySchema"], i["Projection"]["ProjectionType"])
                for i in table.get("GlobalSecondaryIndexes", [])}
        assert have == want, name
        if "StreamSpecification" in props:
            assert table["StreamSpecification"] == {
                "StreamEnabled": True, **props["StreamSpecification"]}, name
    # Every table a function is told about is one of the stack's.
    names = {rehearsal.physical[k] for k in tables}
    for logical in rehearsal.of_type("AWS::Lambda::Function"):
        config_ = boto3.client("lambda").get_function_configuration(
            FunctionName=rehearsal.physical[logical])
        told = {v for k, v in config_["Environment"]["Variables"].items()
                if k.endswith("_TABLE")}
        assert told <= names, f"{logical}: {sorted(told - names)}"


def test_roles_have_the_templates_trust_and_policies(rehearsal: Rehearsal) -> None:
    iam = boto3.client("iam")
    roles = rehearsal.of_type("AWS::IAM::Role")
    assert roles
    for logical, resource in roles.items():
        props = resource["Properties"]
        role = iam.get_role(RoleName=rehearsal.physical[logical])["Role"]
        trust = role["AssumeRolePolicyDocument"]
        assert [s["Principal"] for s in trust["Statement"]] == [
            s["Principal"] for s in props["AssumeRolePolicyDocument"]["Statement"]], logical
        inline = iam.list_role_policies(RoleName=role["RoleName"])["PolicyNames"]
        assert sorted(inline) == sorted(p["PolicyName"] for p in props.get("Policies", []))
        for policy in props.get("Policies", []):
            have = iam.get_role_policy(RoleName=role["RoleName"],
                                       PolicyName=policy["PolicyName"])["PolicyDocument"]
            # (moto keeps an AWS::NoValue statement as a None)
            have_statements = [s for s in _document(have)["Statement"] if s is not None]
            want_statements = rehearsal.value(policy["PolicyDocument"]["Statement"])
            assert [(s.get("Sid"), s["Action"]) for s in have_statements] == [
                (s.get("Sid"), s["Action"]) for s in want_statements], logical
            # Every Fn::Sub of an ARN was filled in: no ${...} left for IAM to refuse.
            assert "${" not in json.dumps(have), logical


def test_functions_run_what_the_template_says(rehearsal: Rehearsal) -> None:
    lam, iam = boto3.client("lambda"), boto3.client("iam")
    functions = rehearsal.of_type("AWS::Lambda::Function")
    assert functions
    resolved = 0
    for logical, resource in functions.items():
        props = resource["Properties"]
        fn = lam.get_function_configuration(FunctionName=rehearsal.physical[logical])
        assert fn["FunctionName"] == props.get("FunctionName", fn["FunctionName"])
        assert (fn["Runtime"], fn["Handler"], fn["Timeout"], fn["MemorySize"]) == (
            props["Runtime"], props["Handler"], props.get("Timeout", 3),
            props.get("MemorySize", 128)), logical
        assert fn["CodeSize"] == rehearsal.zip_size, logical  # the zip went through S3
        role_id = props["Role"]["Fn::GetAtt"][0]
        assert fn["Role"] == iam.get_role(RoleName=rehearsal.physical[role_id])["Role"]["Arn"]
        want = props.get("Environment", {}).get("Variables", {})
        have = fn.get("Environment", {}).get("Variables", {})
        assert sorted(have) == sorted(want), logical
        for name, value in want.items():
            if isinstance(value, str) and _DYNAMIC.fullmatch(value):
                # A reference to what README step 2 makes, resolved to its value.
                assert value in rehearsal.setup, f"{logical} {name}: {value} is not set up"
                assert have[name] == rehearsal.setup[value], f"{logical} {name}"
                resolved += 1
            assert "{{resolve:" not in have[name], f"{logical} {name}"
        if "SECRET_ID" in have:  # the functions that read the secret at run time
            assert have["SECRET_ID"] in (rehearsal.secret_id, boto3.client(
                "secretsmanager").describe_secret(SecretId=rehearsal.secret_id)["ARN"])
        if "ReservedConcurrentExecutions" in props:
            assert lam.get_function_concurrency(FunctionName=fn["FunctionName"])[
                "ReservedConcurrentExecutions"] == int(rehearsal.value(
                    props["ReservedConcurrentExecutions"]))
        vpc = rehearsal.value(props.get("VpcConfig", {}))
        if vpc is not _NO_VALUE and vpc:  # VPC mode: the subnets and groups the stack was given
            assert sorted(fn["VpcConfig"]["SubnetIds"]) == sorted(vpc["SubnetIds"]), logical
            assert sorted(fn["VpcConfig"]["SecurityGroupIds"]) == sorted(
                vpc["SecurityGroupIds"]), logical
        else:
            assert not fn.get("VpcConfig", {}).get("SubnetIds"), logical
    print(f"\n{resolved} dynamic references resolved in the functions' settings")


def test_the_function_url(rehearsal: Rehearsal) -> None:
    """moto's CloudFormation has no AWS::Lambda::Url: the template's URL is made
    through Lambda's API with the template's properties, on the stack's function,
    and the public invoke permission the template gives it is the stack's."""
    lam = boto3.client("lambda")
    urls = rehearsal.of_type("AWS::Lambda::Url")
    assert urls
    for logical, resource in urls.items():
        props = resource["Properties"]
        target = rehearsal.physical[props["TargetFunctionArn"]["Fn::GetAtt"][0]]
        made = lam.create_function_url_config(FunctionName=target, AuthType=props["AuthType"])
        assert made["FunctionUrl"].startswith("https://"), logical
        assert made["AuthType"] == props["AuthType"] == "NONE"
        policy = json.loads(lam.get_policy(FunctionName=target)["Policy"])
        actions = {s["Action"] for s in policy["Statement"]}
        assert "lambda:InvokeFunctionUrl" in actions, actions


def test_schedules_call_their_functions(rehearsal: Rehearsal) -> None:
    events, lam = boto3.client("events"), boto3.client("lambda")
    rules = {k: r for k, r in rehearsal.of_type("AWS::Events::Rule").items()
             if "ScheduleExpression" in r["Properties"]}
    assert rules
    schedules = {}
    for logical, resource in rules.items():
        props = resource["Properties"]
        rule = events.describe_rule(Name=rehearsal.physical[logical])
        assert rule["ScheduleExpression"] == props["ScheduleExpression"], logical
        assert rule.get("State", "ENABLED") == "ENABLED"
        targets = events.list_targets_by_rule(Rule=rule["Name"])["Targets"]
        want = [lam.get_function_configuration(FunctionName=rehearsal.physical[
            t["Arn"]["Fn::GetAtt"][0]])["FunctionArn"] for t in props["Targets"]]
        assert [t["Arn"] for t in targets] == want, logical
        schedules[logical] = rule["ScheduleExpression"]
    print("\nschedules:", schedules)


def test_the_stream_mappings_read_their_tables_streams(rehearsal: Rehearsal) -> None:
    lam, dynamodb = boto3.client("lambda"), boto3.client("dynamodb")
    mappings = rehearsal.of_type("AWS::Lambda::EventSourceMapping")
    for logical, resource in mappings.items():
        props = resource["Properties"]
        function = rehearsal.physical[props["FunctionName"]["Ref"]]
        (mapping,) = lam.list_event_source_mappings(FunctionName=function)["EventSourceMappings"]
        table = rehearsal.physical[props["EventSourceArn"]["Fn::GetAtt"][0]]
        stream = dynamodb.describe_table(TableName=table)["Table"]["LatestStreamArn"]
        assert mapping["EventSourceArn"] == stream, logical
        assert mapping["BatchSize"] == props.get("BatchSize", mapping["BatchSize"])


def test_log_groups_bucket_topic_and_api(rehearsal: Rehearsal) -> None:
    logs, s3 = boto3.client("logs"), boto3.client("s3")
    for resource in rehearsal.of_type("AWS::Logs::LogGroup").values():
        name = resource["Properties"]["LogGroupName"]
        (group,) = [g for g in logs.describe_log_groups(logGroupNamePrefix=name)["logGroups"]
                    if g["logGroupName"] == name]
        assert group.get("retentionInDays") == resource["Properties"].get("RetentionInDays")
    account = boto3.client("sts").get_caller_identity()["Account"]
    for logical, resource in rehearsal.of_type("AWS::S3::Bucket").items():
        props = resource["Properties"]
        name = rehearsal.physical[logical]
        want = props["BucketName"]
        if isinstance(want, dict):
            want = want["Fn::Sub"].replace("${AWS::AccountId}", account).replace(
                "${AWS::Region}", REGION)
        assert name == want
        # (moto's CloudFormation makes the bucket but applies neither its versioning
        # nor its encryption: tests/integration/test_package.py reads those.)
        s3.head_bucket(Bucket=name)
    topics = boto3.client("sns").list_topics()["Topics"]
    for logical in rehearsal.of_type("AWS::SNS::Topic"):
        assert rehearsal.physical[logical] in {t["TopicArn"] for t in topics}
    # The RestApi is made, but empty: moto ignores its Body (MOTO_FAILS).
    apigw = boto3.client("apigateway")
    for logical, resource in rehearsal.of_type("AWS::ApiGateway::RestApi").items():
        api = apigw.get_rest_api(restApiId=rehearsal.physical[logical])
        assert api["name"] == resource["Properties"]["Body"]["info"]["title"]


def test_vpc_endpoints_in_the_vpc_mode(rehearsal: Rehearsal) -> None:
    """The endpoints the template makes in VPC mode (none in the public mode) are in
    the VPC it was given, for the services it names."""
    ec2 = boto3.client("ec2")
    endpoints = {k: r for k, r in rehearsal.of_type("AWS::EC2::VPCEndpoint").items()
                 if "Condition" not in r or rehearsal.condition(r["Condition"])}
    if "SubnetIds" in rehearsal.parameters:
        assert endpoints, "VPC mode without endpoints"
    for logical, resource in endpoints.items():
        props = rehearsal.value(resource["Properties"])
        (made,) = ec2.describe_vpc_endpoints(
            VpcEndpointIds=[rehearsal.physical[logical]])["VpcEndpoints"]
        service = props["ServiceName"]
        if isinstance(service, dict):
            service = service["Fn::Sub"].replace("${AWS::Region}", REGION)
        assert made["ServiceName"] == service, logical
        assert made["VpcId"] == rehearsal.parameters["VpcId"], logical
    print(f"\n{len(endpoints)} endpoints:", sorted(endpoints))


def test_the_worker_stack_beside_it(rehearsal: Rehearsal) -> None:
    """.chalice/ecs-worker.json in the same account: created; what its container is
    given from Secrets Manager and SSM exists there (the secrets' JSON keys, the
    parameters README step 2 makes); its task role names the SAM stack's tables and
    indexes. moto's ECS keeps the container definition but drops the service's
    launch type and network configuration and the task's roles, CPU and runtime
    platform (tests/unit/test_ecs_template.py reads those in the template)."""
    worker = rehearsal.worker
    assert worker["status"] == "CREATE_COMPLETE"
    assert set(worker["physical"]) == set(worker["template"]["Resources"])  # a new cluster
    (container,) = worker["task"]["containerDefinitions"]
    assert container["image"] == worker["parameters"]["ImageUri"]
    assert container["stopTimeout"] == 120
    secrets, ssm = boto3.client("secretsmanager"), boto3.client("ssm")
    for secret in container["secrets"]:
        value_from = secret["valueFrom"]
        if ":secretsmanager:" in value_from:
            arn, key, stage, version = value_from.rsplit(":", 3)
            assert (stage, version) == ("", "") and arn in (
                worker["parameters"]["SecretArn"], worker["parameters"]["StageSecretArn"])
            assert key in json.loads(secrets.get_secret_value(SecretId=arn)["SecretString"])
        else:
            name = value_from.split(":parameter", 1)[1]
            assert ssm.get_parameter(Name=name)["Parameter"]["Value"], name
    assert {s["name"] for s in container["secrets"]} >= {
        "RMQ_WORKER_URL" if n == "RMQ_URL" else n for n in config.ROLE_NEEDS[""]}
    # The task role's tables and indexes are the SAM stack's.
    iam, dynamodb = boto3.client("iam"), boto3.client("dynamodb")
    role = worker["physical"]["WorkerTaskRole"]
    (name,) = iam.list_role_policies(RoleName=role)["PolicyNames"]
    document = _document(iam.get_role_policy(RoleName=role, PolicyName=name)["PolicyDocument"])
    arns = [r for st in document["Statement"] if st is not None
            for r in ([st["Resource"]] if isinstance(st["Resource"], str) else st["Resource"])]
    assert arns
    for arn in arns:
        table, _, index = arn.split(":table/", 1)[1].partition("/index/")
        described = dynamodb.describe_table(TableName=table)["Table"]
        if index:
            assert index in {i["IndexName"] for i in described.get("GlobalSecondaryIndexes", [])}
    logs = boto3.client("logs").describe_log_groups(
        logGroupNamePrefix=worker["outputs"]["LogGroupName"])["logGroups"]
    assert [g["logGroupName"] for g in logs] == [worker["outputs"]["LogGroupName"]]
