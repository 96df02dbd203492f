"""`python -m local.package --stage prod [--out DIR]` (`make package STAGE=prod`).

Runs `chalice package` (SAM/CloudFormation) with `.chalice/resources.json`
merged in: the DynamoDB tables with their keys and indexes, the function URL of
the Alipay notify function and its permissions, the paging (a CloudWatch alarm
on each metric chalicelib/metrics.py writes, all notifying the SNS topic
`AttentionTopic`; parameter `AttentionEmail` subscribes an address, output
`AttentionTopicArn` names the topic), and the outputs. The merge template says
`@STAGE@` where the stage's name goes (table names, tags, the alarms' Stage
dimension), so that one file serves every stage and the names match
`.chalice/config.json` and `.chalice/policy-<stage>.json`.

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
log group's streams and the reconciler's bills prefix, whose names are made at
run time), any Scan the code does not make, any secret given to a function whose
role does not use it, a notify function without reserved concurrency, a
reconciler that may run twice at once, and a function told to reconcile inside
itself (RECONCILE_INLINE: only the reconciler's role may write the day's results
and the bills); `main` refuses to finish on any of them
(tests/integration/test_package.py runs it, and cfn-lint).

The raw bills go to the bucket `shop-pay-<stage>-bills-<account>-<region>`
(`BillsBucket`: versioned, AES256, no public access, TLS only, kept when the
stack goes); only the reconciler may put objects, under `bills/` only.

Nothing here talks to AWS. Building the deployment zip downloads the Lambda
(manylinux) wheels of requirements.txt from PyPI the first time; chalice keeps
them in `.chalice/deployments/` for the next runs.
"""

from __future__ import annotations

import argparse
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

PROJECT_DIR = Path(__file__).resolve().parent.parent
MERGE_TEMPLATE = PROJECT_DIR / ".chalice" / "resources.json"
STAGE_TOKEN = "@STAGE@"


def merge_template(stage: str, without_indexes: Iterable[str] = ()) -> dict[str, Any]:
    """The merge template for `stage`, less the global secondary indexes named in
    `without_indexes` (and the attribute definitions no remaining key uses)."""
    text = MERGE_TEMPLATE.read_text(encoding="utf-8").replace(STAGE_TOKEN, stage)
    template: dict[str, Any] = json.loads(text)
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


def _chalice() -> str:
    beside = Path(sys.executable).with_name("chalice")
    return str(beside) if beside.exists() else (shutil.which("chalice") or "chalice")


def build(stage: str, out: Path, without_indexes: Iterable[str] = ()) -> Path:
    """Writes sam.json and deployment.zip to `out` (emptied first); returns sam.json.
    `without_indexes`: global secondary indexes to leave out (see above)."""
    stages = json.loads((PROJECT_DIR / ".chalice" / "config.json").read_text())["stages"]
    if stage not in stages or stage == "local":
        raise SystemExit(f"no deployable stage {stage!r}; one of "
                         f"{', '.join(s for s in stages if s != 'local')}")
    out = out.resolve()
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        merge = Path(tmp) / f"resources-{stage}.json"
        merge.write_text(json.dumps(merge_template(stage, without_indexes), indent=2))
        subprocess.run(
            [_chalice(), "--project-dir", str(PROJECT_DIR), "package", "--stage", stage,
             "--pkg-format", "cloudformation", "--template-format", "json",
             "--merge-template", str(merge), str(out)],
            check=True, cwd=PROJECT_DIR,
            # chalice wants a region even to write a template; the template itself
            # uses AWS::Region, so any region will do when none is configured.
            env={**os.environ, "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION")
                 or os.environ.get("AWS_REGION") or "us-east-1"},
        )
    return out / "sam.json"


# Settings that only the roles that read them may be given (config.ROLE_NEEDS).
# BILLS_BUCKET is no secret, but a function given it tries to write there, which
# only the reconciler's role may.
GUARDED_SETTINGS = ("JWT_SECRET", "ALIPAY_APP_PRIVATE_KEY", "RMQ_URL", "RMQ_WORKER_URL",
                    "ALIPAY_PUBLIC_KEY", "ALIPAY_APP_ID", "ALIPAY_SELLER_ID", "ALIPAY_GATEWAY",
                    "BILLS_BUCKET")
# The only scans the code makes: list_goods and list_sales, both API routes
# (chalicelib/store/catalog.py, sales.py). Table name suffix per role.
ALLOWED_SCANS = {"api": {"goods", "sales"}}
_DYNAMIC = re.compile(r"\{\{resolve:(ssm|secretsmanager):[^}]+\}\}")


