"""`python -m local.package --stage prod [--out DIR]` (`make package STAGE=prod`).

Runs `chalice package` (SAM/CloudFormation) with `.chalice/resources.json`
merged in: the DynamoDB tables with their keys and indexes, the function URL of
the Alipay notify function and its permissions, the paging (a CloudWatch alarm
on each metric chalicelib/metrics.py writes, all notifying the SNS topic
`AttentionTopic`; parameter `AttentionEmail` subscribes an address, output
`AttentionTopicArn` names the topic), the VPC mode, and the outputs. The merge
template says `@STAGE@` where the stage's name goes (table names, tags, the
alarms' Stage dimension), so that one file serves every stage and the names
match `.chalice/config.json` and `.chalice/policy-<stage>.json`.

The VPC mode (README "Deploy to AWS"): parameters `SubnetIds` and
`SecurityGroupIds` (either set: condition `InVpc`, every function gets a
`VpcConfig`, every role the ENI actions Lambda needs in a VPC, in a statement
that exists only under `InVpc`); `RouteTableIds` adds a DynamoDB gateway
endpoint, `InterfaceEndpoints=true` the Secrets Manager, SSM and CloudWatch
Logs interface endpoints (with `VpcId`). Both empty: no VPC, the trial mode.

The gateway's own answers (the 401 of a request without a token) are written in
resources.json as `AWS::ApiGateway::GatewayResponse` resources (local/api.py
serves the same bodies); the build moves them into the API's own
`GatewayResponses` property, because a separate GatewayResponse is dropped from
the API by SAM's next redeployment (aws/serverless-application-model#390, #623).

An existing table takes one new global secondary index per deployment
(CloudFormation refuses more: "Cannot perform more than one GSI creation or
deletion in a single update"). `--without-index NAME` (repeatable) leaves
indexes out of this build, with the key attributes only they use, so that a
stack made before them grows one index a deployment:

    python -m local.package --stage prod --without-index by-trade \
        --without-index recheck-by-time --without-index paid-but-closed   # + by-status
    python -m local.package --stage prod --without-index recheck-by-time \
        --without-index paid-but-closed                                   # + by-trade
    ...                                                                    # then all

A new stack needs none of this: a table is created with all its indexes.

Each function has its own role and settings (`lambda_functions` in
`.chalice/config.json`, `.chalice/policy-<stage>[-<function>].json`):
`policy_problems` reads the built template and names any wildcard (but the own
log group's streams, the reconciler's bills prefix, the stage secret's
`-??????` suffix and the VPC mode's ENI actions), any Scan the code does not
make, any setting given to a function whose role does not use it, any secret in
a function's environment (secrets are read at run time from `SECRET_ID`, the
stage's secret in Secrets Manager, which only the roles that need it may read),
a function that publishes without reserved concurrency (each warm instance holds
a broker connection), a sweeper or reconciler that may run twice at once, a
timeout no longer than the role's longest outbound call chain
(`config.OUTBOUND_CHAIN_SECONDS`; the API's within API Gateway's 29 s), and a
function told to reconcile inside itself (RECONCILE_INLINE: only the
reconciler's role may write the day's results and the bills); `main` refuses to
finish on any of them (tests/integration/test_package.py runs it, and cfn-lint).

The raw bills go to the bucket `shop-pay-<stage>-bills-<account>-<region>`
(`BillsBucket`: versioned, AES256, no public access, TLS only, kept when the
stack goes); only the reconciler may put objects, under `bills/` only. Tables,
the bucket and the log groups are `RetainExceptOnCreate`: kept when the stack
goes, removed when the deployment that created them rolls back (so that the
next attempt does not meet "already exists").

Nothing here talks to AWS. Building the deployment zip downloads the Lambda
(manylinux) wheels of requirements.txt from PyPI the first time; chalice keeps
them in `.chalice/deployments/` for the next runs.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from chalicelib import config
from local import lambda_zip

PROJECT_DIR = Path(__file__).resolve().parent.parent
MERGE_TEMPLATE = PROJECT_DIR / ".chalice" / "resources.json"
STAGE_TOKEN = "@STAGE@"


def merge_template(stage: str, without_indexes: Iterable[str] = ()) -> dict[str, Any]:
    """The merge template for `stage`, less the global secondary indexes named in
    `without_indexes` (and the attribute definitions no remaining key uses)."""
    text = MERGE_TEMPLATE.read_text(encoding="utf-8").replace(STAGE_TOKEN, stage)
    template: dict[str, Any] = json.loads(text)
    _gateway_responses_into_the_api(template)
    left_out = set(without_indexes)
    if not left_out:
        return template
    found: set[str] = set()
    for resource in template["Resources"].values():
        if resource.get("Type") != "AWS::DynamoDB::Table":
            continue
        props = resource["Properties"]
        indexes = props.get("GlobalSecondaryIndexes", [])
        found |= {i["IndexName"] for i in indexes} & left_out
        kept = [i for i in indexes if i["IndexName"] not in left_out]
        if len(kept) == len(indexes):
            continue
        if kept:
            props["GlobalSecondaryIndexes"] = kept
        else:
            del props["GlobalSecondaryIndexes"]
        used = {k["AttributeName"] for k in props["KeySchema"]}
        used |= {k["AttributeName"] for i in kept for k in i["KeySchema"]}
        props["AttributeDefinitions"] = [a for a in props["AttributeDefinitions"]
                                         if a["AttributeName"] in used]
    unknown = sorted(left_out - found)
    if unknown:
        raise SystemExit(f"no index {', '.join(unknown)} in {MERGE_TEMPLATE.name}")
    return template


API_ID = "RestAPI"  # chalice's AWS::Serverless::Api
_GATEWAY_PARAMETERS = {"header": "Headers", "path": "Paths", "querystring": "QueryStrings"}


def _gateway_responses_into_the_api(template: dict[str, Any]) -> None:
    """Moves each `AWS::ApiGateway::GatewayResponse` of the API into its own
    `GatewayResponses` (SAM's form: `ResponseParameters` grouped as Headers, Paths,
    QueryStrings), which SAM writes into the API's definition: a separate
    resource is dropped from the API by the next redeployment."""
    resources = template["Resources"]
    moved: dict[str, Any] = {}
    for rid, resource in list(resources.items()):
        props = resource.get("Properties", {})
        if (resource.get("Type") != "AWS::ApiGateway::GatewayResponse"
                or props.get("RestApiId") != {"Ref": API_ID}):
            continue
        answer: dict[str, Any] = {}
        if "StatusCode" in props:
            answer["StatusCode"] = props["StatusCode"]
        for key, value in props.get("ResponseParameters", {}).items():
            _, kind, name = key.split(".", 2)  # gatewayresponse.header.Content-Type
            answer.setdefault("ResponseParameters", {}).setdefault(
                _GATEWAY_PARAMETERS[kind], {})[name] = value
        if "ResponseTemplates" in props:
            answer["ResponseTemplates"] = props["ResponseTemplates"]
        moved[props["ResponseType"]] = answer
        del resources[rid]
    if moved:
        api = resources.setdefault(API_ID, {}).setdefault("Properties", {})
        api.setdefault("GatewayResponses", {}).update(moved)


# The functions' runtime. Chalice takes the Python it runs under (3.11 here), and
# Lambda's python3.11 (Amazon Linux 2) is deprecated: from 31 July 2026 no new
# function may use it, from 31 August 2026 none may be updated. python3.12 runs
# on Amazon Linux 2023 (deprecation projected for 2028); the code runs on both,
# and chalice fetches the cp312 wheels (tests/integration/test_lambda_zip.py
# loads every module from the zip under python3.12).
LAMBDA_RUNTIME = "python3.12"


def runtime_python() -> str | None:
    """An interpreter of LAMBDA_RUNTIME's Python on this machine, to load the zip's
    wheels with (a real binary: pyenv's shims need its shell set-up); None: none."""
    version = LAMBDA_RUNTIME.removeprefix("python")
    found = [*sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}*/bin/"
                                                  f"python{version}"))),
             f"/usr/bin/python{version}", f"/usr/local/bin/python{version}"]
    return next((p for p in found if os.access(p, os.X_OK)), None)

