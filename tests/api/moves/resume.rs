//! Moves whose runner died are resumed by another (an engine, or a mover killed mid-copy), and a
//! cancelled one rolls back.

use super::*;

/// Insert a move as a runner that died would leave it: claimed by a gone owner whose lease ran
/// out.
async fn orphan_move(app: &TestApp, item: u64, phase: &str, extra: &str) -> u64 {
    let config = app
        .state
        .cluster
        .group(0)
        .writer()
        .await
        .expect("config group");
    let id: i64 = config
        .query_one(
            &format!(
                "INSERT INTO moves (move_id, kind, key, from_group, to_group, phase, owner,
                     lease_until, watermark {extra_cols})
                 SELECT coalesce(max(move_id), 0) + 1, 'items', {item}, 'g0', 'g1', '{phase}',
                        'gone-node', now() - interval '1 minute', now() - interval '1 hour'
                        {extra_vals}
                 FROM moves RETURNING move_id",
                extra_cols = if extra.is_empty() {
                    ""
                } else {
                    ", cancel_requested"
                },
                extra_vals = if extra.is_empty() {
                    "".to_string()
                } else {
                    format!(", {extra}")
                },
            ),
            &[],
        )
        .await
        .expect("orphan move")
        .get(0);
    id as u64
}

#[tokio::test]
// Long on purpose: one scenario, its steps in the order they happen; split, it would no longer
// read as one story.
async fn a_move_whose_runner_died_is_resumed_and_a_cancelled_one_rolls_back() {
    let app = spawn_app().await;
    // Died mid-copy: half a copy on g1 (a stale sale_items row, fenced), the route untouched.
    let item = fresh_item_in(&app, 0);
    let sale = app
        .create_sale(json!([{"item_id": item, "stock": 10, "price_cents": 1}]))
        .await;
    let mut bought = HashMap::new();
    for _ in 0..3 {
        let user = fresh_item();
        let r = app.buy(sale, item, user, 1, None).await;
        assert_eq!(r.status, StatusCode::CREATED);
        bought.insert(user, r.body["order_id"].as_str().unwrap().to_string());
    }
    let id = orphan_move(&app, item, "copying", "").await;
    let g1 = app.state.cluster.group(1).writer().await.expect("g1");
    g1.execute(
        &format!(
            "INSERT INTO sale_items (sale_id, item_id, stock, remaining, price_cents, per_user_limit,
                 starts_at, ends_at, payment_window_secs, fenced_by)
             SELECT {sale}, {item}, 10, 10, 1, 1, now(), now() + interval '1 hour', 60, {id}"
        ),
        &[],
    )
    .await
    .expect("half a copy");
    // While it is orphaned the item still sells on g0.
    let r = app.buy(sale, item, fresh_item(), 1, None).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let resumed = wait_for_rest(&app, id).await;
    assert_eq!(resumed["phase"], "switched", "{resumed}");
    // Any engine node on the cluster may have resumed it: this one sees the route within
    // routing.table_refresh_ms.
    assert!(
        eventually(Duration::from_secs(5), || async {
            app.state.router.route(KeyKind::Items, item) == 1
        })
        .await
    );
    assert_eq!(app.remaining(sale, item).await, 6);
    for (user, order) in &bought {
        let r = app.get(&format!("/v1/users/{user}/orders/{order}")).await;
        assert_eq!(r.status, StatusCode::OK);
    }
    let r = app.buy(sale, item, fresh_item(), 1, None).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let audit = app.audit(sale).await;
    assert_eq!(audit["conserved"], true, "{audit}");
    assert_eq!(audit["items"][0]["remaining"], 5);

    // A reverse of it that fails (here: cancelled while its runner is gone) leaves the move it
    // would have reversed as it was: switched, and completable.
    let config = app
        .state
        .cluster
        .group(0)
        .writer()
        .await
        .expect("config group");
    let rev: i64 = config
        .query_one(
            &format!(
                "INSERT INTO moves (move_id, kind, key, from_group, to_group, phase, owner,
                     lease_until, reverse_of, cancel_requested)
                 SELECT coalesce(max(move_id), 0) + 1, 'items', {item}, 'g1', 'g0', 'copying',
                        'gone-node', now() - interval '1 minute', {id}, true
                 FROM moves RETURNING move_id"
            ),
            &[],
        )
        .await
        .expect("orphan reverse")
        .get(0);
    config
        .execute(
            &format!("UPDATE moves SET reversed_by = {rev} WHERE move_id = {id}"),
            &[],
        )
        .await
        .expect("reversed_by");
    drop(config);
    let r = admin_post(&app, &format!("/v1/admin/moves/{id}/complete"), json!({})).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::CONFLICT, "move_conflict"),
        "a move being reversed is not completed: {:?}",
        r.body
    );
    let rev_done = wait_for_rest(&app, rev as u64).await;
    assert_eq!(rev_done["phase"], "cancelled", "{rev_done}");
    let original = app.admin_get(&format!("/v1/admin/moves/{id}")).await.body;
    assert_eq!(
        (original["phase"].as_str(), original["reversed_by"].as_u64()),
        (Some("switched"), None),
        "{original}"
    );
    assert_eq!(app.state.router.route(KeyKind::Items, item), 1);
    let r = admin_post(&app, &format!("/v1/admin/moves/{id}/complete"), json!({})).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    assert_eq!(wait_for_rest(&app, id).await["phase"], "completed");
    assert_eq!(app.remaining(sale, item).await, 5);

    // Cancelled while its runner is gone: the source is unfenced, the copy dropped.
    let item = fresh_item_in(&app, 0);
    let sale = app
        .create_sale(json!([{"item_id": item, "stock": 4, "price_cents": 1}]))
        .await;
    let id = orphan_move(&app, item, "fenced", "true").await;
    let g0 = app.state.cluster.group(0).writer().await.expect("g0");
    g0.execute(
        &format!("UPDATE sale_items SET fenced_by = {id} WHERE item_id = {item}"),
        &[],
    )
    .await
    .expect("fence");
    g1.execute(
        &format!(
            "INSERT INTO sale_items (sale_id, item_id, stock, remaining, price_cents, per_user_limit,
                 starts_at, ends_at, payment_window_secs, fenced_by)
             SELECT {sale}, {item}, 4, 4, 1, 1, now(), now() + interval '1 hour', 60, {id}"
        ),
        &[],
    )
    .await
    .expect("copy");
    let cancelled = wait_for_rest(&app, id).await;
    assert_eq!(cancelled["phase"], "cancelled", "{cancelled}");
    assert_eq!(app.state.router.route(KeyKind::Items, item), 0);
    assert_eq!(
        app.sql_i64(
            1,
            &format!("SELECT count(*) FROM sale_items WHERE item_id = {item}")
        )
        .await,
        0
    );
    let r = app.buy(sale, item, fresh_item(), 1, None).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(app.remaining(sale, item).await, 3);
}