def _listed(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _text(value: Any) -> str:
    """An ARN as written: a string, or the string of an Fn::Sub."""
    if isinstance(value, dict) and "Fn::Sub" in value:
        sub = value["Fn::Sub"]
        return sub[0] if isinstance(sub, list) else sub
    return value if isinstance(value, str) else json.dumps(value)


def _own_logs(arn: str, function_name: str | None) -> bool:
    """The function's own log group and its streams: Lambda names the streams at
    run time, so `:*` after the group's name is the one wildcard IAM needs."""
    return bool(function_name) and re.fullmatch(
        r"arn:(aws|\$\{AWS::Partition\}):logs:\$\{AWS::Region\}:\$\{AWS::AccountId\}:"
        rf"log-group:/aws/lambda/{re.escape(str(function_name))}:\*", arn) is not None


def _bills_objects(arn: str) -> bool:
    """The objects under `bills/` of the stage's bills bucket: a bill's key is made
    when it is kept (its day and time), so `bills/*` is the narrowest ARN."""
    return re.fullmatch(r"arn:(aws|\$\{AWS::Partition\}):s3:::shop-pay-[a-z0-9-]+-bills-"
                        r"\$\{AWS::AccountId\}-\$\{AWS::Region\}/bills/\*", arn) is not None


def _truthy(value: Any) -> bool:
    return str(value).strip().lower() not in ("", "0", "false", "no")  # as config.load


def policy_problems(template: dict[str, Any]) -> list[str]:
    """What makes a deploy template grant more than its functions use: each as a
    sentence naming the function. Empty: none. Pure (reads the template only)."""
    problems: list[str] = []
    resources = template.get("Resources", {})
    for fn_id, fn in resources.items():
        if fn.get("Type") not in ("AWS::Serverless::Function", "AWS::Lambda::Function"):
            continue
        props = fn.get("Properties", {})
        env = props.get("Environment", {}).get("Variables", {})
        role = env.get("FUNCTION_ROLE")
        if role not in config.ROLES:
            problems.append(f"{fn_id}: FUNCTION_ROLE {role!r} is none of {config.ROLES}")
            continue
        needs = config.ROLE_NEEDS[role]
        for name in GUARDED_SETTINGS:
            if name in env and name not in needs:
                problems.append(f"{fn_id} ({role}) is given {name}, which it does not use")
        for name in needs:
            if name not in env:
                problems.append(f"{fn_id} ({role}) lacks {name}: it would refuse to start")
            elif isinstance(env[name], str) and not _DYNAMIC.fullmatch(env[name]):
                problems.append(f"{fn_id}: {name} is written in the template, not resolved "
                                f"from SSM or Secrets Manager")
        if role == "notify" and not props.get("ReservedConcurrentExecutions"):
            problems.append(f"{fn_id} (notify) has no reserved concurrency")
        if role == "reconciler" and props.get("ReservedConcurrentExecutions") != 1:
            problems.append(f"{fn_id} (reconciler) may run twice at once: reserve "
                            f"concurrency 1")
        if _truthy(env.get("RECONCILE_INLINE", "")):
            problems.append(f"{fn_id} ({role}) has RECONCILE_INLINE set: on AWS only the "
                            f"reconciler function runs a day (the others may not write it)")
        ref = props.get("Role", {})
        role_id = ref.get("Fn::GetAtt", [None])[0] if isinstance(ref, dict) else None
        if role_id not in resources:
            problems.append(f"{fn_id}: its role is not in the template")
            continue
        problems += [f"{fn_id} ({role}): {p}" for p in _statement_problems(
            resources[role_id], props.get("FunctionName"), ALLOWED_SCANS.get(role, set()))]
    return problems


def _statement_problems(role: dict[str, Any], function_name: str | None,
                        scans: set[str]) -> list[str]:
    problems = []
    props = role.get("Properties", {})
    if props.get("ManagedPolicyArns"):
        problems.append(f"managed policies {props['ManagedPolicyArns']} (not reviewed here)")
    for policy in props.get("Policies", []):
        for st in _listed(policy.get("PolicyDocument", {}).get("Statement", [])):
            if st.get("Effect") != "Allow" or "NotAction" in st or "NotResource" in st:
                problems.append(f"statement {st.get('Sid')}: only Allow with Action and "
                                f"Resource is reviewed")
                continue
            actions = [_text(a) for a in _listed(st.get("Action", []))]
            arns = [_text(r) for r in _listed(st.get("Resource", []))]
            problems += [f"wildcard action {a!r}" for a in actions if "*" in a]
            logs = all(a.startswith("logs:") for a in actions)
            puts = all(a == "s3:PutObject" for a in actions)
            problems += [f"wildcard resource {r!r}" for r in arns
                         if "*" in r and not (logs and _own_logs(r, function_name))
                         and not (puts and _bills_objects(r))]
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
