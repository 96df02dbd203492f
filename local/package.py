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

Nothing here talks to AWS. Building the deployment zip downloads the Lambda
(manylinux) wheels of requirements.txt from PyPI the first time; chalice keeps
them in `.chalice/deployments/` for the next runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

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
    sys.stdout.write(f"{sam} ({len(template['Resources'])} resources) and "
                     f"{out / 'deployment.zip'}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
