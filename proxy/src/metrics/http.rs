//! The HTTP endpoint on `metrics.listen`: `GET /metrics` (Prometheus text format),
//! `GET /healthz` (the process is up) and `GET /readyz` (it can serve: replay done,
//! journal and flusher working, PostgreSQL reachable). Anything else is 404.
//!
//! One task per connection, HTTP/1.1 through hyper; a scrape first refreshes the
//! state gauges (`refresh`), then renders.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Whether spillway can serve; `Err` says why not.
pub type ReadyCheck = Box<dyn Fn() -> futures_ready::Ready + Send + Sync>;

/// What the endpoint answers from.
pub struct Endpoint {
    pub handle: PrometheusHandle,
    /// Sets the state gauges just before a scrape renders.
    pub refresh: Box<dyn Fn() + Send + Sync>,
    pub ready: ReadyCheck,
}

/// Readiness as a boxed future, so the check may do I/O (an upstream connect).
pub mod futures_ready {
    use std::future::Future;
    use std::pin::Pin;

    pub type Ready = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;
}

/// Serves until `shutdown`.
pub async fn serve(listener: TcpListener, endpoint: Arc<Endpoint>, shutdown: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((stream, _)) = accepted else {
            continue;
        };
        let endpoint = endpoint.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let endpoint = endpoint.clone();
                async move { Ok::<_, Infallible>(respond(&endpoint, &req).await) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(err) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                tracing::debug!(%err, "metrics connection ended with an error");
            }
        });
    }
}

async fn respond(endpoint: &Endpoint, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    match req.uri().path() {
        "/metrics" => {
            (endpoint.refresh)();
            let body = endpoint.handle.render();
            let mut r = Response::new(Full::new(Bytes::from(body)));
            if let Ok(v) = "text/plain; version=0.0.4".parse() {
                r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
            }
            r
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => match (endpoint.ready)().await {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("not ready: {why}\n"),
            ),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: /metrics, /healthz, /readyz\n",
        ),
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_owned())));
    *r.status_mut() = status;
    r
}
