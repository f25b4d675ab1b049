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

/// Sets the metrics that mirror state (cache counters and size, pending writes,
/// journal) from their owners; called before a scrape or a console `SHOW` renders.
pub fn refresh(
    cache: Option<&crate::read::cache::ReadCache>,
    writes: Option<&crate::write::service::WriteService>,
) {
    if let Some(c) = cache {
        let s = c.results.stats();
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        metrics::counter!(crate::metrics::CACHE_HITS).absolute(load(&s.hits));
        metrics::counter!(crate::metrics::CACHE_MISSES).absolute(load(&s.misses));
        metrics::counter!(crate::metrics::CACHE_EVICTIONS)
            .absolute(load(&s.evicted) + load(&s.expired));
        #[allow(clippy::cast_precision_loss)]
        {
            metrics::gauge!(crate::metrics::CACHE_BYTES).set(c.results.weighted_bytes() as f64);
            metrics::gauge!(crate::metrics::CACHE_ENTRIES).set(c.results.entry_count() as f64);
        }
        let (rows, tables) = c.versions.invalidations();
        metrics::counter!(crate::metrics::INVALIDATIONS, "scope" => "row").absolute(rows);
        metrics::counter!(crate::metrics::INVALIDATIONS, "scope" => "table").absolute(tables);
        if c.invalidation == spillway_policies::Invalidation::Replication {
            for db in c.databases() {
                db.stream.export(&db.name);
                metrics::counter!(crate::metrics::REPLICATION_ECHOES, "database" => db.name.clone())
                    .absolute(db.echoes.accounted());
            }
        }
    }
    if let Some(w) = writes {
        w.export_gauges();
    }
}

/// Binds `metrics.listen` and serves the endpoint until the returned token is
/// cancelled; `None` when `metrics.listen` is unset.
pub async fn start(
    config: &crate::config::Config,
    cache: Option<std::sync::Arc<crate::read::cache::ReadCache>>,
    writes: Option<std::sync::Arc<crate::write::service::WriteService>>,
    connector: crate::net::upstream::Connector,
    runtimes: crate::net::workers::Runtimes,
) -> Result<Option<tokio_util::sync::CancellationToken>, std::io::Error> {
    use std::sync::Arc;

    let Some(addr) = config.metrics.listen else {
        return Ok(None);
    };
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let Some(handle) = crate::metrics::install() else {
        tracing::warn!("another metrics recorder is installed; /metrics serves only its own");
        return Ok(None);
    };
    tracing::info!(addr = %local, "metrics endpoint on {local}");
    let (refresh_cache, refresh_writes) = (cache.clone(), writes.clone());
    let on_scrape = Box::new(move || {
        refresh(refresh_cache.as_deref(), refresh_writes.as_deref());
        runtimes.export();
    });
    let ready_writes = writes;
    let ready: ReadyCheck = Box::new(move || {
        let writes = ready_writes.clone();
        let connector = connector.clone();
        Box::pin(async move {
            if let Some(w) = &writes {
                w.health()?;
            }
            // Upstream reachable: a TCP connect (no session) within a second.
            let target = (connector.target.host.clone(), connector.target.port);
            match tokio::time::timeout(
                std::time::Duration::from_secs(1),
                tokio::net::TcpStream::connect(target),
            )
            .await
            {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(format!("PostgreSQL unreachable: {e}")),
                Err(_) => Err("PostgreSQL unreachable: connect timed out".to_owned()),
            }
        })
    });
    let endpoint = Arc::new(Endpoint {
        handle,
        refresh: on_scrape,
        ready,
    });
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(serve(listener, endpoint, stop.clone()));
    Ok(Some(stop))
}
