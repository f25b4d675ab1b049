//! A pool's upkeep outside its leases: the sweep that closes idle connections past
//! their time, the check that an idle connection is still usable, and the reset query
//! run when a connection goes back.

use std::sync::PoisonError;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use super::{Pool, Server};
use crate::error::SessionError;
use crate::net::conn::{Conn, read_upstream_frame};
use crate::protocol::backend;

/// Closes the pool's idle connections once past `pool.limits.idle_timeout` or
/// `pool.limits.lifetime`, without waiting for the pool to be used again, so PostgreSQL's
/// backends go away on time. Ends with the pool.
pub(super) async fn sweep(pool: std::sync::Weak<Pool>) {
    let period = match pool.upgrade() {
        Some(p) => (p.limits.idle_timeout.min(p.limits.lifetime) / 4)
            .clamp(Duration::from_millis(50), Duration::from_secs(10)),
        None => return,
    };
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        let expired: Vec<Box<Server>> = {
            let mut idle = pool.idle.lock().unwrap_or_else(PoisonError::into_inner);
            let (keep, expired): (Vec<Box<Server>>, Vec<Box<Server>>) =
                std::mem::take(&mut *idle).into_iter().partition(|s| {
                    s.idle_since.elapsed() < pool.limits.idle_timeout
                        && s.created.elapsed() < pool.limits.lifetime
                });
            *idle = keep;
            expired
        };
        for mut server in expired {
            pool.open.fetch_sub(1, Ordering::Relaxed);
            // Terminate, so PostgreSQL logs a clean end rather than an EOF.
            let _ = tokio::time::timeout(Duration::from_secs(1), server.conn.send(b"X\0\0\0\x04"))
                .await;
        }
    }
}

/// Whether an idle connection is still usable: nothing may have arrived on it (a
/// FATAL, as PostgreSQL sends when it shuts down, or the end of the stream).
pub(super) fn still_open(conn: &mut Conn) -> bool {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    // The socket's readiness first: a read (and its buffer) only when it is set.
    conn.inbuf.is_empty()
        && (conn.stream.surely_quiet(&mut cx) || conn.poll_fill(&mut cx).is_pending())
}

/// Runs `query` (simple protocol) and reads to its ReadyForQuery; an error answer
/// or a transaction left open counts as failure.
pub(super) async fn reset(conn: &mut Conn, query: &str) -> Result<(), SessionError> {
    let mut msg = BytesMut::new();
    postgres_protocol::message::frontend::query(query, &mut msg)
        .map_err(SessionError::UpstreamIo)?;
    conn.send(&msg).await.map_err(SessionError::UpstreamIo)?;
    let mut failed = false;
    loop {
        let (tag, body) = read_upstream_frame(conn).await?;
        match tag {
            backend::ERROR_RESPONSE => failed = true,
            backend::READY_FOR_QUERY => {
                if failed || backend::ready_for_query_status(&body[5..]) != Some(b'I') {
                    let _ = conn.stream.shutdown().await;
                    return Err(SessionError::UpstreamClosed);
                }
                return Ok(());
            }
            _ => {}
        }
    }
}
