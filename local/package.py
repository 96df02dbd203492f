"""`python -m local.package --stage prod [--out DIR]` (`make package STAGE=prod`).

Runs `chalice package` (SAM/CloudFormation) with `.chalice/resources.json`
merged in: the DynamoDB tables with their keys and indexes, the function URL of
the Alipay notify function and its permissions, and the outputs. The merge
template says `@STAGE@` where the stage's name goes (table names and tags), so
that one file serves every stage and the names match `.chalice/config.json`
and `.chalice/policy-<stage>.json`.

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
from pathlib import Path
from typing import Any

PROJECT_DIR = Path(__file__).resolve().parent.parent
MERGE_TEMPLATE = PROJECT_DIR / ".chalice" / "resources.json"
STAGE_TOKEN = "@STAGE@"


def merge_template(stage: str) -> dict[str, Any]:
    text = MERGE_TEMPLATE.read_text(encoding="utf-8").replace(STAGE_TOKEN, stage)
    return json.loads(text)


def _chalice() -> str:
    beside = Path(sys.executable).with_name("chalice")
    return str(beside) if beside.exists() else (shutil.which("chalice") or "chalice")


def build(stage: str, out: Path) -> Path:
    """Writes sam.json and deployment.zip to `out` (emptied first); returns sam.json."""
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
        merge.write_text(json.dumps(merge_template(stage), indent=2))
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
    args = parser.parse_args(argv)
    out = args.out or PROJECT_DIR / ".chalice" / "package" / args.stage
    sam = build(args.stage, out)
    template = json.loads(sam.read_text())
    sys.stdout.write(f"{sam} ({len(template['Resources'])} resources) and "
                     f"{out / 'deployment.zip'}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
