//! The configuration's checks: everything that can be checked without a network, each refusal
//! naming the field (`shards.toml` reference: docs/operators.md).

use super::*;

impl Config {
    /// Everything that can be checked without a network; the error names the field.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        self.validate_groups()?;
        self.validate_server()?;
        self.validate_orders()?;
        self.validate_coalesce()?;
        self.validate_failover()?;
        self.validate_auth()?;
        self.frontdoor.validate()?;
        self.validate_routing()
    }

    fn validate_auth(&self) -> Result<(), ConfigError> {
        let a = &self.auth;
        if let Some(s) = &a.hs256_secret {
            if s.len() < 32 {
                return Err(invalid(
                    "auth.hs256_secret",
                    "must be at least 32 characters (or set SECKILL_USER_TOKEN_SECRET)",
                ));
            }
        }
        let keys = a.hs256_secret.is_some() || a.public_key_file.is_some() || a.jwks_file.is_some();
        if a.users == UsersAuth::Jwt && !keys {
            return Err(invalid(
                "auth",
                "users = \"jwt\" needs hs256_secret (or SECKILL_USER_TOKEN_SECRET), public_key_file or jwks_file",
            ));
        }
        // An identity provider's keys sign tokens for many services: without a required
        // audience, a token it minted for another of them would be taken here.
        let provider_keys = a.public_key_file.is_some() || a.jwks_file.is_some();
        if provider_keys && a.audience.as_deref().is_none_or(str::is_empty) {
            return Err(invalid(
                "auth.audience",
                "required with public_key_file or jwks_file: the `aud` your identity provider puts \
                 in tokens meant for this engine (others are refused)",
            ));
        }
        if let Some(s) = &self.payments.secret {
            if s.len() < 16 {
                return Err(invalid(
                    "payments.secret",
                    "must be at least 16 characters (or set SECKILL_PAYMENT_SECRET)",
                ));
            }
        }
        positive("payments.tolerance_secs", self.payments.tolerance_secs)
    }

    fn validate_groups(&self) -> Result<(), ConfigError> {
        if self.groups.is_empty() {
            return Err(invalid("groups", "at least one shard group is required"));
        }
        let mut names = HashSet::new();
        let mut hosts: HashMap<String, String> = HashMap::new();
        for (i, g) in self.groups.iter().enumerate() {
            let field = format!("groups[{i}]");
            if g.name.is_empty()
                || !g
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return Err(invalid(
                    format!("{field}.name"),
                    "must be non-empty letters, digits, '_' or '-'",
                ));
            }
            if !names.insert(g.name.as_str()) {
                return Err(invalid(
                    format!("{field}.name"),
                    format!("duplicate group name {:?}", g.name),
                ));
            }
            if g.pool_size == 0 || g.pool_size > 1024 {
                return Err(invalid(
                    format!("{field}.pool_size"),
                    "must be between 1 and 1024",
                ));
            }
            for m in self.members(g)? {
                let f = format!("{field}.{}", m.role);
                let endpoint = endpoint_of(&m.conn.pg)
                    .ok_or_else(|| invalid(f.clone(), "names no host and port"))?;
                if let Some(other) = hosts.insert(endpoint.clone(), f.clone()) {
                    return Err(invalid(
                        f,
                        format!("server {endpoint} is already used by {other}"),
                    ));
                }
            }
        }
        Ok(())
    }

    fn validate_server(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        if s.body_limit_bytes < 256 {
            return Err(invalid("server.body_limit_bytes", "must be at least 256"));
        }
        if s.admin_body_limit_bytes < s.body_limit_bytes {
            return Err(invalid(
                "server.admin_body_limit_bytes",
                "must be at least server.body_limit_bytes",
            ));
        }
        if let Some(t) = &s.admin_token {
            if t.len() < 16 {
                return Err(invalid(
                    "server.admin_token",
                    "must be at least 16 characters (or set SECKILL_ADMIN_TOKEN)",
                ));
            }
        }
        if s.request_timeout_ms < 100 {
            return Err(invalid("server.request_timeout_ms", "must be at least 100"));
        }
        if s.http_timeout_ms <= s.request_timeout_ms {
            return Err(invalid(
                "server.http_timeout_ms",
                "must be greater than server.request_timeout_ms",
            ));
        }
        positive("server.header_read_timeout_ms", s.header_read_timeout_ms)?;
        if s.sale_view_cache_ms > 10_000 {
            return Err(invalid(
                "server.sale_view_cache_ms",
                "must be at most 10000 (a sale's view older than that misleads buyers)",
            ));
        }
        positive("server.max_connections", s.max_connections as u64)
    }

    fn validate_orders(&self) -> Result<(), ConfigError> {
        let o = &self.orders;
        if !(1..=MAX_PAYMENT_WINDOW_SECS).contains(&o.payment_window_secs) {
            return Err(invalid(
                "orders.payment_window_secs",
                format!("must be between 1 and {MAX_PAYMENT_WINDOW_SECS} (7 days)"),
            ));
        }
        positive("orders.sweep_interval_ms", o.sweep_interval_ms)?;
        if o.sweep_batch <= 0 {
            return Err(invalid("orders.sweep_batch", "must be positive"));
        }
        if u64::from(o.reconcile_grace_secs) * 1000 < 2 * self.server.request_timeout_ms {
            // A shorter grace would tombstone orders whose transaction 2 is still in flight.
            return Err(invalid(
                "orders.reconcile_grace_secs",
                "must be at least twice server.request_timeout_ms",
            ));
        }
        Ok(())
    }

    fn validate_coalesce(&self) -> Result<(), ConfigError> {
        let c = &self.coalesce;
        positive("coalesce.max_batch", c.max_batch as u64)?;
        positive("coalesce.max_queue", c.max_queue as u64)?;
        positive("coalesce.max_inflight_total", c.max_inflight_total as u64)?;
        positive("coalesce.inflight_per_stock", c.inflight_per_stock.into())?;
        positive("coalesce.soldout_refresh_ms", c.soldout_refresh_ms)?;
        if c.max_wait_us > 1_000_000 {
            return Err(invalid(
                "coalesce.max_wait_us",
                "must be at most 1000000 (1 s)",
            ));
        }
        Ok(())
    }

    fn validate_failover(&self) -> Result<(), ConfigError> {
        let f = &self.failover;
        positive("failover.probe_interval_ms", f.probe_interval_ms)?;
        positive("failover.probe_timeout_ms", f.probe_timeout_ms)?;
        positive(
            "failover.failures_before_promote",
            f.failures_before_promote.into(),
        )?;
        positive("failover.shadow_loss_grace_ms", f.shadow_loss_grace_ms)?;
        if f.stream_timeout_ms < 500 {
            // The receiver pings an idle master at half of it; shorter would end healthy streams.
            return Err(invalid(
                "failover.stream_timeout_ms",
                "must be at least 500",
            ));
        }
        if f.shadow_name.is_empty()
            || !f
                .shadow_name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
        {
            return Err(invalid(
                "failover.shadow_name",
                "must be non-empty letters, digits, '_', '-' or '.'",
            ));
        }
        Ok(())
    }

    fn validate_routing(&self) -> Result<(), ConfigError> {
        if self.routing.slots == 0 || self.routing.slots > 65_536 {
            return Err(invalid("routing.slots", "must be between 1 and 65536"));
        }
        positive("routing.table_refresh_ms", self.routing.table_refresh_ms)?;
        if let Some(cg) = &self.routing.config_group {
            if !self.groups.iter().any(|g| &g.name == cg) {
                return Err(invalid(
                    "routing.config_group",
                    format!("unknown group {cg:?}"),
                ));
            }
        }
        for (kind, routing) in [
            ("items", &self.routing.items),
            ("users", &self.routing.users),
        ] {
            routing::resolve(kind, routing, self.routing.slots, &self.group_names())?;
        }
        Ok(())
    }
}

pub(super) fn positive(field: &str, value: u64) -> Result<(), ConfigError> {
    if value == 0 {
        return Err(invalid(field, "must be positive"));
    }
    Ok(())
}
