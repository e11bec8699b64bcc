//! The configuration's checks, each refusal naming its field.

use super::*;

const BASE: &str = r#"
[[groups]]
name = "g0"
master = "host=127.0.0.1 port=5432 user=seckill dbname=seckill"
shadow = "host=127.0.0.1 port=5433 user=seckill dbname=seckill"
[[groups]]
name = "g1"
master = "host=127.0.0.1 port=5434 user=seckill dbname=seckill"
[auth]
hs256_secret = "0123456789abcdef0123456789abcdef"
"#;

fn err(text: &str) -> String {
    match Config::from_toml(text, "test.toml") {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn minimal_config_has_defaults() {
    let c = Config::from_toml(BASE, "t").unwrap();
    assert_eq!(c.routing.slots, 1024);
    assert_eq!(c.groups[0].pool_size, 16);
    assert_eq!(c.config_group(), "g0");
    assert!(c.coalesce.enabled);
}

#[test]
fn duplicate_group_names_are_named() {
    let text = BASE.replace("name = \"g1\"", "name = \"g0\"");
    assert!(err(&text).contains("groups[1].name"), "{}", err(&text));
}

#[test]
fn duplicate_hosts_are_refused() {
    let text = BASE.replace("port=5434", "port=5432");
    let e = err(&text);
    assert!(
        e.contains("groups[1].master") && e.contains("already used"),
        "{e}"
    );
}

#[test]
fn bad_dsn_is_named() {
    let text = BASE.replace("host=127.0.0.1 port=5434", "host=127.0.0.1 port=notaport");
    assert!(err(&text).contains("groups[1].master"));
}

#[test]
fn slot_map_must_cover_every_slot() {
    let text = format!(
        "{BASE}\n[routing.items]\nstrategy = \"hash\"\nslot_map = [{{ slots = \"0-500\", group = \"g0\" }}, {{ slots = \"502-1023\", group = \"g1\" }}]\n"
    );
    let e = err(&text);
    assert!(
        e.contains("routing.items.slot_map") && e.contains("501"),
        "{e}"
    );
}

#[test]
fn slot_map_unknown_group() {
    let text = format!(
        "{BASE}\n[routing.users]\nslot_map = [{{ slots = \"0-1023\", group = \"nope\" }}]\n"
    );
    assert!(err(&text).contains("unknown group"));
}

#[test]
fn ranges_must_not_leave_gaps() {
    let text = format!(
        "{BASE}\n[routing.users]\nstrategy = \"range\"\nranges = [{{ start = 0, end = 100, group = \"g0\" }}, {{ start = 200, group = \"g1\" }}]\n"
    );
    let e = err(&text);
    assert!(e.contains("routing.users.ranges"), "{e}");
}

#[test]
fn unknown_field_is_named() {
    let text = format!("{BASE}\n[server]\nlisten_addr = \"1.2.3.4:1\"\n");
    assert!(err(&text).contains("listen_addr"));
}

#[test]
fn short_admin_token_refused() {
    let text = format!("{BASE}\n[server]\nadmin_token = \"short\"\n");
    assert!(err(&text).contains("server.admin_token"));
}

#[test]
fn unknown_config_group() {
    let text = format!("{BASE}\n[routing]\nconfig_group = \"g9\"\n");
    assert!(err(&text).contains("routing.config_group"));
}

#[test]
fn zero_durations_and_bad_relations_are_named() {
    for (section, line, field) in [
        (
            "failover",
            "probe_interval_ms = 0",
            "failover.probe_interval_ms",
        ),
        (
            "failover",
            "probe_timeout_ms = 0",
            "failover.probe_timeout_ms",
        ),
        (
            "failover",
            "stream_timeout_ms = 10",
            "failover.stream_timeout_ms",
        ),
        ("failover", "shadow_name = \"a'b\"", "failover.shadow_name"),
        (
            "coalesce",
            "soldout_refresh_ms = 0",
            "coalesce.soldout_refresh_ms",
        ),
        (
            "orders",
            "sweep_interval_ms = 0",
            "orders.sweep_interval_ms",
        ),
        (
            "orders",
            "payment_window_secs = 4294967295",
            "orders.payment_window_secs",
        ),
        (
            "server",
            "request_timeout_ms = 0",
            "server.request_timeout_ms",
        ),
        ("server", "http_timeout_ms = 4000", "server.http_timeout_ms"),
        (
            "server",
            "header_read_timeout_ms = 0",
            "server.header_read_timeout_ms",
        ),
        (
            "routing",
            "table_refresh_ms = 0",
            "routing.table_refresh_ms",
        ),
    ] {
        let text = format!("{BASE}\n[{section}]\n{line}\n");
        let e = err(&text);
        assert!(e.contains(field), "{line}: {e}");
    }
}

#[test]
fn user_tokens_need_a_key_and_secrets_a_length() {
    let no_key = BASE.replace("hs256_secret = \"0123456789abcdef0123456789abcdef\"", "");
    assert!(err(&no_key).contains("auth"), "{}", err(&no_key));
    let trusting = format!("{no_key}users = \"none\"\n");
    assert!(Config::from_toml(&trusting, "t").is_ok());
    let short = BASE.replace("0123456789abcdef0123456789abcdef", "short");
    assert!(err(&short).contains("auth.hs256_secret"));
    let weak = format!("{BASE}[payments]\nsecret = \"short\"\n");
    assert!(err(&weak).contains("payments.secret"));
    let idp = no_key.replace("[auth]", "[auth]\njwks_file = \"/etc/seckill/jwks.json\"");
    assert!(err(&idp).contains("auth.audience"), "{}", err(&idp));
    let idp = idp.replace("[auth]", "[auth]\naudience = \"seckill\"");
    assert!(Config::from_toml(&idp, "t").is_ok());
}

#[test]
fn secrets_and_passwords_never_reach_debug_output() {
    let text = format!(
        "{}\n[server]\nadmin_token = \"admin-token-admin-token\"\n[payments]\nsecret = \"payment-secret-xyz\"\n",
        BASE.replace("user=seckill dbname=seckill\"\nshadow", "user=seckill password=db-pass-123 dbname=seckill\"\nshadow")
    );
    let c = Config::from_toml(&text, "t").unwrap();
    let shown = format!("{c:?}");
    for secret in [
        "admin-token-admin-token",
        "payment-secret-xyz",
        "db-pass-123",
        "0123456789abcdef0123456789abcdef",
    ] {
        assert!(!shown.contains(secret), "{secret} leaked: {shown}");
    }
}

#[test]
fn the_compose_deployment_configs_are_valid_with_their_environment() {
    for text in [
        include_str!("../../deploy/shards.compose.toml"),
        include_str!("../../deploy/shards.migrate.toml"),
        include_str!("../../deploy/patroni/shards.patroni.toml"),
    ] {
        let mut c: Config = toml::from_str(text).unwrap();
        c.auth.hs256_secret = Some(Secret::new("x".repeat(32)));
        c.validate().unwrap();
        assert!(c.groups.iter().all(|g| g.master_admin.is_some()));
        assert!(!text.contains("password="), "no password ships in the file");
    }
    let patroni: Config =
        toml::from_str(include_str!("../../deploy/patroni/shards.patroni.toml")).unwrap();
    assert_eq!(patroni.failover.mode, FailoverMode::External);
}

#[test]
fn no_groups() {
    assert!(err("groups = []").contains("groups"));
}

#[test]
fn slot_range_parsing() {
    assert_eq!(parse_slot_range("0-511"), Some((0, 511)));
    assert_eq!(parse_slot_range(" 7 "), Some((7, 7)));
    assert_eq!(parse_slot_range("9-3"), None);
    assert_eq!(parse_slot_range("x"), None);
}
