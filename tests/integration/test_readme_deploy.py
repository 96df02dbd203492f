"""The README's "Deploy to AWS" commands, held against the template `make package`
builds: a user who pastes them gets a stack, not an error halfway.

Its shell blocks are read as a shell would (continuation lines joined) and every
name they hand to AWS is checked against what the template and the code use:
each `--parameter-overrides Name=...` is a parameter of the template, and the
production deploys pass the VPC ones; each output a command reads is an output;
the tables and functions named exist; the SSM parameters put are exactly the
ones the template resolves, and the secret made is the one each function's
SECRET_ID names, with exactly the keys config.SECRET_KEYS reads; the region is
exported as both AWS_REGION and AWS_DEFAULT_REGION (the AWS CLI reads one, SAM
CLI the other) before any command; the broker is private, in the subnets the
functions use, and its security group lets in the functions' group on 5671;
the project's own commands (`python -m local ...`, `make ...`) take the options
given; every shell variable a command uses was set by an earlier one.

The build is the real one (local.package, as the Makefile runs it; about 10 s,
the first on a machine downloads the Lambda wheels). Nothing talks to AWS.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from chalicelib import config
from local import package

STAGE = "prod"
REPO = Path(__file__).resolve().parents[2]
SECTION = ("## Deploy to AWS\n", "## The worker on ECS Fargate\n")
ECS_SECTION = ("## The worker on ECS Fargate\n", "## The deploy rehearsal\n")
# What the shell or the user provides, not an earlier command.
GIVEN = {"HOME", "PWD"}


def section() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index(SECTION[0])
    return text[start:text.index(SECTION[1], start)]


def shell_blocks(text: str) -> list[str]:
    return re.findall(r"^```sh\n(.*?)^```$", text, re.M | re.S)


def commands(block: str) -> list[str]:
    """The block's commands: continuation lines joined, heredoc bodies and comments
    left out."""
    lines, heredoc = [], None
    for line in block.replace("\\\n", " ").splitlines():
        if heredoc is not None:
            if line.strip() == heredoc:
                heredoc = None
            continue
        found = re.search(r"<<-?'?(\w+)'?\s*$", line)
        if found and "<<<" not in line:
            heredoc = found.group(1)
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        if line:
            lines.append(line)
    return lines


def heredocs(block: str) -> list[str]:
    return re.findall(r"<<-?'?(\w+)'?\n(.*?)^\1$", block, re.M | re.S)


def stage(text: str) -> str:
    return text.replace("${STAGE}", STAGE).replace("$STAGE", STAGE)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    sam = package.build(STAGE, tmp_path_factory.mktemp("package") / STAGE)
    return json.loads(sam.read_text())


@pytest.fixture(scope="module")
def cmds() -> list[str]:
    found = [c for block in shell_blocks(section()) for c in commands(block)]
    assert len(found) > 40, "the section's shell blocks were not found"
    return found


def functions(template: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: v["Properties"] for k, v in template["Resources"].items()
            if v["Type"] == "AWS::Serverless::Function"}


def overrides(command: str) -> dict[str, str]:
    words = shlex.split(command)
    if "--parameter-overrides" not in words:
        return {}
    given = words[words.index("--parameter-overrides") + 1:]
    given = given[:next((i for i, w in enumerate(given) if w.startswith("--")), len(given))]
    assert all("=" in w for w in given), given
    return dict(w.split("=", 1) for w in given)


def test_the_region_is_exported_for_the_cli_and_for_sam_alike(cmds: list[str]) -> None:
    """AWS_REGION alone: the AWS CLI puts the SSM parameters and the secret in that
    region, and `sam deploy` (boto3 reads AWS_DEFAULT_REGION only) the stack in
    another, whose functions' references then resolve nothing."""
    first_aws = next(i for i, c in enumerate(cmds) if re.match(r"(\w+=\S+ )*(aws|sam|make) ", c)
                     or re.search(r"\$\((aws|sam) ", c))
    exports = [c for c in cmds[:first_aws] if c.startswith("export ")]
    assert exports, "export the region before the first command"
    values = dict(w.split("=", 1) for c in exports for w in shlex.split(c)[1:] if "=" in w)
    assert values.get("AWS_REGION") and values.get("AWS_DEFAULT_REGION") == values["AWS_REGION"]
    assert values.get("STAGE") == STAGE
    # No later command sets one of them without the other.
    for c in cmds:
        if re.search(r"\bAWS_(DEFAULT_)?REGION=", c):
            assert "AWS_REGION=" in c and "AWS_DEFAULT_REGION=" in c, c
    # ... and `make package` refuses to build with the two apart (test_package).