/// A real mover process (the CLI) SIGKILLed while it copies a big item: an engine node resumes the
/// move once the dead runner's lease runs out, and it switches with nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// Long on purpose: one scenario, its steps in the order they happen; split, it would no longer
// read as one story.
async fn a_mover_killed_mid_copy_is_resumed_by_an_engine() {
    use std::io::BufRead;
    let app = spawn_app().await;
    let item = fresh_item_in(&app, 0);
    let held = 200_000i64;
    let stock = held + 100;
    let sale = app
        .create_sale(json!([{"item_id": item, "stock": stock, "price_cents": 1}]))
        .await;
    // A big item: 200,000 reservations (as if sold), written directly.
    let g0 = app.state.cluster.group(0).writer().await.expect("g0");
    g0.batch_execute(&format!(
        "INSERT INTO reservations (txn_id, sale_id, item_id, user_id, quantity, state)
         SELECT gen_random_uuid(), {sale}, {item}, n, 1, 'ordered' FROM generate_series(1, {held}) n;
         UPDATE sale_items SET remaining = remaining - {held} WHERE sale_id = {sale} AND item_id = {item};"
    ))
    .await
    .expect("bulk reservations");
    drop(g0);

    let dir = std::env::temp_dir().join(format!("seckill-moves-{}", fresh_item()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("shards.toml");
    std::fs::write(&config, cluster().shards_toml("127.0.0.1:0", &secrets())).unwrap();
    // The CLI's dry run plans and changes nothing.
    let dry = std::process::Command::new(env!("CARGO_BIN_EXE_seckill"))
        .args(["shard-map", "--config"])
        .arg(&config)
        .args([
            "move",
            "items",
            &item.to_string(),
            "--to",
            "g1",
            "--dry-run",
        ])
        .output()
        .expect("the CLI runs");
    assert!(
        dry.status.success(),
        "{}",
        String::from_utf8_lossy(&dry.stderr)
    );
    let plan: Value = serde_json::from_slice(&dry.stdout).expect("the plan as JSON");
    assert_eq!(plan["rows_to_copy"], held + 1, "{plan}");
    let listed = app.admin_get("/v1/admin/moves").await;
    assert!(listed.body["moves"]
        .as_array()
        .unwrap()
        .iter()
        .all(|m| m["key"] != item));
    let mut mover = std::process::Command::new(env!("CARGO_BIN_EXE_seckill"))
        .args(["shard-map", "--config"])
        .arg(&config)
        .args(["move", "items", &item.to_string(), "--to", "g1"])
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("the CLI runs");
    let stderr = mover.stderr.take().expect("stderr");
    let mut lines = std::io::BufReader::new(stderr).lines();
    let started = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| {
            l.strip_prefix("move ")
                .and_then(|rest| rest.split(':').next())
                .and_then(|id| id.parse::<u64>().ok())
        })
        .expect("the move started");
    tokio::time::sleep(Duration::from_millis(300)).await;
    mover.kill().expect("SIGKILL the mover");
    let _ = mover.wait();
    let at_kill = app
        .admin_get(&format!("/v1/admin/moves/{started}"))
        .await
        .body;
    assert!(
        ["copying", "catching_up"].contains(&at_kill["phase"].as_str().unwrap_or("")),
        "killed mid-copy: {at_kill}"
    );
    // Meanwhile the item sells on g0.
    let r = app.buy(sale, item, fresh_item(), 1, None).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);

    let done = wait_for_rest(&app, started).await;
    assert_eq!(done["phase"], "switched", "{done}");
    assert!(
        eventually(Duration::from_secs(5), || async {
            app.state.router.route(KeyKind::Items, item) == 1
        })
        .await
    );
    assert_eq!(
        app.sql_i64(
            1,
            &format!(
                "SELECT count(*) FROM reservations WHERE sale_id = {sale} AND item_id = {item}"
            )
        )
        .await,
        held + 1
    );
    assert_eq!(app.remaining(sale, item).await, 99);
    let r = app.buy(sale, item, fresh_item(), 1, None).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(app.audit(sale).await["conserved"], true);
    let _ = std::fs::remove_dir_all(&dir);
}
