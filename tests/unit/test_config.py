"""chalicelib.config at start: each function's role needs only its own settings,
a JWT secret under 32 bytes or the local stack's secret outside it is refused, and
a process in AWS without STAGE does not fall back to the local stack."""

from __future__ import annotations

import base64

import pytest

from chalicelib import config, deps

SECRET = "s" * 32
PAYMENT = {
    "ALIPAY_APP_ID": "2021000000000000",
    "ALIPAY_SELLER_ID": "2088000000000000",
    "ALIPAY_GATEWAY": "https://openapi.alipay.com/gateway.do",
    "ALIPAY_APP_PRIVATE_KEY": "not-read-by-check",
    "ALIPAY_PUBLIC_KEY": "not-read-by-check",
}
# What each deployed function is given (.chalice/config.json), no more.
GIVEN = {
    "api": {**PAYMENT, "RMQ_URL": "amqps://api:pw@mq:5671/%2F"},
    "authorizer": {"JWT_SECRET": SECRET},
    "notify": {"ALIPAY_APP_ID": "2021000000000000", "ALIPAY_SELLER_ID": "2088000000000000",
               "ALIPAY_PUBLIC_KEY": "not-read-by-check", "RMQ_URL": "amqps://api:pw@mq:5671/%2F"},
    "sweeper": {**PAYMENT, "RMQ_URL": "amqps://api:pw@mq:5671/%2F"},
}


def settings(**env: str) -> config.Settings:
    return config.load(env)


@pytest.mark.parametrize("role", sorted(GIVEN))
def test_each_role_starts_with_only_its_own_settings(role: str) -> None:
    got = config.check(settings(STAGE="prod", FUNCTION_ROLE=role, **GIVEN[role]))
    assert got.function_role == role


@pytest.mark.parametrize("role", sorted(GIVEN))
def test_each_role_refuses_to_start_without_each_of_its_settings(role: str) -> None:
    for name in GIVEN[role]:
        env = {k: v for k, v in GIVEN[role].items() if k != name}
        with pytest.raises(config.SettingsError, match=name):
            config.check(settings(STAGE="prod", FUNCTION_ROLE=role, **env))


def test_no_role_is_the_worker_container_with_its_own_broker_user() -> None:
    """The worker's image sets no FUNCTION_ROLE; its task gets RMQ_WORKER_URL and
    no RMQ_URL, and no JWT secret (it verifies no token)."""
    worker = {**PAYMENT, "RMQ_WORKER_URL": "amqps://worker:pw@mq:5671/%2F"}
    for role in ("", "worker"):
        assert config.check(settings(STAGE="prod", FUNCTION_ROLE=role, **worker))
        with pytest.raises(config.SettingsError, match="RMQ_URL"):
            config.check(settings(STAGE="prod", FUNCTION_ROLE=role, **PAYMENT))
    with pytest.raises(config.SettingsError, match="FUNCTION_ROLE 'admin'"):
        config.check(settings(STAGE="prod", FUNCTION_ROLE="admin", **GIVEN["api"]))


def test_outside_the_local_stack_there_is_no_default_broker() -> None:
    assert settings(STAGE="prod").rmq_url == ""
    assert settings().rmq_url == config.LOCAL_RMQ_URL


@pytest.mark.parametrize("stage", ["local", "test", "prod"])
def test_a_short_jwt_secret_is_refused_in_every_stage(stage: str) -> None:
    env = {"STAGE": stage, "FUNCTION_ROLE": "authorizer"}
    with pytest.raises(config.SettingsError, match="JWT_SECRET is 31 bytes"):
        config.check(settings(**env, JWT_SECRET="s" * 31))
    assert config.check(settings(**env, JWT_SECRET=SECRET)).jwt_secret == SECRET


@pytest.mark.parametrize("stage", ["local", "prod"])
def test_the_previous_jwt_secret_is_held_to_the_same_rules(stage: str) -> None:
    env = {"STAGE": stage, "FUNCTION_ROLE": "authorizer", "JWT_SECRET": SECRET}
    with pytest.raises(config.SettingsError, match="JWT_PREVIOUS_SECRET is 31 bytes"):
        config.check(settings(**env, JWT_PREVIOUS_SECRET="p" * 31))
    kept = config.check(settings(**env, JWT_PREVIOUS_SECRET="p" * 32))
    assert kept.jwt_previous_secret == "p" * 32
    assert "p" * 32 not in repr(kept) and SECRET not in repr(kept)
    if stage == "prod":
        with pytest.raises(config.SettingsError, match="JWT_PREVIOUS_SECRET is the local"):
            config.check(settings(**env, JWT_PREVIOUS_SECRET=config.LOCAL_JWT_SECRET))


def test_the_local_default_secret_is_long_enough_and_local_only() -> None:
    assert config.check(settings()).jwt_secret == config.LOCAL_JWT_SECRET
    with pytest.raises(config.SettingsError, match="well-known"):
        config.check(settings(STAGE="prod", FUNCTION_ROLE="authorizer",
                              JWT_SECRET=config.LOCAL_JWT_SECRET))