def test_every_parameter_override_is_a_parameter_and_the_deploys_are_private(
        cmds: list[str], template: dict[str, Any]) -> None:
    deploys = [c for c in cmds if c.startswith("sam deploy ")]
    assert len(deploys) == 2  # the first, and the one with the return page's address
    for c in deploys:
        given = overrides(c)
        assert set(given) <= set(template["Parameters"]), set(given) - set(template["Parameters"])
        # The production shape: the functions in the private subnets, beside the broker.
        assert given["SubnetIds"] == "$PRIV1,$PRIV2" and given["SecurityGroupIds"] == "$FN_SG"
        assert given["VpcId"] == "$VPC" and given["RouteTableIds"] == "$PRIVRT"
        assert given["InterfaceEndpoints"] in template["Parameters"]["InterfaceEndpoints"][
            "AllowedValues"]
        words = shlex.split(c)
        assert words[words.index("--stack-name") + 1] == "shop-pay-$STAGE"
        sam = stage(words[words.index("--template-file") + 1])
        assert REPO / sam == package.PROJECT_DIR / ".chalice" / "package" / STAGE / "sam.json"
        assert "CAPABILITY_IAM" in words
    # Both deploys pass the same parameters (the second adds the return page only).
    first, second = (overrides(c) for c in deploys)
    assert {k: v for k, v in second.items() if k != "AlipayReturnUrl"} == first
    assert second["AlipayReturnUrl"] == "${API}alipay/return"
    assert [c for c in cmds if c.startswith("make package")] == ["make package STAGE=$STAGE"]
    # Every parameter the prose names with a value is one.
    named = set(re.findall(r"`([A-Z][a-z]\w*)=[^`]*`", section()))
    assert {"InterfaceEndpoints", "AttentionEmail"} <= named <= set(template["Parameters"]), named


def test_every_output_read_is_an_output(cmds: list[str], template: dict[str, Any]) -> None:
    text = section()
    queried = set(re.findall(r"OutputKey=='(\w+)'", text))
    assert {"EndpointURL", "VpcMode"} <= queried
    prose = set(re.findall(r"[Oo]utput `(\w+)`", text)) | set(re.findall(r"`(\w+)` output", text))
    prose |= set(re.findall(r"`([A-Z][a-z]\w*(?:URL|Url|Arn|Name|Mode))`", text)) - {
        "AlipayReturnUrl"}
    assert queried | prose <= set(template["Outputs"]), (queried | prose) - set(
        template["Outputs"])
    assert {"AlipayNotifyFunctionUrl", "BillsBucketName", "VpcMode"} <= prose


def test_the_tables_and_functions_named_exist(cmds: list[str], template: dict[str, Any]) -> None:
    text = stage(section())
    tables = {v["Properties"]["TableName"] for v in template["Resources"].values()
              if v["Type"] == "AWS::DynamoDB::Table"}
    assert set(re.findall(r"\bshop-prod-[a-z]+\b", text)) <= tables
    names = {p["FunctionName"] for p in functions(template).values()}
    for c in cmds:
        words = shlex.split(stage(c))
        if "--function-name" in words:
            assert words[words.index("--function-name") + 1] in names, c
    # The fixed names the prose lists are the template's, all of them.
    (listed,) = re.findall(r"The functions have fixed names\s*\(([^)]*)\)", text)
    short = re.findall(r"`([\w-]+)`", listed)
    assert {n if n.startswith("shop-pay-") else f"shop-pay-{STAGE}{n}" for n in short} == names


def test_the_settings_and_the_secret_made_are_the_ones_the_template_uses(
        template: dict[str, Any]) -> None:
    text = section()
    blocks = shell_blocks(text)
    cmds = [stage(c) for b in blocks for c in commands(b)]
    put = {shlex.split(c)[shlex.split(c).index("--name") + 1]
           for c in cmds if c.startswith("aws ssm put-parameter")}
    template_text = json.dumps(template)
    resolved = set(re.findall(r"\{\{resolve:ssm:([^}]+)\}\}", template_text))
    assert put == resolved
    assert "{{resolve:secretsmanager" not in template_text
    (create,) = [c for c in cmds if c.startswith("aws secretsmanager create-secret")]
    words = shlex.split(create)
    secret = words[words.index("--name") + 1]
    ids = {p["Environment"]["Variables"].get("SECRET_ID") for p in functions(template).values()}
    assert ids == {secret} == {package.secret_name(STAGE)}
    # The secret's JSON: the heredoc that writes the file create-secret reads.
    assert words[words.index("--secret-string") + 1] == "file://secret.json"
    (body,) = [body for b in blocks for tag, body in heredocs(b) if "> secret.json" in b]
    keys = set(re.findall(r'^\s*"(\w+)":', body, re.M))
    assert keys == set(config.SECRET_KEYS.values())


