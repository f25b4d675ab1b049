//! How a session's relay ends: the last words toward both sides, delivered within
//! [`CLOSE_GRACE`].

use tokio::io::AsyncWriteExt;

use super::{CLOSE_GRACE, End, Relay, TERMINATE};
use crate::error::SessionError;
use crate::net::conn::write_out;

impl Relay {
    /// Ends the session because of `err`: queues the client-facing error (if the
    /// client can still take one), tells PostgreSQL goodbye, flushes briefly.
    pub(super) async fn close_with(&mut self, err: SessionError) -> Result<End, SessionError> {
        let client_broken = matches!(err, SessionError::ClientIo(_));
        if client_broken || matches!(err, SessionError::Shutdown) {
            self.cancel_running_query();
        }
        let upstream_broken = self.lease.server().is_none()
            || matches!(
                err,
                SessionError::UpstreamIo(_) | SessionError::UpstreamClosed
            );
        if client_broken {
            self.out.to_client().clear();
        } else if self.streaming > 0 {
            // Part of a large message may already be on the wire: an ErrorResponse now
            // would be read as the rest of it. Deliver what is queued and just close;
            // the client sees the connection end mid-message, as it would directly.
        } else if let Some(msg) = err.to_client() {
            // Whatever else was queued is delivered first.
            self.out.relay(&msg);
        }
        if upstream_broken {
            self.out.to_upstream().clear();
        } else {
            self.out.release(TERMINATE);
        }
        self.flush_for_close().await;
        Err(err)
    }

    /// Delivers what is queued toward both sides at once (one side not reading must not
    /// hold back the other's final words), then closes both, within [`CLOSE_GRACE`].
    pub(super) async fn flush_for_close(&mut self) {
        let Relay {
            client, lease, out, ..
        } = self;
        let upstream = lease.conn_for_close();
        let (to_client, to_upstream) = out.queues();
        let to_upstream = async {
            let _ = write_out(&mut upstream.stream, to_upstream).await;
            let _ = upstream.stream.shutdown().await;
        };
        let to_client = async {
            let _ = write_out(&mut client.stream, to_client).await;
            let _ = client.stream.shutdown().await;
        };
        let _ =
            tokio::time::timeout(CLOSE_GRACE, async { tokio::join!(to_upstream, to_client) }).await;
    }
}
