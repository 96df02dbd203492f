"""`make package STAGE=prod`, checked offline: the SAM template chalice writes with
.chalice/resources.json merged in holds the tables (keys and indexes as the
pynamodb models declare them), the functions, the sweeper's and the
reconciler's schedules, the notify function URL, a least-privilege role per
function (its own log group; per table, the actions that function's code makes;
no `*` but the bills' prefix), each function's own settings and no other's (no
secret in the template, only references to SSM and Secrets Manager), the bills
bucket (private, only the reconciler writes bills), the alarms that page a person
on the attention list's metrics, and a template cfn-lint passes.

The build is the real one (local.package, as the Makefile runs it). The first
build on a machine downloads the Lambda wheels from PyPI; chalice caches them in
.chalice/deployments/ and later builds take about a second. Nothing talks to AWS.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

from chalicelib import config, metrics, reconcile
from local import package
from tests.conftest import MODELS

STAGE = "prod"
REPO = Path(__file__).resolve().parents[2]
# setting -> its key in the stage's secret (Secrets Manager); the others are in SSM.
SECRET_SETTINGS = {"JWT_SECRET": "JWT_SECRET", "RMQ_URL": "RMQ_PUBLISH_URL",
                   "ALIPAY_APP_PRIVATE_KEY": "ALIPAY_APP_PRIVATE_KEY"}
SSM_SETTINGS = ("ALIPAY_APP_ID", "ALIPAY_SELLER_ID", "ALIPAY_GATEWAY", "ALIPAY_PUBLIC_KEY")
FUNCTIONS = {  # logical id -> handler
    "APIHandler": "app.app",
    "JwtAuth": "app.jwt_auth",
    "Sweeper": "app.sweeper",
    "Reconciler": "app.reconciler",
    "AlipayNotifyUrl": "app.alipay_notify_url",
    "RelayEvents": "app.relay_events",
}
ROLES = {"APIHandler": "api", "JwtAuth": "authorizer", "Sweeper": "sweeper",
         "Reconciler": "reconciler", "AlipayNotifyUrl": "notify", "RelayEvents": "relay"}
FUNCTION_NAMES = {"APIHandler": f"shop-pay-{STAGE}", "JwtAuth": f"shop-pay-{STAGE}-jwt_auth",
                  "Sweeper": f"shop-pay-{STAGE}-sweeper",
                  "Reconciler": f"shop-pay-{STAGE}-reconciler",
                  "AlipayNotifyUrl": f"shop-pay-{STAGE}-alipay_notify_url",
                  "RelayEvents": f"shop-pay-{STAGE}-relay_events"}
# The stage's bills bucket: one name per account and region (S3's names are global).
BILLS_BUCKET = f"shop-pay-{STAGE}-bills-${{AWS::AccountId}}-${{AWS::Region}}"


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
    # The reconciler: a round every ten minutes; a big day's bill (200,000 rows,
    # downloaded, kept, matched through SQLite) gets Lambda's longest run.
    reconciler = functions["Reconciler"]["Properties"]
    assert [e["Properties"]["Schedule"] for e in reconciler["Events"].values()] == [
        "rate(10 minutes)"]
    assert (reconciler["Timeout"], reconciler["MemorySize"]) == (900, 512)
    # A run that dies with its function leaves its day's lease to run out, never a
    # live run's lease expiring under it.
    assert reconciler["Timeout"] < reconcile.LEASE_SECONDS
    assert functions["APIHandler"]["Properties"]["Timeout"] == 30
    assert "RestAPI" in template["Resources"]
    assert (out / "deployment.zip").stat().st_size > 1_000_000


def test_the_relay_reads_the_outbox_tables_stream(built: Any) -> None:
    """Each new order event reaches the relay at once: the outbox table streams its
    keys, and the relay function's event source is that stream (the ARN merged in
    over app.py's stand-in, never the stand-in itself)."""
    template, text, _ = built
    outbox = template["Resources"]["OutboxTable"]["Properties"]
    assert outbox["StreamSpecification"] == {"StreamViewType": "KEYS_ONLY"}
    (source,) = template["Resources"]["RelayEvents"]["Properties"]["Events"].values()
    assert source["Type"] == "DynamoDB"
    assert source["Properties"]["Stream"] == {"Fn::GetAtt": ["OutboxTable", "StreamArn"]}
    assert source["Properties"]["StartingPosition"] == "LATEST"
    assert "@OUTBOX_STREAM_ARN@" not in text


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
        assert table["DeletionPolicy"] == table["UpdateReplacePolicy"] == "Retain"
        assert props["BillingMode"] == "PAY_PER_REQUEST"
        assert props["PointInTimeRecoverySpecification"] == {"PointInTimeRecoveryEnabled": True}
        assert props["SSESpecification"] == {"SSEEnabled": True}
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
    """The settings each function builds from its environment name exactly the
    template's tables (every one, the refunds' and the timeline's too), each by
    its own variable in .chalice/config.json."""
    template, _, _ = built
    names = {t["Properties"]["TableName"]
             for t in resources(template, "AWS::DynamoDB::Table").values()}
    for fn in FUNCTIONS:
        env = function_env(template, fn)
        assert env["STAGE"] == STAGE
        settings = config.load({k: v for k, v in env.items() if isinstance(v, str)})
        tables = vars(settings.tables)
        assert set(tables.values()) == names, fn
        for field, name in tables.items():
            assert env[f"{field.upper()}_TABLE"] == name, (fn, field)


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
    assert "ALIPAY_NOTIFY_URL" not in function_env(template, "AlipayNotifyUrl")