def test_the_broker_is_private_and_lets_in_the_functions(cmds: list[str]) -> None:
    (create,) = [c for c in cmds if "aws mq create-broker" in c]
    words = shlex.split(create)
    assert "--no-publicly-accessible" in words and "--publicly-accessible" not in words
    subnets = words[words.index("--subnet-ids") + 1:]
    assert subnets[:2] == ["$PRIV1", "$PRIV2"]
    assert words[words.index("--security-groups") + 1] == "$MQ_SG"
    assert words[words.index("--engine-type") + 1] == "RABBITMQ"
    assert words[words.index("--deployment-mode") + 1] == "CLUSTER_MULTI_AZ"
    assert "--auto-minor-version-upgrade" in words  # RabbitMQ 3.13 and later want it
    rules = {(m.group(1), m.group(2), m.group(3)) for c in cmds for m in [re.search(
        r"authorize-security-group-ingress --group-id \$(\w+) --protocol tcp --port (\d+) "
        r"--source-group \$(\w+)", c)] if m}
    assert ("MQ_SG", "5671", "FN_SG") in rules
    assert not [r for r in rules if r[0] == "MQ_SG" and r[2] == "FN_SG" and r[1] != "5671"]
    # The trial path is named as such, in its own paragraph, after the production one.
    text = section()
    assert text.index("**Trial only") > text.index("**6. ")


def test_the_projects_own_commands_take_the_options_given(cmds: list[str]) -> None:
    """`python -m local ...` and `make ...` as the README runs them: the subcommand
    exists and takes every option given."""
    ran = [c for c in cmds if " -m local " in f" {c} "]
    assert ran
    for c in ran:
        words = shlex.split(c)
        sub = words[words.index("local") + 1]
        options = {w.split("=", 1)[0] for w in words if w.startswith("--")}
        shown = subprocess.run([sys.executable, "-m", "local", sub, "--help"], cwd=REPO,
                               capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0, (c, shown.stderr)
        assert all(o in shown.stdout for o in options), (c, options)
    makefile = (REPO / "Makefile").read_text()
    for c in cmds:
        if c.startswith("make "):
            assert re.search(rf"^{shlex.split(c)[1]}:", makefile, re.M), c


def test_every_variable_is_set_before_it_is_used(cmds: list[str]) -> None:
    """Pasted in order into one shell, no command meets an empty variable."""
    known = set(GIVEN)
    for c in cmds:
        if c.startswith("export "):
            known |= {w.split("=", 1)[0] for w in shlex.split(c)[1:]}
            continue
        read = re.match(r"read ((?:\w+ ?)+)<<<", c)
        used = set(re.findall(r"\$\{?(\w+)\}?", re.sub(r"'[^']*'", "", c)))
        prefix = set(re.findall(r"(?:^|\s)(\w+)=", c.split(" ", 1)[0] + " "))
        assert used - known - prefix == set(), (c, used - known - prefix)
        if read:
            known |= set(read.group(1).split())
        assigned = re.match(r"(\w+)=", c)
        if assigned and " " not in c.split("=", 1)[0]:
            known.add(assigned.group(1))


def test_the_workers_deploy_passes_the_worker_templates_parameters() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index(ECS_SECTION[0])
    ecs = text[start:text.index(ECS_SECTION[1], start)]
    (deploy,) = [c for b in shell_blocks(ecs) for c in commands(b)
                 if c.startswith("aws cloudformation deploy")]
    words = shlex.split(deploy)
    template = json.loads((REPO / words[words.index("--template-file") + 1]).read_text())
    given = overrides(deploy)
    params = template["Parameters"]
    assert set(given) <= set(params), set(given) - set(params)
    assert {k for k, v in params.items() if "Default" not in v} <= set(given)