# `chalice package` with the runtime above instead of the interpreter's version.
# Chalice (1.34) asks pip for the runtime's ABI but not its Python version, so
# under another Python pip finds no wheel for a binary dependency (cffi) and
# chalice leaves it out with a warning: the wrapper adds `--python-version`.
_CHALICE = """
import os, sys
from chalice import config
from chalice.cli import main
from chalice.deploy import packager
runtime = os.environ["SHOP_LAMBDA_RUNTIME"]
config.Config.lambda_python_version = property(lambda self: runtime)
execute = packager.PipRunner._execute
def _execute(self, command, args, *rest, **kw):
    if command == "download" and "--abi" in args and "--python-version" not in args:
        args = ["--python-version", runtime.removeprefix("python"), *args]
    return execute(self, command, args, *rest, **kw)
packager.PipRunner._execute = _execute
sys.exit(main())
"""


def build(stage: str, out: Path, without_indexes: Iterable[str] = (), *,
          whole_zip: Path | None = None) -> Path:
    """Writes sam.json and deployment.zip to `out` (emptied first); returns sam.json.
    `without_indexes`: global secondary indexes to leave out (see above).
    `whole_zip`: where to keep a copy of the zip as chalice made it (the bench)."""
    stages = json.loads((PROJECT_DIR / ".chalice" / "config.json").read_text())["stages"]
    if stage not in stages or stage == "local":
        raise SystemExit(f"no deployable stage {stage!r}; one of "
                         f"{', '.join(s for s in stages if s != 'local')}")
    region, default = os.environ.get("AWS_REGION"), os.environ.get("AWS_DEFAULT_REGION")
    if region and default and region != default:
        # The AWS CLI takes AWS_REGION, SAM CLI (boto3) only AWS_DEFAULT_REGION: the
        # settings would go to one region and the stack to another.
        raise SystemExit(f"AWS_REGION={region} but AWS_DEFAULT_REGION={default}: export "
                         f"both as the one region the stack and its settings live in")
    out = out.resolve()
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        merge = Path(tmp) / f"resources-{stage}.json"
        merge.write_text(json.dumps(merge_template(stage, without_indexes), indent=2))
        done = subprocess.run(
            [sys.executable, "-c", _CHALICE, "--project-dir", str(PROJECT_DIR), "package",
             "--stage", stage,
             "--pkg-format", "cloudformation", "--template-format", "json",
             "--merge-template", str(merge), str(out)],
            check=False, cwd=PROJECT_DIR, capture_output=True, text=True,
            # chalice wants a region even to write a template; the template itself
            # uses AWS::Region, so any region will do when none is configured.
            env={**os.environ, "AWS_DEFAULT_REGION": default or region or "us-east-1",
                 "SHOP_LAMBDA_RUNTIME": LAMBDA_RUNTIME},
        )
        sys.stderr.write(done.stdout + done.stderr)
        if done.returncode:
            raise SystemExit(f"chalice package failed (exit {done.returncode}, above)")
        if "Could not install dependencies" in done.stdout + done.stderr:
            # the zip would lack a module the functions import
            raise SystemExit("chalice left dependencies out of deployment.zip (above)")
    if whole_zip is not None:
        shutil.copyfile(out / "deployment.zip", whole_zip)
    lambda_zip.slim(out / "deployment.zip")  # the runtime's boto3/botocore, not a copy
    return out / "sam.json"