def _arn(value: Any) -> Any:
    return value["Fn::Sub"] if isinstance(value, dict) and "Fn::Sub" in value else value


def _listed(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def role_of(template: dict[str, Any], function: str) -> dict[str, Any]:
    (role_id, _) = template["Resources"][function]["Properties"]["Role"]["Fn::GetAtt"]
    return template["Resources"][role_id]


def test_policy_is_least_privilege(built: Any) -> None:
    """The pure check `make package` runs (unit-tested on planted `*`s and secrets in
    tests/unit/test_template_policy.py) finds nothing; each function has a role of
    its own, with its own log group (made by the template: no logs:CreateLogGroup)
    and DynamoDB ARNs in this account and region."""
    template, _, _ = built
    assert package.policy_problems(template) == []
    # The same check on this template with a `*` and a secret planted: both named.
    planted = copy.deepcopy(template)
    (notify_policy,) = role_of(planted, "AlipayNotifyUrl")["Properties"]["Policies"]
    notify_policy["PolicyDocument"]["Statement"][1]["Action"] = ["dynamodb:*"]
    function_env(planted, "AlipayNotifyUrl")["JWT_SECRET"] = function_env(
        template, "JwtAuth")["JWT_SECRET"]
    assert package.policy_problems(planted) == [
        "AlipayNotifyUrl (notify) is given JWT_SECRET, which it does not use",
        "AlipayNotifyUrl (notify): wildcard action 'dynamodb:*'"]
    functions = resources(template, "AWS::Serverless::Function")
    role_ids = {f["Properties"]["Role"]["Fn::GetAtt"][0] for f in functions.values()}
    assert len(role_ids) == len(functions) == len(resources(template, "AWS::IAM::Role"))
    arn = r"arn:\$\{AWS::Partition\}:%s:\$\{AWS::Region\}:\$\{AWS::AccountId\}:%s"
    for fn, props in ((k, v["Properties"]) for k, v in functions.items()):
        assert props["FunctionName"] == FUNCTION_NAMES[fn]
        group = template["Resources"][f"{fn}LogGroup"]
        assert group["Properties"]["LogGroupName"] == f"/aws/lambda/{FUNCTION_NAMES[fn]}"
        assert functions[fn]["DependsOn"] == [f"{fn}LogGroup"]
        (policy,) = role_of(template, fn)["Properties"]["Policies"]
        logs, *tables = policy["PolicyDocument"]["Statement"]
        assert logs["Action"] == ["logs:CreateLogStream", "logs:PutLogEvents"], fn
        own = re.escape(f"log-group:{group['Properties']['LogGroupName']}") + r":\*"
        assert re.fullmatch(arn % ("logs", own), _arn(logs["Resource"])), fn
        # The bills' statement: test_only_the_reconciler_writes_bills. The outbox's
        # stream is named by the table's own StreamArn.
        tables = [st for st in tables if st.get("Sid") != "KeepBills"]
        for st in [st for st in tables if st.get("Sid") == "OutboxStream"]:
            assert fn == "RelayEvents" and st["Resource"] == {
                "Fn::GetAtt": ["OutboxTable", "StreamArn"]}
        tables = [st for st in tables if st.get("Sid") != "OutboxStream"]
        for st in tables:
            assert all(a.startswith("dynamodb:") for a in _listed(st["Action"])), fn
            assert all(re.fullmatch(arn % ("dynamodb", rf"table/shop-{STAGE}-[\w./-]+"), _arn(r))
                       for r in _listed(st["Resource"])), fn


# What each function may do on each table: what its code calls through the store,
# nothing more. No TransactWriteItems: IAM checks each action of a transaction as
# PutItem, UpdateItem, DeleteItem or ConditionCheckItem on its own table. Left out
# on purpose: CreateTable/DescribeTable of create_tables (local and tests only) and
# PutItem on goods and sales (put_goods/put_sale: only the seed writes the
# catalogue, with the deployer's credentials, README "Deploy to AWS" step 5).
# The API (every route, its own /alipay/notify among them; the worker's task role
# takes the same statements):
TABLE_ACTIONS = {
    "goods": {"BatchGetItem", "Scan", "UpdateItem"},  # get_goods, list_goods, stock -/+ n
    "carts": {"Query", "PutItem", "UpdateItem", "DeleteItem"},
    # DescribeTable: ping; BatchGetItem: the worker's events sweep reads its batch's orders
    "orders": {"BatchGetItem", "DescribeTable", "GetItem", "PutItem", "UpdateItem"},
    # get_sale, list_sales, stock -/+ 1; BatchGetItem: a sharded sale's stock items
    "sales": {"BatchGetItem", "GetItem", "Scan", "UpdateItem"},
    "seckill": {"GetItem", "PutItem", "UpdateItem", "DeleteItem"},  # tickets, claims
    "refunds": {"GetItem", "PutItem", "UpdateItem"},
    "timeline": {"Query", "PutItem"},
    # reports and their differences (GET), resolve (UpdateItem), an operator's request
    # of a day (UpdateItem, or PutItem of its first report); the two indexes list
    # the days and the open differences. Never a run's own writes (below).
    "reconciliations": {"GetItem", "PutItem", "UpdateItem", "Query"},
    # every change's event (PutItem, in its transaction); the worker's relay reads
    # an order's unsent events (Query, GetItem) and marks them (UpdateItem; its
    # sweep, a batch at a time: BatchWriteItem)
    "outbox": {"GetItem", "PutItem", "UpdateItem", "Query", "BatchWriteItem"},
    # subscriptions (operators), deliveries and their attempts (the worker)
    "webhooks": {"GetItem", "PutItem", "UpdateItem"},
}
# What only a run of a day reads: the day's payments and refunds. The API never
# runs a day on AWS (RECONCILE_INLINE is the local stack's; local.package refuses
# it in a deployed function), so neither these nor a run's BatchWriteItem and
# DeleteItem on reconciliations, nor the bills bucket, are the API's.
RUN_ONLY_INDEXES = {"orders/index/paid-by-day", "refunds/index/succeeded-by-day"}
ROLE_ACTIONS: dict[str, dict[str, set[str]]] = {
    "APIHandler": TABLE_ACTIONS,  # and Query on every index (below)
    "JwtAuth": {},  # verifies a token: no table
    # handlers.on_notify: get_order, get_refund, the timeline's event; then publishes.
    "AlipayNotifyUrl": {"orders": {"GetItem"}, "refunds": {"GetItem"},
                        "timeline": {"PutItem"}},
    # handlers.sweep and admin.attention: the due/recheck/open/paid-but-closed
    # indexes; close_order (stock back to goods or the sale), mark_paid,
    # mark_paid_but_closed, clear_recheck, reserve_refund/settle_refund; the timeline.
    "Sweeper": {
        "goods": {"UpdateItem"}, "sales": {"UpdateItem"},
        "orders": {"GetItem", "UpdateItem"},
        "refunds": {"GetItem", "PutItem", "UpdateItem"},
        "timeline": {"PutItem"},
        "outbox": {"PutItem"},  # the events of what it closes, marks paid, refunds
        "orders/index/unpaid-by-check-time": {"Query"}, "orders/index/recheck-by-time": {"Query"},
        "orders/index/paid-but-closed": {"Query"}, "refunds/index/open-by-time": {"Query"},
        # admin.attention's open differences, failed days, parked events and
        # failed deliveries, for the metrics
        "reconciliations/index/open-by-day": {"Query"},
        "outbox/index/parked": {"Query"}, "webhooks/index/failed-deliveries": {"Query"},
    },
    # reconcile.run_scheduled: the days asked for and the failed ones (open-by-day),
    # a day's reports (get, put with a lease, query), its differences and extras
    # (batch_write, delete of stale ones), the day's payments and refunds (the two
    # by-day indexes), the orders and refunds a row names (GetItem); a payment for
    # a closed order goes back as the sweeper's do (mark_paid_but_closed,
    # reserve_refund/settle_refund, the timeline). Not reports-by-day: only the
    # API lists the days.
    "Reconciler": {
        "orders": {"GetItem", "UpdateItem"},
        "refunds": {"GetItem", "PutItem", "UpdateItem"},
        "timeline": {"PutItem"},
        "reconciliations": {"GetItem", "PutItem", "UpdateItem", "DeleteItem",
                            "BatchWriteItem", "Query"},
        "outbox": {"PutItem"},  # a late payment's refund writes its events
        "orders/index/paid-by-day": {"Query"}, "refunds/index/succeeded-by-day": {"Query"},
        "reconciliations/index/open-by-day": {"Query"},
    },
    # events.relay_stream_records: an order's unsent events (Query) and the order
    # (GetItem), each marked sent (UpdateItem) or counted as failed (GetItem,
    # UpdateItem); the outbox's stream, by its ARN (no wildcard).
    "RelayEvents": {
        "orders": {"GetItem"},
        "outbox": {"GetItem", "UpdateItem", "Query"},
        "outbox/stream": {"DescribeStream", "GetRecords", "GetShardIterator", "ListStreams"},
    },
}
# The actions a reader sees in the store's source, per table: each must be in the
# policy, and the policy grants none of these the code does not make.
SEEN_IN_SOURCE = ("Scan", "BatchGetItem", "BatchWriteItem", "DeleteItem",
                  "ConditionCheckItem", "DescribeTable", "Query")


def _policy_grants(statements: list[dict[str, Any]]) -> dict[str, set[str]]:
    """resource after `:table/` -> the dynamodb actions granted on it (the outbox's
    stream, named by the template's own StreamArn: `outbox/stream`)."""
    grants: dict[str, set[str]] = {}
    for st in statements:
        actions = _listed(st["Action"])
        for r in map(_arn, _listed(st["Resource"])):
            if r == {"Fn::GetAtt": ["OutboxTable", "StreamArn"]}:
                r = f"x:dynamodb:x:table/shop-{STAGE}-outbox/stream"
            if ":dynamodb:" in r:
                grants.setdefault(r.split(":table/")[1], set()).update(
                    a.removeprefix("dynamodb:") for a in actions)
    return grants


def _store_calls() -> set[tuple[str, str]]:
    """(action, table suffix or suffix/index/name) of the calls chalicelib/store/*.py
    visibly makes on the models: scans, batch reads and writes, queries (of a table
    or of an index), deletes, condition checks, describe_table. Every occurrence of
    those methods must be one of the forms understood here, so none goes unseen."""
    prefix = f"shop-{config.get().stage}-"
    fields = {f: getattr(MODELS, f) for f in vars(MODELS) if getattr(MODELS, f) in MODELS.all}
    suffix = {f: m.Meta.table_name.removeprefix(prefix) for f, m in fields.items()}
    calls: set[tuple[str, str]] = set()
    for path in sorted((REPO / "chalicelib" / "store").glob("*.py")):
        src = path.read_text().replace("self.models.", "m.")
        for alias, field in set(re.findall(r"^\s*(\w+) = m\.(\w+)\s*$", src, re.M)):
            src = re.sub(rf"\b{alias}(?=[.(])", f"m.{field}", src)
        forms = {
            "Scan": (r"\.scan\(", [r"\bm\.(\w+)\.scan\("]),
            "BatchGetItem": (r"\.batch_get\(", [r"\bm\.(\w+)\.batch_get\("]),
            "BatchWriteItem": (r"\bbatch_write\(", [r"\bm\.(\w+)\.batch_write\("]),
            "DescribeTable": (r"\.describe_table\(", [r"\bm\.(\w+)\.describe_table\("]),
            "ConditionCheckItem": (r"\.condition_check\(",
                                   [r"\btx\.condition_check\(\s*m\.(\w+)\("]),
            "DeleteItem": (r"\.delete\(", [r"\bm\.(\w+)\([^()]*\)\.delete\(",
                                             r"\btx\.delete\(\s*m\.(\w+)\("]),
        }
        for action, (any_form, known) in forms.items():
            found = [f for form in known for f in re.findall(form, src)]
            assert len(found) == len(re.findall(any_form, src)), (
                f"{path.name}: a {action} call this test cannot place; name the model "
                f"as m.<Model> there")
            calls |= {(action, suffix[f]) for f in found}
        table_queries = re.findall(r"\bm\.(\w+)\.query\(", src)
        index_queries = re.findall(r"\bm\.(\w+)\.(\w+)\.query\(", src)
        # the table's own (low-level) query of an index, its index_name first
        raw_index_queries = re.findall(
            r"\bm\.(\w+)\._get_connection\(\)\.query\(\s*index_name=\"([\w-]+)\"", src)
        assert len(table_queries) + len(index_queries) + len(raw_index_queries) == len(
            re.findall(r"\.query\(", src)), (
            f"{path.name}: a query this test cannot place; name the model as m.<Model>")
        calls |= {("Query", suffix[f]) for f in table_queries}
        calls |= {("Query", f"{suffix[f]}/index/{getattr(fields[f], attr).Meta.index_name}")
                  for f, attr in index_queries}
        calls |= {("Query", f"{suffix[f]}/index/{name}") for f, name in raw_index_queries}
    return calls


def test_policy_grants_each_table_only_what_the_store_calls(built: Any) -> None:
    template, _, _ = built
    indexes = {f"{t['Properties']['TableName'].removeprefix(f'shop-{STAGE}-')}/index/"
               f"{i['IndexName']}"
               for t in resources(template, "AWS::DynamoDB::Table").values()
               for i in t["Properties"].get("GlobalSecondaryIndexes", [])}
    wants = {**ROLE_ACTIONS, "APIHandler": {**TABLE_ACTIONS, **{
        i: {"Query"} for i in indexes - RUN_ONLY_INDEXES}}}
    assert RUN_ONLY_INDEXES <= indexes
    assert set(TABLE_ACTIONS) == set(_model_tables())
    assert set(wants) == set(FUNCTIONS)
    for fn, want in wants.items():
        (policy,) = role_of(template, fn)["Properties"]["Policies"]
        grants = _policy_grants(policy["PolicyDocument"]["Statement"])
        got = {r.removeprefix(f"shop-{STAGE}-"): a for r, a in grants.items()}
        assert got == want, fn
    # Cross-checked against the source: what it visibly calls is granted (to the API,
    # which serves every route, but a day's run, which only the reconciler makes), and
    # of those kinds of calls nothing is granted to any function that the store never
    # makes.
    calls = _store_calls()
    assert {("Scan", "goods"), ("Query", "orders/index/unpaid-by-check-time"),
            ("DeleteItem", "carts"), ("DescribeTable", "orders")} <= calls  # the parser works
    granted = {(a, r) for r, acts in wants["APIHandler"].items() for a in acts}
    assert calls - granted == {("Query", i) for i in RUN_ONLY_INDEXES} | {
        ("BatchWriteItem", "reconciliations"), ("DeleteItem", "reconciliations")}, (
        "the store calls what the policy does not grant")
    reconciler = {(a, r) for r, acts in wants["Reconciler"].items() for a in acts}
    assert calls - granted <= reconciler
    for fn, want in wants.items():
        assert {(a, r) for r, acts in want.items() for a in acts
                if a in SEEN_IN_SOURCE} - calls == set(), (fn, "grants what the store never calls")
    # Only the API lists goods and sales (the code's only scans).
    assert {fn for fn, want in wants.items() for acts in want.values() if "Scan" in acts} == {
        "APIHandler"}


POLICY_FILES = ("", "-authorizer", "-notify", "-sweeper", "-reconciler", "-relay")


def test_the_stages_policies_differ_only_in_the_stage() -> None:
    stages = json.loads((REPO / ".chalice" / "config.json").read_text())["stages"]
    for suffix in POLICY_FILES:
        dev = (REPO / ".chalice" / f"policy-dev{suffix}.json").read_text()
        prod = (REPO / ".chalice" / f"policy-prod{suffix}.json").read_text()
        assert dev.replace("shop-dev-", "shop-prod-").replace("shop-pay-dev", "shop-pay-prod") == (
            prod), suffix
    for stage in ("dev", "prod"):
        env = stages[stage]["environment_variables"]
        tables = vars(config.load({**env, "STAGE": stage}).tables)
        assert {env[f"{f.upper()}_TABLE"] for f in tables} == {
            f"shop-{stage}-{s}" for s in TABLE_ACTIONS}, stage
        named = {f.get("iam_policy_file") for f in stages[stage]["lambda_functions"].values()}
        assert named == {None} | {f"policy-{stage}{s}.json" for s in POLICY_FILES[1:]}, stage
        assert stages[stage]["iam_policy_file"] == f"policy-{stage}.json"  # the API's


def test_the_template_passes_cfn_lint(built: Any) -> None:
    """Every rule on, warnings failing too: the template needs no exception. Should
    chalice's own output ever trip a rule, ignore that rule by name here
    (`--ignore-checks`), with the reason, rather than warnings wholesale."""
    _, _, out = built
    lint = Path(sys.executable).with_name("cfn-lint")
    assert lint.exists(), "cfn-lint is in requirements-dev.txt: make test installs it"
    result = subprocess.run([str(lint), "--format", "parseable", str(out / "sam.json")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_notify_function_has_reserved_concurrency(built: Any) -> None:
    """The notify URL is public and unauthenticated: a flood of forged notifies takes
    at most these executions (the API keeps the rest of the account's pool), and
    each warm one holds one broker connection. Alipay retries whatever is not
    `success`, a throttled notify (429) included, so the cap loses no payment."""
    template, _, _ = built
    props = template["Resources"]["AlipayNotifyUrl"]["Properties"]
    assert props["ReservedConcurrentExecutions"] == 10
    # The reconciler, one at a time: a round that outlives ten minutes is not joined
    # by the next (a day's lease would turn it away anyway, after its own queries).
    assert template["Resources"]["Reconciler"]["Properties"][
        "ReservedConcurrentExecutions"] == 1
    others = [k for k, v in resources(template, "AWS::Serverless::Function").items()
              if "ReservedConcurrentExecutions" in v["Properties"]]
    assert sorted(others) == ["AlipayNotifyUrl", "Reconciler"]


def test_each_attention_metric_has_an_alarm_that_notifies_the_topic(built: Any) -> None:
    """chalicelib/metrics.py writes the metrics (namespace ShopPay, dimension Stage =
    the STAGE the functions run with); an alarm on each pages through AttentionTopic."""
    template, _, _ = built
    (topic_id,) = resources(template, "AWS::SNS::Topic")
    assert topic_id == "AttentionTopic"
    stage = function_env(template, "Sweeper")["STAGE"]
    emitted = metrics.emf_record(dict.fromkeys(metrics.METRICS, 0), stage=stage)
    (directive,) = emitted["_aws"]["CloudWatchMetrics"]
    alarms = {a["Properties"]["MetricName"]: a["Properties"]
              for a in resources(template, "AWS::CloudWatch::Alarm").values()}
    assert set(alarms) == set(metrics.METRICS) == {m["Name"] for m in directive["Metrics"]}
    assert len(resources(template, "AWS::CloudWatch::Alarm")) == len(alarms)
    for metric, alarm in alarms.items():
        assert alarm["Namespace"] == directive["Namespace"] == "ShopPay", metric
        assert directive["Dimensions"] == [["Stage"]]
        assert alarm["Dimensions"] == [{"Name": "Stage", "Value": emitted["Stage"]}], metric
        assert emitted["Stage"] == STAGE
        assert (alarm["ComparisonOperator"], alarm["Threshold"]) == ("GreaterThanThreshold", 0)
        assert alarm["Statistic"] == "Maximum" and alarm["Period"] == 300
        assert alarm["EvaluationPeriods"] == alarm["DatapointsToAlarm"] == 1
        assert alarm["TreatMissingData"] == "notBreaching", metric
        assert alarm["AlarmActions"] == alarm["OKActions"] == [{"Ref": topic_id}], metric
        assert alarm["AlarmName"].startswith(f"shop-pay-{STAGE}-") and alarm["AlarmDescription"]
    # People subscribe: an optional email parameter, and the topic's ARN as an output.
    param = template["Parameters"]["AttentionEmail"]
    assert param["Type"] == "String" and param["Default"] == ""
    assert re.fullmatch(param["AllowedPattern"], "") and re.fullmatch(
        param["AllowedPattern"], "oncall@example.com")
    (sub,) = resources(template, "AWS::SNS::Subscription").values()
    assert sub["Condition"] == "HasAttentionEmail"
    assert template["Conditions"]["HasAttentionEmail"] == {
        "Fn::Not": [{"Fn::Equals": [{"Ref": "AttentionEmail"}, ""]}]}
    assert sub["Properties"] == {"TopicArn": {"Ref": topic_id}, "Protocol": "email",
                                 "Endpoint": {"Ref": "AttentionEmail"}}
    assert template["Outputs"]["AttentionTopicArn"]["Value"] == {"Ref": topic_id}


def test_indexes_can_be_left_out_for_a_table_that_exists_already() -> None:
    """An existing table takes one new index per deployment; `--without-index`
    builds the steps (their key attributes go too, or CloudFormation refuses)."""
    full = package.merge_template(STAGE)["Resources"]["OrdersTable"]["Properties"]
    step = package.merge_template(STAGE, ["by-trade", "recheck-by-time", "paid-but-closed"])
    props = step["Resources"]["OrdersTable"]["Properties"]
    assert [i["IndexName"] for i in props["GlobalSecondaryIndexes"]] == [
        i["IndexName"] for i in full["GlobalSecondaryIndexes"]
        if i["IndexName"] not in ("by-trade", "recheck-by-time", "paid-but-closed")]
    used = {k["AttributeName"] for k in props["KeySchema"]} | {
        k["AttributeName"] for i in props["GlobalSecondaryIndexes"] for k in i["KeySchema"]}
    assert {a["AttributeName"] for a in props["AttributeDefinitions"]} == used
    assert "transaction_id" not in used and "status" in used
    # The reconciliation's two indexes on tables that exist: one each, in one step.
    step = package.merge_template(STAGE, ["paid-by-day", "succeeded-by-day"])["Resources"]
    for table, attribute in (("OrdersTable", "pay_day"), ("RefundsTable", "finish_day")):
        props = step[table]["Properties"]
        assert attribute not in {a["AttributeName"] for a in props["AttributeDefinitions"]}
        assert len(props["GlobalSecondaryIndexes"]) == len(
            package.merge_template(STAGE)["Resources"][table]["Properties"][
                "GlobalSecondaryIndexes"]) - 1
    refunds = package.merge_template(STAGE, ["by-order", "open-by-time", "succeeded-by-day"]
                                     )["Resources"]
    assert "GlobalSecondaryIndexes" not in refunds["RefundsTable"]["Properties"]
    assert refunds["RefundsTable"]["Properties"]["AttributeDefinitions"] == [
        {"AttributeName": "id", "AttributeType": "S"}]
    with pytest.raises(SystemExit, match="no index by-nothing"):
        package.merge_template(STAGE, ["by-nothing"])


def test_settings_come_from_ssm_and_secrets_manager(built: Any) -> None:
    """Each function gets exactly the settings its role checks for at start
    (config.ROLE_NEEDS), each a reference resolved when the stack is deployed, and
    starts with them: the notify function with Alipay's public key, ids and the
    publish-only broker user; the authorizer with the JWT secret only."""
    template, _, _ = built
    guarded = (*SECRET_SETTINGS, *SSM_SETTINGS, "RMQ_WORKER_URL", "BILLS_BUCKET")
    for fn, role in ROLES.items():
        env = function_env(template, fn)
        assert env["FUNCTION_ROLE"] == role
        assert {k for k in env if k in guarded} == set(config.ROLE_NEEDS[role]), fn
        for key, secret_key in SECRET_SETTINGS.items():
            if key in env:
                assert re.fullmatch(rf"\{{\{{resolve:secretsmanager:shop-pay/{STAGE}:"
                                    rf"SecretString:{secret_key}\}}\}}", env[key]), (fn, key)
        for key in SSM_SETTINGS:
            if key in env:
                assert re.fullmatch(rf"\{{\{{resolve:ssm:/shop-pay/{STAGE}/[a-z-]+\}}\}}",
                                    env[key]), (fn, key)
        # As deployed: the references stand for values; the function starts with them.
        resolved = {k: v if not isinstance(v, str) or "{{resolve:" not in v else
                    (SECRET if k == "JWT_SECRET" else "resolved")
                    for k, v in env.items()}
        if "BILLS_BUCKET" in env:  # the template's own bucket, named when it is made
            assert env["BILLS_BUCKET"] == {"Ref": "BillsBucket"}, fn
            resolved["BILLS_BUCKET"] = "shop-pay-prod-bills-123456789012-us-east-1"
        resolved = {k: v for k, v in resolved.items() if isinstance(v, str)}
        config.check(config.load({**resolved, "AWS_LAMBDA_FUNCTION_NAME": FUNCTION_NAMES[fn]}))
    assert set(config.ROLE_NEEDS["notify"]) == {
        "ALIPAY_PUBLIC_KEY", "ALIPAY_APP_ID", "ALIPAY_SELLER_ID", "RMQ_URL"}
    assert config.ROLE_NEEDS["authorizer"] == ("JWT_SECRET",)


SECRET = "x" * 48  # what Secrets Manager would hand the authorizer


def test_the_bills_bucket_is_private_and_only_the_reconciler_writes_bills(built: Any) -> None:
    """The raw bills are the evidence behind every difference: kept (versioned, never
    deleted with the stack), encrypted, unreachable from the internet and over
    plain HTTP, and written by the reconciler alone, under bills/ alone.

    Not the API, though RECONCILE_INLINE=1 would have it run a day: the public
    edge should not be able to plant a bill, and on AWS a big day outlives API
    Gateway's 29 s anyway. `make package` refuses RECONCILE_INLINE in a deployed
    function, so no function runs a day without this grant."""
    template, _, _ = built
    (bucket_id, bucket), = resources(template, "AWS::S3::Bucket").items()
    props = bucket["Properties"]
    assert bucket["DeletionPolicy"] == bucket["UpdateReplacePolicy"] == "Retain"
    assert props["BucketName"] == {"Fn::Sub": BILLS_BUCKET}
    assert props["VersioningConfiguration"] == {"Status": "Enabled"}
    (sse,) = props["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    assert sse["ServerSideEncryptionByDefault"] == {"SSEAlgorithm": "AES256"}
    assert props["PublicAccessBlockConfiguration"] == {
        "BlockPublicAcls": True, "BlockPublicPolicy": True, "IgnorePublicAcls": True,
        "RestrictPublicBuckets": True}
    assert props["OwnershipControls"] == {"Rules": [{"ObjectOwnership": "BucketOwnerEnforced"}]}
    (policy,) = resources(template, "AWS::S3::BucketPolicy").values()
    assert policy["Properties"]["Bucket"] == {"Ref": bucket_id}
    (deny,) = policy["Properties"]["PolicyDocument"]["Statement"]
    assert (deny["Effect"], deny["Principal"], deny["Action"]) == ("Deny", "*", "s3:*")
    assert deny["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    assert deny["Resource"] == [{"Fn::GetAtt": [bucket_id, "Arn"]},
                                {"Fn::Sub": f"${{{bucket_id}.Arn}}/*"}]
    # Who may touch S3 at all: the reconciler, PutObject under bills/ of this bucket.
    s3 = {}
    for fn in FUNCTIONS:
        (role_policy,) = role_of(template, fn)["Properties"]["Policies"]
        for st in _listed(role_policy["PolicyDocument"]["Statement"]):
            if any(a.startswith("s3:") for a in _listed(st["Action"])) or any(
                    ":s3:" in _arn(r) for r in _listed(st["Resource"])):
                s3.setdefault(fn, []).append(st)
    assert list(s3) == ["Reconciler"]
    (put,) = s3["Reconciler"]
    assert (put["Effect"], put["Action"]) == ("Allow", ["s3:PutObject"])
    assert put["Resource"] == {"Fn::Sub": f"arn:${{AWS::Partition}}:s3:::{BILLS_BUCKET}/bills/*"}
    # ... and it is told that bucket; no other function is given one.
    assert function_env(template, "Reconciler")["BILLS_BUCKET"] == {"Ref": bucket_id}
    assert [fn for fn in FUNCTIONS if "BILLS_BUCKET" in function_env(template, fn)] == [
        "Reconciler"]
    assert template["Outputs"]["BillsBucketName"]["Value"] == {"Ref": bucket_id}
    # No deployed function runs a day inside itself (the default off the local stages).
    for fn in FUNCTIONS:
        env = function_env(template, fn)
        assert config.load({k: v for k, v in env.items() if isinstance(v, str)}
                           ).reconcile_inline is False, fn
    planted = copy.deepcopy(template)
    function_env(planted, "APIHandler")["RECONCILE_INLINE"] = "1"
    assert package.policy_problems(planted) == [
        "APIHandler (api) has RECONCILE_INLINE set: on AWS only the reconciler function "
        "runs a day (the others may not write it)"]


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
