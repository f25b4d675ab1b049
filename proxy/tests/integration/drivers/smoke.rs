//! The harness itself: every pinned driver connects through spillway and reads what
//! it reads directly, at the pinned version.

use serde_json::json;

use super::{Lang, both};
use crate::context::Context;

fn rows() -> serde_json::Value {
    json!([
        [1, "c4ca4238a0b923820dcc509a6f75849b"],
        [2, "c81e728d9d4c2f636f067f89cc14862c"],
        [3, "eccbc87e4b5ce2fe28308fd9f2a7baf3"]
    ])
}

#[tokio::test]
async fn python_drivers_read_through_spillway() {
    let ctx = Context::start().await;
    let (through, direct) = both(&ctx, Lang::Python, "smoke.py").await;
    for driver in ["psycopg", "asyncpg", "sqlalchemy", "django"] {
        assert_eq!(through[driver], rows(), "{driver}: {through}");
    }
    assert_eq!(through["versions"]["django"], "5.2.20");
    assert_eq!(through, direct);
}

#[tokio::test]
async fn node_drivers_read_through_spillway() {
    let ctx = Context::start().await;
    let (through, direct) = both(&ctx, Lang::Node, "smoke.js").await;
    for driver in ["pg", "knex"] {
        assert_eq!(through[driver], rows(), "{driver}: {through}");
    }
    assert_eq!(
        through["versions"],
        json!({"pg": "8.23.1", "knex": "3.3.0"})
    );
    assert_eq!(through, direct);
}