# Settings that only the roles that read them may be given (config.ROLE_NEEDS).
# BILLS_BUCKET is no secret, but a function given it tries to write there, which
# only the reconciler's role may. The secrets (config.SECRET_KEYS and
# OPTIONAL_SECRET_KEYS) are never in an environment at all: SECRET_ID names the
# stage's secret, read at run time.
GUARDED_SETTINGS = ("RMQ_WORKER_URL", "ALIPAY_PUBLIC_KEY", "ALIPAY_APP_ID",
                    "ALIPAY_SELLER_ID", "ALIPAY_GATEWAY", "BILLS_BUCKET")
SECRET_ID = "SECRET_ID"
# The only scans the code makes: list_goods and list_sales, both API routes
# (chalicelib/store/catalog.py, sales.py). Table name suffix per role.
ALLOWED_SCANS = {"api": {"goods", "sales"}}
_SSM = re.compile(r"\{\{resolve:ssm:[^}]+\}\}")
# What Lambda does with its execution role to attach a function to a VPC (the EC2
# part of AWSLambdaVPCAccessExecutionRole): ENIs have no ARN before they exist, so
# "*" is the only resource; allowed only in a statement that exists in VPC mode.
VPC_CONDITION = "InVpc"
VPC_ACTIONS = frozenset({"ec2:CreateNetworkInterface", "ec2:DescribeNetworkInterfaces",
                         "ec2:DescribeSubnets", "ec2:DeleteNetworkInterface",
                         "ec2:AssignPrivateIpAddresses", "ec2:UnassignPrivateIpAddresses"})