@pytest.mark.parametrize("marker", ["AWS_LAMBDA_FUNCTION_NAME", "AWS_EXECUTION_ENV"])
def test_stage_is_required_in_aws(marker: str) -> None:
    with pytest.raises(config.SettingsError, match="STAGE is not set"):
        settings(**{marker: "shop-pay-prod"})
    assert settings(STAGE="prod", **{marker: "shop-pay-prod"}).stage == "prod"
    assert settings().stage == "local"  # off AWS, the local stack stays the default


def test_the_authorizer_builds_no_payment_gateway() -> None:
    built = deps.build(settings(STAGE="test", FUNCTION_ROLE="authorizer", JWT_SECRET=SECRET,
                                ALIPAY_APP_ID="2021000000000000",
                                ALIPAY_GATEWAY="http://127.0.0.1:1/gateway.do"))
    assert built.gateway is None


def test_the_notify_gateway_verifies_without_the_apps_private_key() -> None:
    """python-alipay-sdk wants a private key to be built; the notify function gets a
    throwaway one and Alipay's public key, and verifies with the public key only."""
    from Cryptodome.Hash import SHA256
    from Cryptodome.PublicKey import RSA
    from Cryptodome.Signature import PKCS1_v1_5

    alipay = RSA.generate(1024)
    built = deps.build(settings(
        STAGE="test", FUNCTION_ROLE="notify", ALIPAY_APP_ID="2021000000000000",
        ALIPAY_SELLER_ID="2088000000000000",
        ALIPAY_PUBLIC_KEY=alipay.publickey().export_key().decode()))
    assert built.gateway is not None
    params = {"out_trade_no": "o1", "total_amount": "1.00", "app_id": "2021000000000000"}
    unsigned = "&".join(f"{k}={params[k]}" for k in sorted(params)).encode()
    sign = PKCS1_v1_5.new(alipay).sign(SHA256.new(unsigned))
    signed = {**params, "sign": base64.b64encode(sign).decode(), "sign_type": "RSA2"}
    assert built.gateway.verify(signed) is True
    assert built.gateway.verify({**signed, "total_amount": "2.00"}) is False


# --- the outbound chains, from the constants of the modules that make the calls ----


def test_the_chains_count_the_timeouts_the_modules_really_set() -> None:
    """config's figures are those of the broker and the gateway: a change there that
    is not made here would let a function's timeout fall below its chain."""
    import inspect

    from chalicelib.alipay_gateway import AlipayGateway
    from chalicelib.broker.connection import CONNECTION_DEFAULTS, NACK_RETRY_PAUSES_S

    assert config.RABBITMQ_CONNECT_SECONDS == CONNECTION_DEFAULTS["stack_timeout"]
    assert config.RABBITMQ_BLOCKED_SECONDS == CONNECTION_DEFAULTS["blocked_connection_timeout"]
    assert config.RABBITMQ_NACK_PAUSES_SECONDS == sum(NACK_RETRY_PAUSES_S)
    assert CONNECTION_DEFAULTS["connection_attempts"] == 1
    default = inspect.signature(AlipayGateway).parameters["timeout"].default
    assert default == config.ALIPAY_TIMEOUT_SECONDS


def test_every_deployed_function_has_a_chain_and_the_api_fits_api_gateway() -> None:
    assert set(config.OUTBOUND_CHAIN_SECONDS) == set(config.ROLES) - {"worker"}
    assert config.OUTBOUND_CHAIN_SECONDS["api"] <= config.API_MAX_CHAIN_SECONDS < 29
    assert all(chain <= config.OUTBOUND_CHAIN_SECONDS["api"] - config.SECRETS_READ_SECONDS
               for chain in config.API_ROUTE_CHAIN_SECONDS.values())
    assert config.alipay_timeout_seconds("sweeper") == config.ALIPAY_SHORT_TIMEOUT_SECONDS
    for slow in ("", "worker", "reconciler"):
        assert config.alipay_timeout_seconds(slow) == config.ALIPAY_TIMEOUT_SECONDS


# --- the demo seed: local stages only, unless the stage is named -----------------


def test_the_demo_seed_refuses_a_stage_that_is_not_local() -> None:
    from local.stack import SeedRefused, check_seed_stage

    for stage in config.LOCAL_STAGES:
        check_seed_stage(stage)
    with pytest.raises(SeedRefused, match=r"stage 'prod'.*--force-stage prod"):
        check_seed_stage("prod")
    with pytest.raises(SeedRefused, match=r"--force-stage names 'dev'"):
        check_seed_stage("prod", force_stage="dev")  # naming another stage is no consent
    check_seed_stage("prod", force_stage="prod")


def test_the_seed_command_stops_before_touching_a_table(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import local.__main__ as local_main
    from chalicelib.store import Store

    monkeypatch.setenv("STAGE", "prod")
    monkeypatch.setattr(config, "get", lambda: settings(STAGE="prod"))

    def no_store(*args: object) -> None:
        raise AssertionError("the seed reached the tables")

    monkeypatch.setattr(Store, "from_settings", no_store)
    assert local_main.main(["seed"]) == 2
    assert "refusing to seed stage 'prod'" in capsys.readouterr().err
