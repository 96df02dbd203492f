"""`make package STAGE=prod`, checked offline: the SAM template chalice writes with
.chalice/resources.json merged in holds the tables (keys and indexes as the
pynamodb models declare them), the functions, the sweeper's and the
reconciler's schedules, the notify function URL, a least-privilege role per
function (its own log group; per table, the actions that function's code makes;
the stage's secret; no `*` but the bills' prefix and, in VPC mode only, the ENI
actions), each function's own settings and no other's (no secret in the
template nor in any function's environment: SSM references, and SECRET_ID, the
name of the stage's secret the function reads at run time), the VPC mode
(parameters, a VpcConfig on every function, the endpoints), the tables, bucket
and log groups kept but on a failed first create, the 401 inside the API's own
GatewayResponses, each timeout above its role's outbound chain, the broker
connection budget (reserved concurrency on every function that publishes), the
bills bucket (private, only the reconciler writes bills), the alarms that page a
person on the attention list's metrics, and a template cfn-lint passes.

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
# setting -> its key in the stage's secret (Secrets Manager), read at run time from
# SECRET_ID; the others are SSM references resolved at deploy time.
SECRET_SETTINGS = {"JWT_SECRET": "JWT_SECRET", "RMQ_URL": "RMQ_PUBLISH_URL",
                   "ALIPAY_APP_PRIVATE_KEY": "ALIPAY_APP_PRIVATE_KEY"}
SECRET_NAME = f"shop-pay/{STAGE}"
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
        assert fn["Properties"]["Runtime"] == package.LAMBDA_RUNTIME
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
    assert functions["APIHandler"]["Properties"]["Timeout"] == 29
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
        assert table["DeletionPolicy"] == "RetainExceptOnCreate"
        assert table["UpdateReplacePolicy"] == "Retain"
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


def plain_statements(policy: dict[str, Any]) -> list[dict[str, Any]]:
    """The policy's statements but the VPC mode's (under `Fn::If`, test_the_vpc_mode)."""
    return [st for st in _listed(policy["PolicyDocument"]["Statement"]) if "Fn::If" not in st]


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
    function_env(planted, "AlipayNotifyUrl")["JWT_SECRET"] = (
        f"{{{{resolve:secretsmanager:{SECRET_NAME}:SecretString:JWT_SECRET}}}}")
    assert package.policy_problems(planted) == [
        "AlipayNotifyUrl: JWT_SECRET resolves a Secrets Manager value into the function's "
        "environment (readable with lambda:GetFunctionConfiguration, stale after a rotation)",
        "AlipayNotifyUrl (notify) has JWT_SECRET in its environment: a secret is read at run "
        "time from SECRET_ID",
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
        logs, *tables = plain_statements(policy)
        assert logs["Action"] == ["logs:CreateLogStream", "logs:PutLogEvents"], fn
        own = re.escape(f"log-group:{group['Properties']['LogGroupName']}") + r":\*"
        assert re.fullmatch(arn % ("logs", own), _arn(logs["Resource"])), fn
        # The bills' statement: test_only_the_reconciler_writes_bills. The outbox's
        # stream is named by the table's own StreamArn.
        tables = [st for st in tables if st.get("Sid") not in ("KeepBills", "StageSecret")]
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
        if "Fn::If" in st:  # the VPC mode's ENI actions (test_the_vpc_mode)
            continue
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
        assert dev.replace("shop-dev-", "shop-prod-").replace("shop-pay-dev", "shop-pay-prod"
                                                              ).replace("shop-pay/dev-",
                                                                        "shop-pay/prod-") == (
            prod), suffix
    for stage in ("dev", "prod"):
        env = stages[stage]["environment_variables"]
        tables = vars(config.load({**env, "STAGE": stage}).tables)
        assert {env[f"{f.upper()}_TABLE"] for f in tables} == {
            f"shop-{stage}-{s}" for s in TABLE_ACTIONS}, stage
        named = {f.get("iam_policy_file") for f in stages[stage]["lambda_functions"].values()}
        assert named == {None} | {f"policy-{stage}{s}.json" for s in POLICY_FILES[1:]}, stage
        assert stages[stage]["iam_policy_file"] == f"policy-{stage}.json"  # the API's
    # The functions' settings, timeouts and concurrency: the same but for the stage.
    dev = json.dumps(stages["dev"]["lambda_functions"])
    assert dev.replace("shop-pay/dev", "shop-pay/prod").replace("policy-dev", "policy-prod") == (
        json.dumps(stages["prod"]["lambda_functions"]))
    assert stages["dev"]["lambda_timeout"] == stages["prod"]["lambda_timeout"] == 29


def test_the_template_passes_cfn_lint(built: Any) -> None:
    """Every rule on, warnings failing too: the template needs no exception. Should
    chalice's own output ever trip a rule, ignore that rule by name here
    (`--ignore-checks`), with the reason, rather than warnings wholesale."""
    _, _, out = built
    assert_lint_clean(out / "sam.json")


def test_the_worker_template_passes_cfn_lint() -> None:
    """.chalice/ecs-worker.json, every rule on, warnings failing too (as above)."""
    assert_lint_clean(Path(package.__file__).resolve().parents[1] / ".chalice" /
                      "ecs-worker.json")


def assert_lint_clean(template: Path) -> None:
    lint = Path(sys.executable).with_name("cfn-lint")
    assert lint.exists(), "cfn-lint is in requirements-dev.txt: make test installs it"
    result = subprocess.run([str(lint), "--format", "parseable", str(template)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


# The broker connections of each function at its peak: one per warm instance of a
# function that publishes (chalicelib/deps.py keeps one Broker a process), so its
# reserved concurrency; the API's and the notify's are template parameters.
PUBLISHERS = {"APIHandler": {"Ref": "ApiReservedConcurrency"},
              "AlipayNotifyUrl": {"Ref": "NotifyReservedConcurrency"},
              "Sweeper": 1, "RelayEvents": 5}


def test_reserved_concurrency_bounds_the_broker_connections(built: Any) -> None:
    """Each warm instance of a function that publishes holds one broker connection:
    reserved concurrency caps them (a flash sale beyond the API's is throttled by
    API Gateway, 429, never refused by the broker). The notify URL is public and
    unauthenticated: a flood of forged notifies takes at most its executions, and
    Alipay retries a throttled notify like any other non-`success`. The sweeper and
    the reconciler run one at a time (a round that outlives its schedule is not
    joined by the next)."""
    template, _, _ = built
    functions = resources(template, "AWS::Serverless::Function")
    reserved = {k: v["Properties"]["ReservedConcurrentExecutions"]
                for k, v in functions.items() if "ReservedConcurrentExecutions" in v["Properties"]}
    assert reserved == {**PUBLISHERS, "Reconciler": 1}
    assert {fn for fn, role in ROLES.items() if "RMQ_URL" in config.ROLE_NEEDS[role]} == set(
        PUBLISHERS)
    params = template["Parameters"]
    for name, default in (("ApiReservedConcurrency", 50), ("NotifyReservedConcurrency", 10)):
        assert params[name]["Type"] == "Number" and params[name]["Default"] == default
        assert params[name]["MinValue"] == 1
    # API Gateway throttles the stage before Lambda's reserved concurrency does (a
    # Lambda throttle reaches the client as 500; API Gateway's own is 429).
    assert template["Resources"]["RestAPI"]["Properties"]["MethodSettings"] == [
        {"ResourcePath": "/*", "HttpMethod": "*",
         "ThrottlingBurstLimit": {"Ref": "ApiThrottleBurst"},
         "ThrottlingRateLimit": {"Ref": "ApiThrottleRate"}}]
    assert params["ApiThrottleBurst"]["Default"] <= params["ApiReservedConcurrency"]["Default"]
    # Defaults and the smallest production broker: well under mq.m5.large's 5,000 (a
    # single node's limit; README "Capacity"), with the worker's own connections.
    worker = config.Settings.bridge_workers + 1 + 4 + 1  # consumers, seckill, webhooks, publish
    fixed = sum(v for v in PUBLISHERS.values() if isinstance(v, int))
    assert 50 + 10 + fixed + worker < 500  # even a test broker (mq.t3.micro: 500)


def test_each_timeout_is_longer_than_its_roles_outbound_chain(built: Any) -> None:
    """A function's timeout (chalice's 60 s unless config.json sets `lambda_timeout`)
    must outlast the longest chain of outbound calls its role can make
    (config.OUTBOUND_CHAIN_SECONDS), or an invocation dies between a write and its
    publish; the API's chain must fit API Gateway's 29 s, and its timeout too."""
    template, _, _ = built
    for fn, role in ROLES.items():
        timeout = template["Resources"][fn]["Properties"]["Timeout"]
        assert timeout > config.OUTBOUND_CHAIN_SECONDS[role], (fn, timeout)
    assert config.OUTBOUND_CHAIN_SECONDS["api"] < template["Resources"]["APIHandler"][
        "Properties"]["Timeout"] <= 29
    assert {fn: template["Resources"][fn]["Properties"]["Timeout"] for fn in ROLES} == {
        "APIHandler": 29, "JwtAuth": 10, "AlipayNotifyUrl": 30, "Sweeper": 120,
        "Reconciler": 900, "RelayEvents": 60}
    planted = copy.deepcopy(template)
    planted["Resources"]["Sweeper"]["Properties"]["Timeout"] = 1
    assert package.policy_problems(planted) == [
        f"Sweeper (sweeper): its timeout 1 s is not longer than its longest chain of outbound "
        f"calls ({config.OUTBOUND_CHAIN_SECONDS['sweeper']:g} s)"]


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


def test_settings_come_from_ssm_and_the_secret_from_secrets_manager_at_run_time(
        built: Any) -> None:
    """Each function gets exactly the non-secret settings its role checks for at start
    (config.ROLE_NEEDS), each an SSM reference resolved when the stack is deployed;
    its secrets are never in its environment (where lambda:GetFunctionConfiguration
    would show them, and a rotation would not reach them): SECRET_ID names the
    stage's secret, and its role may read that secret and no other. With the
    secret's keys read (as chalicelib does from SECRET_ID) each function starts."""
    template, text, _ = built
    assert "{{resolve:secretsmanager" not in text
    guarded = (*SECRET_SETTINGS, *SSM_SETTINGS, "RMQ_WORKER_URL", "BILLS_BUCKET")
    assert set(SECRET_SETTINGS.items()) == set(config.SECRET_KEYS.items())
    for fn, role in ROLES.items():
        env = function_env(template, fn)
        assert env["FUNCTION_ROLE"] == role
        needs = set(config.ROLE_NEEDS[role])
        assert {k for k in env if k in guarded} == needs - set(SECRET_SETTINGS), fn
        assert env.get("SECRET_ID") == (SECRET_NAME if needs & set(SECRET_SETTINGS) else None)
        for key in SSM_SETTINGS:
            if key in env:
                assert re.fullmatch(rf"\{{\{{resolve:ssm:/shop-pay/{STAGE}/[a-z-]+\}}\}}",
                                    env[key]), (fn, key)
        grants = [st for st in plain_statements(role_of(template, fn)["Properties"]["Policies"][0])
                  if any(a.startswith("secretsmanager:") for a in _listed(st["Action"]))]
        assert grants == [{"Sid": "StageSecret", "Effect": "Allow",
                           "Action": ["secretsmanager:GetSecretValue"], "Resource": {
                               "Fn::Sub": "arn:${AWS::Partition}:secretsmanager:${AWS::Region}:"
                                          f"${{AWS::AccountId}}:secret:{SECRET_NAME}-??????"}}], fn
        # As deployed: SSM's references stand for values, the secret's keys are what
        # the run time reads from SECRET_ID; the function starts with them.
        resolved = {k: v if not isinstance(v, str) or "{{resolve:" not in v else "resolved"
                    for k, v in env.items() if k != "SECRET_ID"}
        resolved |= {k: SECRET if k == "JWT_SECRET" else "resolved"
                     for k in needs & set(SECRET_SETTINGS)}
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
    assert bucket["DeletionPolicy"] == "RetainExceptOnCreate"
    assert bucket["UpdateReplacePolicy"] == "Retain"
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
        for st in plain_statements(role_policy):
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
    authorizer runs; its gateway response keeps the contract's {"Code","Message"}.
    It is in the API's own GatewayResponses (SAM writes it into the API's
    definition): a separate AWS::ApiGateway::GatewayResponse is dropped from the
    API by SAM's next redeployment. `make run` serves the same body (local/api.py
    reads it from .chalice/resources.json, where it is written as a resource)."""
    template, _, _ = built
    assert not resources(template, "AWS::ApiGateway::GatewayResponse")
    api = template["Resources"]["RestAPI"]
    assert api["Type"] == "AWS::Serverless::Api"
    (kind, answer), = api["Properties"]["GatewayResponses"].items()
    assert kind == "UNAUTHORIZED" and answer["StatusCode"] == "401"
    assert answer["ResponseParameters"] == {"Headers": {"Content-Type": "'application/json'"}}
    body = json.loads(answer["ResponseTemplates"]["application/json"])
    assert set(body) == {"Code", "Message"} and body["Code"] == "UnauthorizedError"
    written = [r["Properties"] for r in json.loads(
        (REPO / ".chalice" / "resources.json").read_text())["Resources"].values()
        if r.get("Type") == "AWS::ApiGateway::GatewayResponse"]
    assert [w["ResponseTemplates"] for w in written] == [answer["ResponseTemplates"]]


KEPT = ("AWS::DynamoDB::Table", "AWS::S3::Bucket", "AWS::Logs::LogGroup")


def test_data_is_kept_but_a_failed_first_create_leaves_nothing(built: Any) -> None:
    """Tables, the bills bucket and the log groups outlive the stack and any
    replacement (Retain), but the deployment that created them rolling back
    removes them (RetainExceptOnCreate): a failed first deploy leaves nothing that
    makes the next one fail with "already exists"."""
    template, _, _ = built
    kept = {k: v for k, v in template["Resources"].items() if v["Type"] in KEPT}
    assert len(kept) == 10 + 1 + len(FUNCTIONS)
    for rid, resource in kept.items():
        assert resource.get("DeletionPolicy") == "RetainExceptOnCreate", rid
        assert resource.get("UpdateReplacePolicy") == "Retain", rid
    assert not [k for k, v in template["Resources"].items()
                if v.get("DeletionPolicy") == "Retain"], "Retain: a failed first create sticks"


VPC_IF = {"Fn::If": ["InVpc", {"SubnetIds": {"Ref": "SubnetIds"},
                               "SecurityGroupIds": {"Ref": "SecurityGroupIds"}},
                     {"Ref": "AWS::NoValue"}]}


def test_the_vpc_mode(built: Any) -> None:
    """SubnetIds and SecurityGroupIds empty (the defaults): no VPC, the trial mode
    with a public broker. Either set: every function in those subnets (Lambda
    refuses one without the other, so a half-given VPC fails the deployment rather
    than leaving the functions outside), every role with the EC2 actions Lambda
    needs to attach it (only under the same condition: `*` is their only resource),
    and, where asked, a DynamoDB gateway endpoint on the given route tables and
    interface endpoints for Secrets Manager, SSM and CloudWatch Logs reachable on
    443 from the functions' first security group."""
    template, _, _ = built
    params = template["Parameters"]
    for name in ("SubnetIds", "SecurityGroupIds", "RouteTableIds"):
        assert params[name] == {**params[name], "Type": "CommaDelimitedList", "Default": ""}
    assert params["VpcId"]["Default"] == "" and params["InterfaceEndpoints"]["Default"] == "false"
    conditions = template["Conditions"]

    def given(name: str) -> dict[str, Any]:
        return {"Fn::Not": [{"Fn::Equals": [{"Fn::Join": ["", {"Ref": name}]}, ""]}]}

    assert conditions["InVpc"] == {"Fn::Or": [given("SubnetIds"), given("SecurityGroupIds")]}
    assert conditions["HasDynamoDbEndpoint"] == {"Fn::And": [{"Condition": "InVpc"},
                                                             given("RouteTableIds")]}
    assert conditions["HasInterfaceEndpoints"] == {"Fn::And": [
        {"Condition": "InVpc"}, {"Fn::Equals": [{"Ref": "InterfaceEndpoints"}, "true"]}]}
    for fn in FUNCTIONS:
        assert template["Resources"][fn]["Properties"]["VpcConfig"] == VPC_IF, fn
        (policy,) = role_of(template, fn)["Properties"]["Policies"]
        (vpc_only,) = [st for st in policy["PolicyDocument"]["Statement"] if "Fn::If" in st]
        condition, st, otherwise = vpc_only["Fn::If"]
        assert (condition, otherwise) == ("InVpc", {"Ref": "AWS::NoValue"}), fn
        assert set(st["Action"]) == package.VPC_ACTIONS and st["Resource"] == "*", fn
    endpoints = resources(template, "AWS::EC2::VPCEndpoint")
    services = {k: (v["Condition"], v["Properties"]["VpcEndpointType"],
                    v["Properties"]["ServiceName"]["Fn::Sub"].rsplit(".", 1)[1])
                for k, v in endpoints.items()}
    assert sorted(services.values()) == [
        ("HasDynamoDbEndpoint", "Gateway", "dynamodb"),
        ("HasInterfaceEndpoints", "Interface", "logs"),
        ("HasInterfaceEndpoints", "Interface", "secretsmanager"),
        ("HasInterfaceEndpoints", "Interface", "ssm")]
    for endpoint in endpoints.values():
        props = endpoint["Properties"]
        assert props["VpcId"] == {"Ref": "VpcId"}
        if props["VpcEndpointType"] == "Gateway":
            assert props["RouteTableIds"] == {"Ref": "RouteTableIds"}
        else:
            assert props["SubnetIds"] == {"Ref": "SubnetIds"} and props["PrivateDnsEnabled"]
            assert props["SecurityGroupIds"] == [{"Ref": "EndpointSecurityGroup"}]
    (group,) = resources(template, "AWS::EC2::SecurityGroup").values()
    assert group["Condition"] == "HasInterfaceEndpoints"
    (ingress,) = group["Properties"]["SecurityGroupIngress"]
    assert (ingress["IpProtocol"], ingress["FromPort"], ingress["ToPort"]) == ("tcp", 443, 443)
    assert ingress["SourceSecurityGroupId"] == {"Fn::Select": [0, {"Ref": "SecurityGroupIds"}]}
    assert template["Outputs"]["VpcMode"]["Value"] == {"Fn::If": ["InVpc", "vpc", "public"]}
    # A function left out of the VPC, or the ENI grant given outside it: both named.
    planted = copy.deepcopy(template)
    del planted["Resources"]["Sweeper"]["Properties"]["VpcConfig"]
    (policy,) = role_of(planted, "JwtAuth")["Properties"]["Policies"]
    statements = policy["PolicyDocument"]["Statement"]
    statements[-1] = statements[-1]["Fn::If"][1]
    assert sorted(package.policy_problems(planted)) == [
        "JwtAuth (authorizer): wildcard resource '*'",
        "Sweeper (sweeper) has no VpcConfig: in VPC mode it would run outside the VPC, away "
        "from a private broker"]


def test_the_function_names_do_not_depend_on_the_stack_name(built: Any) -> None:
    """Each function's name is fixed (`shop-pay-<stage>[-<function>]`, from
    .chalice/resources.json), so its log group and its role's grant on that group
    match whatever the stack is called. (One stack per stage, account and region.)"""
    template, text, _ = built
    for fn, name in FUNCTION_NAMES.items():
        assert template["Resources"][fn]["Properties"]["FunctionName"] == name
    assert "AWS::StackName" not in text


def test_the_build_refuses_two_regions(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The AWS CLI reads AWS_REGION, SAM CLI (boto3) only AWS_DEFAULT_REGION: two
    different values would put the settings in one region and the stack in another."""
    monkeypatch.setenv("AWS_REGION", "ap-southeast-1")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with pytest.raises(SystemExit, match="AWS_REGION=ap-southeast-1 but "
                                         "AWS_DEFAULT_REGION=us-east-1"):
        package.build(STAGE, tmp_path / "out")
    assert not (tmp_path / "out").exists()