LAMBDA_DEFAULT_TIMEOUT_S = 3


def secret_name(stage: str) -> str:
    """The stage's secret in Secrets Manager (SECRET_ID): a JSON SecretString with the
    keys config.SECRET_KEYS names."""
    return f"shop-pay/{stage}"


def _listed(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _text(value: Any) -> str:
    """An ARN as written: a string, or the string of an Fn::Sub."""
    if isinstance(value, dict) and "Fn::Sub" in value:
        sub = value["Fn::Sub"]
        return sub[0] if isinstance(sub, list) else sub
    return value if isinstance(value, str) else json.dumps(value)


_ARN_HEAD = r"arn:(aws|\$\{AWS::Partition\}):%s:\$\{AWS::Region\}:\$\{AWS::AccountId\}:"


def _own_logs(arn: str, function_name: str | None) -> bool:
    """The function's own log group and its streams: Lambda names the streams at
    run time, so `:*` after the group's name is the one wildcard IAM needs."""
    return isinstance(function_name, str) and re.fullmatch(
        _ARN_HEAD % "logs" + rf"log-group:/aws/lambda/{re.escape(function_name)}:\*",
        arn) is not None


def _bills_objects(arn: str) -> bool:
    """The objects under `bills/` of the stage's bills bucket: a bill's key is made
    when it is kept (its day and time), so `bills/*` is the narrowest ARN."""
    return re.fullmatch(r"arn:(aws|\$\{AWS::Partition\}):s3:::shop-pay-[a-z0-9-]+-bills-"
                        r"\$\{AWS::AccountId\}-\$\{AWS::Region\}/bills/\*", arn) is not None


def _stage_secret(arn: str, stage: str) -> bool:
    """The stage's secret: Secrets Manager appends `-` and six random characters to a
    secret's name in its ARN, so `-??????` is the narrowest ARN that names it
    before it exists (and no other secret: `?` is exactly one character)."""
    return re.fullmatch(_ARN_HEAD % "secretsmanager"
                        + rf"secret:{re.escape(secret_name(stage))}-\?{{6}}", arn) is not None


def _truthy(value: Any) -> bool:
    return str(value).strip().lower() not in ("", "0", "false", "no")  # as config.load


def _statements(role: dict[str, Any]) -> list[tuple[str | None, Any]]:
    """(condition, statement) of each statement of the role's inline policies: None
    for one that always holds; under `Fn::If`, each branch that is a statement, with
    the condition it holds under (`!NAME` for the second)."""
    found: list[tuple[str | None, Any]] = []
    for policy in role.get("Properties", {}).get("Policies", []):
        for st in _listed(policy.get("PolicyDocument", {}).get("Statement", [])):
            if isinstance(st, dict) and set(st) == {"Fn::If"}:
                condition, when, otherwise = st["Fn::If"]
                found += [(c, b) for c, b in ((condition, when), (f"!{condition}", otherwise))
                          if b != {"Ref": "AWS::NoValue"}]
            else:
                found.append((None, st))
    return found


def _reads_stage_secret(role: dict[str, Any], stage: str) -> bool:
    return any(isinstance(st, dict) and st.get("Effect") == "Allow"
               and "secretsmanager:GetSecretValue" in _listed(st.get("Action", []))
               and any(_stage_secret(_text(r), stage) for r in _listed(st.get("Resource", [])))
               for condition, st in _statements(role) if condition is None)


def policy_problems(template: dict[str, Any]) -> list[str]:
    """What makes a deploy template grant more than its functions use, or deploy a
    function that cannot work: each as a sentence naming the function. Empty: none.
    Pure (reads the template only)."""
    problems: list[str] = []
    resources = template.get("Resources", {})
    vpc_mode = VPC_CONDITION in template.get("Conditions", {})
    for fn_id, fn in resources.items():
        if fn.get("Type") not in ("AWS::Serverless::Function", "AWS::Lambda::Function"):
            continue
        props = fn.get("Properties", {})
        env = props.get("Environment", {}).get("Variables", {})
        role = env.get("FUNCTION_ROLE")
        if role not in config.ROLES:
            problems.append(f"{fn_id}: FUNCTION_ROLE {role!r} is none of {config.ROLES}")
            continue
        stage = str(env.get("STAGE", ""))
        needs = config.ROLE_NEEDS[role]
        secrets = [n for n in needs if n in config.SECRET_KEYS]
        for name, value in env.items():
            if "{{resolve:secretsmanager" in json.dumps(value):
                problems.append(f"{fn_id}: {name} resolves a Secrets Manager value into the "
                                f"function's environment (readable with "
                                f"lambda:GetFunctionConfiguration, stale after a rotation)")
        for name in (*config.SECRET_KEYS, *config.OPTIONAL_SECRET_KEYS):
            if name in env:
                problems.append(f"{fn_id} ({role}) has {name} in its environment: a secret "
                                f"is read at run time from {SECRET_ID}")
        for name in GUARDED_SETTINGS:
            if name in env and name not in needs:
                problems.append(f"{fn_id} ({role}) is given {name}, which it does not use")
        for name in needs:
            if name in config.SECRET_KEYS:
                continue
            if name not in env:
                problems.append(f"{fn_id} ({role}) lacks {name}: it would refuse to start")
            elif isinstance(env[name], str) and not _SSM.fullmatch(env[name]):
                problems.append(f"{fn_id}: {name} is written in the template, not resolved "
                                f"from SSM")
        if secrets and SECRET_ID not in env:
            problems.append(f"{fn_id} ({role}) lacks {SECRET_ID} (its {', '.join(secrets)}): "
                            f"it would refuse to start")
        elif secrets and env[SECRET_ID] != secret_name(stage):
            problems.append(f"{fn_id} ({role}): {SECRET_ID} {env[SECRET_ID]!r} is not the "
                            f"stage's secret {secret_name(stage)!r}")
        elif not secrets and SECRET_ID in env:
            problems.append(f"{fn_id} ({role}) is given {SECRET_ID}, which it does not use")
        publishes = "RMQ_URL" in needs
        if publishes and not props.get("ReservedConcurrentExecutions"):
            problems.append(f"{fn_id} ({role}) has no reserved concurrency: each warm "
                            f"instance holds a broker connection, and nothing bounds them")
        if role in ("sweeper", "reconciler") and props.get("ReservedConcurrentExecutions") != 1:
            problems.append(f"{fn_id} ({role}) may run twice at once: reserve "
                            f"concurrency 1")
        timeout = props.get("Timeout", LAMBDA_DEFAULT_TIMEOUT_S)
        chain = config.OUTBOUND_CHAIN_SECONDS[role]
        if not (isinstance(timeout, int | float) and timeout > chain):
            problems.append(f"{fn_id} ({role}): its timeout {timeout!r} s is not longer than "
                            f"its longest chain of outbound calls ({chain:g} s)")
        if role == "api" and isinstance(timeout, int | float) and (
                timeout > config.API_GATEWAY_TIMEOUT_SECONDS):
            problems.append(f"{fn_id} (api): its timeout {timeout} s is longer than API "
                            f"Gateway waits ({config.API_GATEWAY_TIMEOUT_SECONDS:g} s)")
        if not isinstance(props.get("FunctionName"), str):
            problems.append(f"{fn_id} ({role}) has no fixed FunctionName: its log group, "
                            f"and its role's grant on it, would depend on the stack's name")
        if vpc_mode and "VpcConfig" not in props:
            problems.append(f"{fn_id} ({role}) has no VpcConfig: in VPC mode it would run "
                            f"outside the VPC, away from a private broker")
        if _truthy(env.get("RECONCILE_INLINE", "")):
            problems.append(f"{fn_id} ({role}) has RECONCILE_INLINE set: on AWS only the "
                            f"reconciler function runs a day (the others may not write it)")
        ref = props.get("Role", {})
        role_id = ref.get("Fn::GetAtt", [None])[0] if isinstance(ref, dict) else None
        if role_id not in resources:
            problems.append(f"{fn_id}: its role is not in the template")
            continue
        reads_secret = _reads_stage_secret(resources[role_id], stage)
        if secrets and not reads_secret:
            problems.append(f"{fn_id} ({role}) may not read its secret: no "
                            f"secretsmanager:GetSecretValue on {secret_name(stage)}-??????")
        elif reads_secret and not secrets:
            problems.append(f"{fn_id} ({role}) may read the stage's secret, which it does "
                            f"not use")
        problems += [f"{fn_id} ({role}): {p}" for p in _statement_problems(
            resources[role_id], props.get("FunctionName"), stage,
            ALLOWED_SCANS.get(role, set()))]
    return problems


def _statement_problems(role: dict[str, Any], function_name: str | None, stage: str,
                        scans: set[str]) -> list[str]:
    problems = []
    props = role.get("Properties", {})
    if props.get("ManagedPolicyArns"):
        problems.append(f"managed policies {props['ManagedPolicyArns']} (not reviewed here)")
    for condition, st in _statements(role):
        if (not isinstance(st, dict) or st.get("Effect") != "Allow" or "NotAction" in st
                or "NotResource" in st):
            sid = st.get("Sid") if isinstance(st, dict) else None
            problems.append(f"statement {sid}: only Allow with Action and Resource is reviewed")
            continue
        actions = [_text(a) for a in _listed(st.get("Action", []))]
        arns = [_text(r) for r in _listed(st.get("Resource", []))]
        problems += [f"wildcard action {a!r}" for a in actions if "*" in a or "?" in a]
        logs = all(a.startswith("logs:") for a in actions)
        puts = all(a == "s3:PutObject" for a in actions)
        secret = actions == ["secretsmanager:GetSecretValue"]
        enis = condition == VPC_CONDITION and set(actions) <= VPC_ACTIONS and arns == ["*"]
        problems += [f"wildcard resource {r!r}" for r in arns
                     if ("*" in r or "?" in r) and not enis
                     and not (logs and _own_logs(r, function_name))
                     and not (puts and _bills_objects(r))
                     and not (secret and _stage_secret(r, stage))]
        if "dynamodb:Scan" in actions:
            for r in arns:
                table = r.rsplit(":table/", 1)[-1].split("/")[0]
                if table.split("-")[-1] not in scans or "/index/" in r:
                    problems.append(f"dynamodb:Scan on {r!r}, which the code never scans")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m local.package")
    parser.add_argument("--stage", default="prod")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: .chalice/package/<stage>")
    parser.add_argument("--without-index", action="append", default=[], metavar="NAME",
                        help="leave this global secondary index out (repeatable): an "
                             "existing table takes one new index per deployment")
    args = parser.parse_args(argv)
    out = args.out or PROJECT_DIR / ".chalice" / "package" / args.stage
    sam = build(args.stage, out, args.without_index)
    template = json.loads(sam.read_text())
    problems = policy_problems(template)
    if problems:
        sys.stderr.write("".join(f"{sam}: {p}\n" for p in problems))
        return 1
    sys.stdout.write(f"{sam} ({len(template['Resources'])} resources) and "
                     f"{out / 'deployment.zip'}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
