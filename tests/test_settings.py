from decimal import Decimal
from pathlib import Path

import pytest

from relay.configs import ChainConfig, GeminiConfig, PaymentConfig, RefundConfig, SinchConfig
from relay.ledger import Ledger
from relay.settings import Settings, SettingsError, load_settings, read_settings, variable_names

PAY_TO = "0x85F37873f97afa61263A27107f2e7b0B672d7CFF"
GOOD = {
    "QUOTE_SECRET": "q" * 32,
    "PAY_TO_ADDRESS": PAY_TO.lower(),
    "MODERATION_PROVIDER": "rules",
    "SMS_PROVIDER": "outbox",
}


def test_minimal_development_configuration() -> None:
    settings = load_settings(GOOD, env_file=None)
    assert settings.pay_to_address == PAY_TO
    assert settings.usdc_address == "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
    assert settings.chain().usdc_eip712 == ("USDC", "2")
    assert settings.chain().v1_network == "base-sepolia"
    assert settings.price_per_segment_usd == Decimal("0.05")
    assert settings.quote_ttl_seconds == 600
    assert settings.database_url == "sqlite:///relay.db"


def test_mainnet_is_a_configuration_change() -> None:
    settings = load_settings({**GOOD, "X402_NETWORK": "eip155:8453"}, env_file=None)
    assert settings.usdc_address == "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"
    assert settings.chain().usdc_eip712 == ("USD Coin", "2")
    assert settings.chain().v1_network == "base"
    assert settings.chain().chain_id == 8453
    assert settings.rpc_url == "https://mainnet.base.org"


def test_every_problem_reported_at_once() -> None:
    env = {
        "QUOTE_TTL_SECONDS": "ten",
        "PRICE_PER_SEGMENT_USD": "cheap",
        "FACILITATOR": "elsewhere",
        "PAY_TO_ADDRESS": "0x123",
    }
    with pytest.raises(SettingsError) as info:
        load_settings(env, env_file=None)
    text = str(info.value)
    for name in ("QUOTE_TTL_SECONDS", "PRICE_PER_SEGMENT_USD", "FACILITATOR", "PAY_TO_ADDRESS"):
        assert name in text


def test_consistency_problems_listed_together() -> None:
    env = {"QUOTE_SECRET": "short", "PAY_TO_ADDRESS": PAY_TO, "FACILITATOR": "local"}
    with pytest.raises(SettingsError) as info:
        load_settings(env, env_file=None)
    problems = "\n".join(info.value.problems)
    for name in ("QUOTE_SECRET", "SETTLER_PRIVATE_KEY", "GEMINI_API_KEY", "SINCH_API_TOKEN"):
        assert name in problems


def test_refuses_to_start_without_gemini_key_or_rules() -> None:
    env = {k: v for k, v in GOOD.items() if k != "MODERATION_PROVIDER"}
    with pytest.raises(SettingsError, match="GEMINI_API_KEY"):
        load_settings(env, env_file=None)


