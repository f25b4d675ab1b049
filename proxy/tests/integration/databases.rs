//! spillway's own connections never keep a database busy (issue 18): a database used
//! through spillway can be dropped, or copied as a template, through spillway right
//! after its last session ended, and also directly a moment later; a dropped and
//! re-created database is not reconnected to by spillway.

use std::time::Duration;

use crate::context::{Context, USER, connect};

/// Whether spillway's cache service connection to `db` is open.
async fn service_on(direct: &tokio_postgres::Client, db: &str) -> bool {
    direct
        .query_one(
            "SELECT count(*) > 0 FROM pg_stat_activity \
             WHERE datname = $1 AND application_name = 'spillway cache service'",
            &[&db],
        )
        .await
        .expect("pg_stat_activity")
        .get(0)
}

/// Connects to `db` through spillway, runs a query, waits until spillway's service
/// connection to `db` is open, and disconnects.
async fn use_through_spillway(ctx: &Context, direct: &tokio_postgres::Client, db: &str) {
    let config = format!(
        "host=127.0.0.1 port={} user={USER} dbname={db} sslmode=disable",
        ctx.proxy.addr.port()
    );
    let client = connect(&config).await;
    client.simple_query("SELECT 1").await.expect("a query");
    let mut open = false;
    for _ in 0..100 {
        if service_on(direct, db).await {
            open = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(open, "spillway opened no service connection to {db}");
    drop(client);
}

#[tokio::test]
async fn a_database_used_through_spillway_is_dropped_through_spillway() {
    let ctx = Context::start().await;
    let admin = ctx.proxy_client().await;
    let direct = ctx.direct_client().await;
    admin
        .batch_execute("CREATE DATABASE scratch")
        .await
        .expect("create");
    use_through_spillway(&ctx, &direct, "scratch").await;
    admin
        .batch_execute("DROP DATABASE scratch")
        .await
        .expect("DROP DATABASE of a database spillway served");
    // Re-created: spillway does not reconnect to it on its own (it used to retry the
    // vanished database every 5 s and then hold the new one).
    admin
        .batch_execute("CREATE DATABASE scratch")
        .await
        .expect("create again");
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(!service_on(&direct, "scratch").await);
    direct
        .batch_execute("DROP DATABASE scratch")
        .await
        .expect("DROP DATABASE of the re-created database");
}

#[tokio::test]
async fn a_template_used_through_spillway_is_copied_through_spillway() {
    let ctx = Context::start().await;
    let admin = ctx.proxy_client().await;
    let direct = ctx.direct_client().await;
    admin
        .batch_execute("CREATE DATABASE tmpl")
        .await
        .expect("create");
    use_through_spillway(&ctx, &direct, "tmpl").await;
    admin
        .batch_execute("CREATE DATABASE copy TEMPLATE tmpl")
        .await
        .expect("CREATE DATABASE … TEMPLATE of a database spillway served");
    // template1, the default template, once a client used it.
    use_through_spillway(&ctx, &direct, "template1").await;
    admin
        .batch_execute("CREATE DATABASE plain")
        .await
        .expect("CREATE DATABASE after a client used template1");
}

#[tokio::test]
async fn the_service_connection_goes_when_the_last_session_leaves() {
    let ctx = Context::start().await;
    let direct = ctx.direct_client().await;
    direct
        .batch_execute("CREATE DATABASE scratch")
        .await
        .expect("create");
    use_through_spillway(&ctx, &direct, "scratch").await;
    // Directly, at once: PostgreSQL waits up to 5 s for other sessions to leave.
    direct
        .batch_execute("DROP DATABASE scratch")
        .await
        .expect("DROP DATABASE sent directly after the last session through spillway left");
}

#[tokio::test]
async fn a_database_used_through_spillway_is_dropped_in_the_extended_protocol() {
    let ctx = Context::start().await;
    let admin = ctx.proxy_client().await;
    let direct = ctx.direct_client().await;
    admin
        .batch_execute("CREATE DATABASE scratch")
        .await
        .expect("create");
    use_through_spillway(&ctx, &direct, "scratch").await;
    // Parse, Describe, Sync; then Bind, Execute, Sync (a driver's prepared statement).
    admin
        .execute("DROP DATABASE scratch", &[])
        .await
        .expect("DROP DATABASE in the extended protocol");
}

/// The session itself is on the template, so its database stays leased: only the
/// release before the statement goes upstream gets spillway's connection out of the
/// way.
#[tokio::test]
async fn a_session_on_template1_creates_a_database() {
    let ctx = Context::start().await;
    let direct = ctx.direct_client().await;
    let config = format!(
        "host=127.0.0.1 port={} user={USER} dbname=template1 sslmode=disable",
        ctx.proxy.addr.port()
    );
    let on_template = connect(&config).await;
    on_template.simple_query("SELECT 1").await.expect("a query");
    let mut open = false;
    for _ in 0..100 {
        if service_on(&direct, "template1").await {
            open = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(open, "spillway opened no service connection to template1");
    on_template
        .batch_execute("CREATE DATABASE fresh")
        .await
        .expect("CREATE DATABASE from a session on template1");
    // The session goes on, served as before (its service connection comes back).
    on_template
        .simple_query("SELECT 1")
        .await
        .expect("a query after");
    // After a release it stays closed for 10 s unless a new session comes.
    let mut back = false;
    for _ in 0..300 {
        if service_on(&direct, "template1").await {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        back,
        "the service connection to template1 did not come back"
    );
    // In the extended protocol (a driver's prepared statement).
    on_template
        .execute("CREATE DATABASE fresh2", &[])
        .await
        .expect("CREATE DATABASE in the extended protocol from a session on template1");
}
