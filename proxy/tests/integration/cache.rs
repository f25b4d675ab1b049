//! The read cache (SPEC §5) as clients see it: hits and TTL expiry here; invalidation
//! and the stale-fill guard in `cache/invalidation.rs`; isolation between roles,
//! databases, settings and result formats in `cache/isolation.rs`; the extended
//! protocol answered from memory in `cache/extended.rs`; the memory bound, NOTIFY
//! invalidation and coalesced misses in `cache/limits.rs`; reads that must never be
//! cached in `cache/uncacheable.rs`.
//!
//! spillway exposes no hit counter to clients, so a hit is observed with an external
//! write: read through spillway (a fill), change the data with a direct client (which
//! spillway cannot see), read again; a hit still returns the old answer, a miss the
//! new one ([`wait_for_cached`]). Freshness is always judged against PostgreSQL.
//!
//! The catalog is loaded in the background after the first session connects; until
//! then statements pass through uncached. Tests therefore poll for a hit before they
//! rely on caching, instead of sleeping.

mod extended;
mod invalidation;
mod isolation;
mod limits;
mod regressions;
mod uncacheable;

use std::fmt::Debug;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Row, SimpleQueryMessage};

use crate::context::{Context, ContextBuilder, connect};
use crate::wire::{self, Msg, Raw};

/// Rows as text, NULL as `None`. The first row holds the column names (except for
/// [`typed`], which has no statement description to take them from).
pub type Rows = Vec<Vec<Option<String>>>;

pub const SETUP: &str = "CREATE TABLE t (id int PRIMARY KEY, v text NOT NULL, n int NOT NULL);
     INSERT INTO t SELECT g, 'v' || g, g * 10 FROM generate_series(1, 5) g;";
/// Depends on every row of `t`.
pub const ALL: &str = "SELECT id, v, n FROM t ORDER BY id";
/// A change that [`ALL`] always sees, also when `t` was emptied or gained columns.
pub const EXTERNAL: &str =
    "INSERT INTO t (id, v, n) SELECT coalesce(max(id), 0) + 1, 'ext', -1 FROM t";

/// Declared IMMUTABLE on purpose (so its queries are cacheable) while it waits for
/// advisory lock 42: a test holding that lock parks a read inside PostgreSQL, after its
/// snapshot was taken.
pub const GATE: &str = "CREATE FUNCTION gate(int) RETURNS int IMMUTABLE LANGUAGE plpgsql AS $$
     BEGIN PERFORM pg_advisory_lock_shared(42); PERFORM pg_advisory_unlock_shared(42);
     RETURN $1; END $$;";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// Simple Query, text results.
    Simple,
    /// Parse/Describe of a named statement, then Bind/Execute with binary results.
    Extended,
}

pub const BOTH: [Via; 2] = [Via::Simple, Via::Extended];

/// Starts PostgreSQL and spillway, applies [`SETUP`] and `extra` with a direct client
/// before any session goes through spillway, so the first catalog already has them.
pub async fn start(builder: ContextBuilder, extra: &str) -> (Context, Client) {
    let ctx = builder.start().await;
    let direct = ctx.direct_client().await;
    direct.batch_execute(SETUP).await.expect("setup");
    if !extra.is_empty() {
        direct.batch_execute(extra).await.expect("extra setup");
    }
    (ctx, direct)
}

pub fn direct_addr(ctx: &Context) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], ctx.pg.port()))
}

pub async fn proxy_as(ctx: &Context, user: &str, db: &str) -> Client {
    let port = ctx.proxy.addr.port();
    connect(&format!(
        "host=127.0.0.1 port={port} user={user} dbname={db} sslmode=disable"
    ))
    .await
}

pub async fn direct_as(ctx: &Context, user: &str, db: &str) -> Client {
    let port = ctx.pg.port();
    connect(&format!(
        "host=127.0.0.1 port={port} user={user} dbname={db} sslmode=disable"
    ))
    .await
}

pub async fn read(client: &Client, via: Via, sql: &str) -> Rows {
    match via {
        Via::Simple => simple(client, sql).await,
        Via::Extended => extended(client, sql, &[]).await,
    }
}

pub async fn simple(client: &Client, sql: &str) -> Rows {
    let msgs = client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    let mut out = Vec::new();
    for m in msgs {
        match m {
            SimpleQueryMessage::RowDescription(cols) => {
                out.push(cols.iter().map(|c| Some(c.name().to_owned())).collect());
            }
            SimpleQueryMessage::Row(r) => {
                out.push((0..r.len()).map(|i| r.get(i).map(str::to_owned)).collect());
            }
            _ => {}
        }
    }
    out
}

