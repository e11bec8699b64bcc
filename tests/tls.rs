//! TLS to PostgreSQL: `sslmode=require`, `verify-ca` and `verify-full` (with `sslrootcert`) in a
//! DSN work, and a server whose certificate does not verify is refused.

#[path = "api/helpers.rs"]
mod helpers;

use helpers::*;
use reqwest::StatusCode;
use seckill::config::Dsn;
use seckill::shard::tls::Endpoint;
use serde_json::json;
use std::path::Path;

struct Pki {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

/// A CA and a server certificate it signed for `names`.
fn pki(names: &[&str]) -> Pki {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "seckill test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    Pki {
        ca_pem: ca.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

fn own_by_postgres(path: &Path) {
    if unsafe { libc::geteuid() } == 0 {
        let ok = std::process::Command::new("chown")
            .arg("postgres:postgres")
            .arg(path)
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }
}

fn resolve(dsn: &str) -> Endpoint {
    Endpoint::new(&Dsn::new(dsn).resolve(None).unwrap()).unwrap()
}

async fn uses_tls(e: &Endpoint) -> Result<bool, String> {
    let (client, task) = e.connect().await.map_err(|e| format!("{e:?}"))?;
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?;
    task.abort();
    Ok(row.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// Long on purpose: one scenario, its steps in the order they happen; split, it would no longer
// read as one story.
async fn tls_modes_verify_what_they_promise() {
    let cluster = start_cluster(1);
    let master = &cluster.groups[0].master;
    // For the name "localhost" only: 127.0.0.1 is the same server under another name.
    let certs = pki(&["localhost"]);
    let dir = &master.data_dir;
    std::fs::write(dir.join("server.crt"), &certs.cert_pem).unwrap();
    std::fs::write(dir.join("server.key"), &certs.key_pem).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        dir.join("server.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    own_by_postgres(&dir.join("server.crt"));
    own_by_postgres(&dir.join("server.key"));
    master
        .psql("postgres", "ALTER SYSTEM SET ssl = on")
        .unwrap();
    master.psql("postgres", "SELECT pg_reload_conf()").unwrap();
    let ca = std::env::temp_dir().join(format!("seckill-ca-{}.pem", std::process::id()));
    std::fs::write(&ca, &certs.ca_pem).unwrap();
    let other = pki(&["localhost"]);
    let wrong_ca = std::env::temp_dir().join(format!("seckill-ca2-{}.pem", std::process::id()));
    std::fs::write(&wrong_ca, &other.ca_pem).unwrap();
    let base = cluster.admin_dsn(master);

    // Give the reload a moment to take effect.
    let required = resolve(&format!("{base} sslmode=require"));
    assert!(
        eventually(std::time::Duration::from_secs(5), || async {
            uses_tls(&required).await == Ok(true)
        })
        .await,
        "require encrypts"
    );
    let full = resolve(&format!(
        "{} sslmode=verify-full sslrootcert={}",
        base.replace("127.0.0.1", "localhost"),
        ca.display()
    ));
    assert_eq!(
        uses_tls(&full).await,
        Ok(true),
        "verify-full with the right CA"
    );
    let wrong = resolve(&format!(
        "{} sslmode=verify-full sslrootcert={}",
        base.replace("127.0.0.1", "localhost"),
        wrong_ca.display()
    ));
    assert!(uses_tls(&wrong).await.is_err(), "another CA is refused");
    let unknown = resolve(&format!(
        "{} sslmode=verify-full",
        base.replace("127.0.0.1", "localhost")
    ));
    assert!(
        uses_tls(&unknown).await.is_err(),
        "a private CA is not among the public roots"
    );
    // The same server under a name its certificate does not carry: verify-full refuses,
    // verify-ca (the chain only) accepts.
    let renamed = resolve(&format!(
        "{base} sslmode=verify-full sslrootcert={}",
        ca.display()
    ));
    assert!(uses_tls(&renamed).await.is_err(), "name mismatch refused");
    let chain_only = resolve(&format!(
        "{base} sslmode=verify-ca sslrootcert={}",
        ca.display()
    ));
    assert_eq!(uses_tls(&chain_only).await, Ok(true));

    // The engine itself, over verify-full.
    let mut config = base_config(&cluster);
    let verified = |dsn: String| {
        Dsn::new(format!(
            "{} sslmode=verify-full sslrootcert={}",
            dsn.replace("127.0.0.1", "localhost"),
            ca.display()
        ))
    };
    config.groups[0].master = verified(cluster.dsn(master));
    config.groups[0].master_admin = Some(verified(cluster.admin_dsn(master)));
    config.groups[0].shadow = None;
    config.groups[0].shadow_admin = None;
    config.failover.enabled = false;
    let app = spawn_config(config, quiet()).await;
    let item = fresh_item();
    let sale = app
        .create_sale(json!([{"item_id": item, "stock": 3, "price_cents": 1}]))
        .await;
    let r = app.buy(sale, item, fresh_item(), 1, None).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    cluster.stop_all("immediate");
    let _ = std::fs::remove_dir_all(&cluster.root);
}