def test_env_file_is_read_and_environment_wins(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("QUOTE_SECRET=" + "f" * 32 + "\nMAX_SEGMENTS=4\n")
    env = {k: v for k, v in GOOD.items() if k != "QUOTE_SECRET"} | {"MAX_SEGMENTS": "7"}
    settings = load_settings(env, env_file=env_file)
    assert settings.quote_secret == "f" * 32
    assert settings.max_segments == 7


def test_secrets_stay_out_of_repr() -> None:
    settings = Settings(
        quote_secret="topsecretvalue123",
        pay_to_address=PAY_TO,
        gemini_api_key="gemini-key-abc",
        sinch_api_token="sinch-token-xyz",
        pay_password="hunter2hunter2",
    )
    text = repr(settings)
    for secret in ("topsecretvalue123", "gemini-key-abc", "sinch-token-xyz", "hunter2hunter2"):
        assert secret not in text


def test_bad_rate_limit_notation() -> None:
    with pytest.raises(SettingsError, match="QUOTE_RATE_LIMIT"):
        load_settings({**GOOD, "QUOTE_RATE_LIMIT": "lots"}, env_file=None)


def test_env_example_documents_every_variable() -> None:
    example = (Path(__file__).parent.parent / ".env.example").read_text()
    documented = {
        line.split("=", 1)[0]
        for line in example.splitlines()
        if "=" in line and not line.startswith("#")
    }
    assert documented == set(variable_names())


def test_the_lease_outlasts_the_longest_step() -> None:
    base = dict(
        quote_secret="x" * 20,
        pay_to_address="0x85F37873f97afa61263A27107f2e7b0B672d7CFF",
        moderation_provider="rules",
        sms_provider="outbox",
    )
    assert Settings(**base, reconcile_after_seconds=35.0).problems() == []
    short = Settings(**base, reconcile_after_seconds=34.0).problems()
    assert any("RECONCILE_AFTER_SECONDS must be at least 35" in p for p in short)
    sinch = {**base, "sms_provider": "sinch", "sinch_service_plan_id": "p"}
    sinch |= {"sinch_api_token": "t", "sinch_from": "+12065550100"}
    assert any(
        "at least 120" in p for p in Settings(**sinch, reconcile_after_seconds=100.0).problems()
    )


def test_postgres_urls_as_platforms_hand_them_out_are_postgresql() -> None:
    settings, problems = read_settings(
        {"DATABASE_URL": "postgres://relay:pw-123456@db:5432/relay"}, env_file=None
    )
    assert settings.database_url == "postgresql://relay:pw-123456@db:5432/relay"
    assert not [p for p in problems if p.startswith("DATABASE_URL")]


@pytest.mark.parametrize("url", ["mysql://root@localhost/relay", "relay.db", "oracle://x"])
def test_a_database_the_ledger_cannot_run_on_is_a_settings_problem(url: str) -> None:
    _, problems = read_settings({"DATABASE_URL": url}, env_file=None)
    assert any(p.startswith("DATABASE_URL scheme") for p in problems), problems


def test_a_postgres_url_reaches_the_database(pg_url: str) -> None:
    url = pg_url.replace("postgresql://", "postgres://", 1)
    settings, _ = read_settings({"DATABASE_URL": url}, env_file=None)
    ledger = Ledger.from_url(settings.database_url)
    ledger.upgrade()
    ledger.ping()
    assert ledger.engine.dialect.name == "postgresql"
    ledger.engine.dispose()


KEY = "0x" + "ab" * 32


def test_each_adapter_gets_only_its_own_settings() -> None:
    settings = Settings(
        rpc_url="https://rpc.example/v2/rpc-key-0123456789abcdef",
        facilitator="local",
        settler_private_key=KEY,
        refund_private_key=KEY,
        pay_to_address=PAY_TO,
        settlement_timeout_seconds=7.5,
        gemini_api_key="gemini-key-abc",
        gemini_base_url="http://127.0.0.1:9",
        gemini_timeout_seconds=2.0,
        gemini_max_attempts=4,
        sinch_service_plan_id="plan",
        sinch_api_token="sinch-token-xyz",
        sinch_from="+12065550100",
        sinch_region="eu",
        public_base_url="https://relay.example/",
        sinch_callback_secret="callback-secret",
    )
    chain = ChainConfig(
        "eip155:84532",
        "https://rpc.example/v2/rpc-key-0123456789abcdef",
        "0x036CbD53842c5426634e7929541eC2318f3dCF7e",
        7.5,
    )
    assert settings.chain() == chain
    assert settings.payments() == PaymentConfig(
        chain, PAY_TO, "local", "https://x402.org/facilitator", KEY
    )
    assert settings.refunds() == RefundConfig(chain, KEY)
    assert settings.gemini() == GeminiConfig(
        "gemini-key-abc", "gemini-2.5-flash", "http://127.0.0.1:9", 2.0, 4
    )
    assert settings.sinch() == SinchConfig(
        "plan",
        "sinch-token-xyz",
        "+12065550100",
        "https://eu.sms.api.sinch.com",
        "https://relay.example/webhooks/sinch/callback-secret",
    )
    shown = repr([settings.payments(), settings.refunds(), settings.gemini(), settings.sinch()])
    for secret in (KEY, "rpc-key-0123456789abcdef", "gemini-key-abc", "sinch-token-xyz"):
        assert secret not in shown
    assert "callback-secret" not in shown


def test_missing_credentials_are_named_when_an_adapter_is_built() -> None:
    assert Settings().refunds() is None
    with pytest.raises(SettingsError, match="GEMINI_API_KEY"):
        Settings(gemini_api_key=None).gemini()
    with pytest.raises(SettingsError) as info:
        Settings(sinch_service_plan_id="plan").sinch()
    assert info.value.problems == [
        "SINCH_API_TOKEN is required for Sinch",
        "SINCH_FROM is required for Sinch",
    ]
    no_callback = Settings(
        sinch_service_plan_id="p", sinch_api_token="t", sinch_from="+1", public_base_url=None
    )
    assert no_callback.sinch().callback_url is None


@pytest.mark.parametrize(
    "name", ["RPC_URL", "GEMINI_BASE_URL", "SINCH_BASE_URL", "PUBLIC_BASE_URL"]
)
def test_service_urls_need_a_scheme(name: str) -> None:
    _, problems = read_settings({name: "127.0.0.1:8545"}, env_file=None)
    assert f"{name} must be an http(s) URL (it is without a scheme)" in problems
    _, problems = read_settings({name: "ftp://x"}, env_file=None)
    assert f"{name} must be an http(s) URL (it is ftp://...)" in problems


def test_log_settings_are_read_in_any_case() -> None:
    settings, problems = read_settings({"LOG_LEVEL": "debug", "LOG_FORMAT": "JSON"}, env_file=None)
    assert (settings.log_level, settings.log_format) == ("DEBUG", "json")
    assert not [p for p in problems if p.startswith("LOG_")]
    _, problems = read_settings({"LOG_LEVEL": "loud"}, env_file=None)
    assert "LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR" in problems