pub async fn extended(client: &Client, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Rows {
    let stmt = client
        .prepare(sql)
        .await
        .unwrap_or_else(|e| panic!("prepare {sql}: {e:?}"));
    let rows = client
        .query(&stmt, params)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    let mut out: Rows = vec![
        stmt.columns()
            .iter()
            .map(|c| Some(c.name().to_owned()))
            .collect(),
    ];
    out.extend(rows.iter().map(row_text));
    out
}

/// `query_typed`: the unnamed statement, Parse/Bind/Execute in one round trip.
pub async fn typed(client: &Client, sql: &str, params: &[(&(dyn ToSql + Sync), Type)]) -> Rows {
    let rows = client
        .query_typed(sql, params)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    rows.iter().map(row_text).collect()
}

/// A binary row as text, so it compares with a simple-protocol one. A value that does
/// not decode (say, text bytes where binary was asked for) shows up as a mismatch.
pub fn row_text(row: &Row) -> Vec<Option<String>> {
    fn show<T: ToString>(r: Result<Option<T>, tokio_postgres::Error>) -> Option<String> {
        match r {
            Ok(v) => v.map(|v| v.to_string()),
            Err(e) => Some(format!("<undecodable: {e}>")),
        }
    }
    (0..row.len())
        .map(|i| {
            let ty = row.columns()[i].type_();
            if *ty == Type::INT4 {
                show(row.try_get::<_, Option<i32>>(i))
            } else if *ty == Type::INT8 {
                show(row.try_get::<_, Option<i64>>(i))
            } else if *ty == Type::BOOL {
                show(row.try_get::<_, Option<bool>>(i))
            } else if *ty == Type::TEXT || *ty == Type::VARCHAR || *ty == Type::NAME {
                show(row.try_get::<_, Option<String>>(i))
            } else {
                // Not compared by any test (clock and random columns).
                Some(format!("<{ty} value>"))
            }
        })
        .collect()
}

/// One extended cycle on a raw connection, text results: Parse (unnamed), Bind,
/// Describe (portal), Execute, Sync.
pub fn cycle(sql: &str) -> Vec<u8> {
    [
        wire::parse("", sql),
        wire::bind("", "", &[]),
        wire::describe_portal(""),
        wire::execute("", 0),
        wire::sync(),
    ]
    .concat()
}

/// Sends `script` and returns the answer up to ReadyForQuery.
pub async fn answer(raw: &mut Raw, script: &[u8]) -> Vec<Msg> {
    raw.send(script).await;
    raw.until(b'Z').await
}

/// [`cycle`] on a raw connection, decoded like [`simple`]'s rows.
pub async fn raw_rows(raw: &mut Raw, sql: &str) -> Rows {
    let msgs = answer(raw, &cycle(sql)).await;
    let mut out = Vec::new();
    for m in &msgs {
        let b = m.body.as_slice();
        match m.tag {
            b'T' => {
                let mut at = 2;
                let mut names = Vec::new();
                for _ in 0..i16::from_be_bytes([b[0], b[1]]) {
                    let end = at + b[at..].iter().position(|c| *c == 0).expect("field name");
                    names.push(Some(String::from_utf8_lossy(&b[at..end]).into_owned()));
                    at = end + 1 + 18;
                }
                out.push(names);
            }
            b'D' => {
                let mut at = 2;
                let mut row = Vec::new();
                for _ in 0..i16::from_be_bytes([b[0], b[1]]) {
                    let len = i32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
                    at += 4;
                    row.push((len >= 0).then(|| {
                        let v = String::from_utf8_lossy(&b[at..at + len as usize]).into_owned();
                        at += len as usize;
                        v
                    }));
                }
                out.push(row);
            }
            b'E' => panic!("{sql}: {m:?}"),
            _ => {}
        }
    }
    out
}

/// Long values replaced by their length and a hash, so assertion messages stay short.
pub fn summarize(rows: Rows) -> Rows {
    rows.into_iter()
        .map(|row| {
            row.into_iter()
                .map(|v| {
                    v.map(|s| {
                        if s.len() <= 64 {
                            return s;
                        }
                        let mut h = std::collections::hash_map::DefaultHasher::new();
                        s.hash(&mut h);
                        format!("<{} bytes, hash {:016x}>", s.len(), h.finish())
                    })
                })
                .collect()
        })
        .collect()
}

/// Proves that `read` is answered from the cache: reads (a fill, once the catalog is
/// loaded), runs `change` on `direct` (spillway cannot see it), reads again, and
/// repeats until the second read still returns the first one's answer while PostgreSQL
/// (`fresh`) has moved on. Returns that cached, now stale, answer. Panics after 10 s.
pub async fn wait_for_cached<T: PartialEq + Debug>(
    mut read: impl AsyncFnMut() -> T,
    mut fresh: impl AsyncFnMut() -> T,
    direct: &Client,
    change: &str,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let before = read().await;
        direct
            .batch_execute(change)
            .await
            .unwrap_or_else(|e| panic!("{change}: {e:?}"));
        let after = read().await;
        let now = fresh().await;
        assert_ne!(now, before, "`{change}` must change the answer");
        if after == before {
            return after;
        }
        assert!(
            Instant::now() < deadline,
            "no cache hit within 10 s: spillway always answered like PostgreSQL ({now:?})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// [`wait_for_cached`] for a tokio-postgres read in either protocol.
pub async fn cached(proxy: &Client, direct: &Client, via: Via, sql: &str, change: &str) -> Rows {
    wait_for_cached(
        async || read(proxy, via, sql).await,
        async || read(direct, via, sql).await,
        direct,
        change,
    )
    .await
}

/// For `window` (and at least once), every read of `sql` through `proxy` in both
/// protocols equals PostgreSQL's. The window outlasts a catalog reload, after which a
/// stale entry that survived would be served again.
pub async fn assert_fresh_for(
    proxy: &Client,
    direct: &Client,
    sql: &str,
    window: Duration,
    what: &str,
) {
    let end = Instant::now() + window;
    loop {
        for via in BOTH {
            let got = read(proxy, via, sql).await;
            let want = read(direct, via, sql).await;
            assert_eq!(got, want, "{what} ({via:?}): spillway's answer is stale");
        }
        if Instant::now() >= end {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls a direct `SELECT count(*)::int ...` until it reaches `at_least`.
pub async fn wait_count(direct: &Client, sql: &str, at_least: i32, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n: i32 = direct.query_one(sql, &[]).await.expect(sql).get(0);
        if n >= at_least {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: still {n} after 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_hit_serves_the_old_value_until_the_ttl_expires() {
    let (ctx, direct) = start(Context::builder().section("[cache]\nttl = \"1s\""), "").await;
    let proxy = ctx.proxy_client().await;
    for via in BOTH {
        // The hit itself: the old answer while PostgreSQL already has the new one.
        let stale = cached(&proxy, &direct, via, ALL, EXTERNAL).await;
        assert_ne!(stale, read(&direct, via, ALL).await);
    }
    // Both entries were filled before this point, so they are now over 1.3 s old.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    for via in BOTH {
        assert_eq!(
            read(&proxy, via, ALL).await,
            read(&direct, via, ALL).await,
            "{via:?}: an entry outlived cache.ttl = 1s (the external write is never seen)"
        );
    }
}

/// Tables `short` and `nocache` beside `t`; see [`table_settings`].
const TABLES: &str = "CREATE TABLE short (id int PRIMARY KEY, v int NOT NULL);
     INSERT INTO short SELECT g, g FROM generate_series(1, 3) g;
     CREATE TABLE nocache (id int PRIMARY KEY, v int NOT NULL);
     INSERT INTO nocache SELECT g, g FROM generate_series(1, 3) g;";

/// With `cache.ttl = 1h`, `short` having `ttl = 1s` and `nocache` having
/// `cache = false` (configured by the caller): `short`'s entries expire after 1 s,
/// `t`'s do not, a result over both lives as long as the shorter TTL, and nothing
/// reading `nocache` is ever a hit.
async fn table_settings(ctx: &Context, direct: &Client) {
    let short = "SELECT id, v FROM short ORDER BY id";
    let join = "SELECT t.id, t.n, short.v FROM t JOIN short USING (id) ORDER BY t.id";
    let bump_short = "UPDATE short SET v = v + 1";
    let proxy = ctx.proxy_client().await;
    let stale_t = cached(&proxy, direct, Via::Simple, ALL, EXTERNAL).await;
    cached(&proxy, direct, Via::Simple, short, bump_short).await;
    cached(&proxy, direct, Via::Simple, join, bump_short).await;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    for sql in [short, join] {
        assert_eq!(
            simple(&proxy, sql).await,
            simple(direct, sql).await,
            "{sql}: the 1s table TTL was not applied"
        );
    }
    assert_eq!(
        simple(&proxy, ALL).await,
        stale_t,
        "t (default TTL 1h) expired with short's 1s TTL"
    );

    let off = "SELECT id, v FROM nocache ORDER BY id";
    let join = "SELECT t.id, nocache.v FROM t JOIN nocache USING (id) ORDER BY t.id";
    for round in 0..10 {
        for sql in [off, join] {
            for via in BOTH {
                // A fill attempt, then a read after a change it cannot have seen.
                read(&proxy, via, sql).await;
                direct
                    .batch_execute("UPDATE nocache SET v = v + 1")
                    .await
                    .expect("bump nocache");
                assert_eq!(
                    read(&proxy, via, sql).await,
                    read(direct, via, sql).await,
                    "round {round}, {via:?}, {sql}: served from the cache despite cache = false"
                );
            }
        }
    }
}

#[tokio::test]
async fn table_ttl_and_cache_off_from_the_config_file() {
    let builder = Context::builder().section(
        "[cache]\nttl = \"1h\"\n\
         [tables.\"public.short\"]\nttl = \"1s\"\n\
         [tables.\"public.nocache\"]\ncache = false",
    );
    let (ctx, direct) = start(builder, TABLES).await;
    table_settings(&ctx, &direct).await;
}

#[tokio::test]
async fn table_ttl_and_cache_off_from_the_environment() {
    let builder = Context::builder()
        .env("SPILLWAY_CACHE__TTL", "1h")
        .env("SPILLWAY_TABLES__public__short__ttl", "1s")
        .env("SPILLWAY_TABLES__public__nocache__cache", "false");
    let (ctx, direct) = start(builder, TABLES).await;
    table_settings(&ctx, &direct).await;
}
