//! Over `server.max_client_conn`, a client is refused as PostgreSQL refuses it (issue
//! 18): its SSLRequest is answered ('N', or 'S' and TLS when spillway has a
//! certificate), and FATAL 53300 answers its startup packet. Drivers connecting with
//! `sslmode=prefer` used to see "rejected SSL upgrade" instead of "too many clients".

use serde_json::json;

use super::{Lang, run, urls};
use crate::auth_tls::Certs;
use crate::context::{Context, DB, USER};
use crate::wire::Raw;

async fn over_limit(ctx: &Context) -> serde_json::Value {
    // Both slots taken by sessions that stay open.
    let _first = Raw::startup(ctx.proxy.addr, USER, DB).await;
    let _second = Raw::startup(ctx.proxy.addr, USER, DB).await;
    let (through, _) = urls(ctx);
    run(
        Lang::Python,
        "over_limit.py",
        &[&through.replace("?sslmode=disable", "")],
    )
    .await
}

#[tokio::test]
async fn refused_after_declining_ssl() {
    let ctx = Context::builder()
        .server("max_client_conn = 2")
        .start()
        .await;
    assert_eq!(
        over_limit(&ctx).await,
        json!({
            "asyncpg": "TooManyConnectionsError 53300",
            "psycopg": "OperationalError too many",
        })
    );
}

#[tokio::test]
async fn refused_after_tls_is_set_up() {
    let certs = Certs::generate(None);
    let ctx = Context::builder()
        .server(&format!("max_client_conn = 2\n{}", certs.server_lines()))
        .start()
        .await;
    assert_eq!(
        over_limit(&ctx).await,
        json!({
            "asyncpg": "TooManyConnectionsError 53300",
            "psycopg": "OperationalError too many",
        })
    );
}
