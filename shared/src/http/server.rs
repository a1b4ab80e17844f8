//! The hyper 1.x server every non-gateway service runs on.
//!
//! Around the service's [`Router`] it adds: a request id (accepted from `x-request-id` when
//! well-formed, generated otherwise, echoed back), `/healthz`, `/readyz` and `/metrics`,
//! per-client rate limiting (429 + `Retry-After`), a request timeout, request metrics with
//! bounded labels, optional TLS / mTLS (the verified client certificate reaches the handler),
//! and graceful shutdown: stop accepting, drain within the grace period, then return.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::HeaderValue;
use http::{Method, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use prometheus::Registry;
use tokio::net::TcpListener;
use tracing::Instrument;

use super::{ApiRequest, ClientCert, RequestCtx, Response, Router, error_response, json_response};
use crate::error::{Error, ErrorCode};
use crate::health::Health;
use crate::metrics::{HttpMetrics, render};
use crate::ratelimit::RateLimiter;
use crate::shutdown::Shutdown;

#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    pub grace_period: Duration,
    /// (requests per second, burst) per client IP; `None` disables limiting.
    pub rate_limit: Option<(u32, u32)>,
}

impl ServerOptions {
    pub fn from_config(http: &crate::config::HttpConfig) -> Self {
        ServerOptions {
            max_body_bytes: http.max_body_bytes,
            request_timeout: http.request_timeout,
            grace_period: http.grace_period,
            rate_limit: Some((http.rate_limit_per_sec, http.rate_limit_burst)),
        }
    }
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            max_body_bytes: 1024 * 1024,
            request_timeout: Duration::from_secs(30),
            grace_period: Duration::from_secs(10),
            rate_limit: None,
        }
    }
}

pub struct HttpServer<S> {
    name: &'static str,
    router: Router<S>,
    state: Arc<S>,
    health: Health,
    registry: Registry,
    metrics: HttpMetrics,
    opts: ServerOptions,
    limiter: Option<RateLimiter<IpAddr>>,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

/// Marker so callers can name "some hyper service" without generics.
pub trait App: Send + Sync + 'static {}
impl<S: Send + Sync + 'static> App for HttpServer<S> {}

impl<S: Send + Sync + 'static> HttpServer<S> {
    pub fn new(
        name: &'static str,
        router: Router<S>,
        state: Arc<S>,
        health: Health,
        registry: Registry,
        opts: ServerOptions,
    ) -> Self {
        let metrics = HttpMetrics::new(&registry);
        crate::metrics::register_build_info(&registry, name);
        let limiter = opts.rate_limit.map(|(r, b)| RateLimiter::new(r, b));
        HttpServer {
            name,
            router,
            state,
            health,
            registry,
            metrics,
            opts,
            limiter,
            tls: None,
        }
    }

    /// Serve TLS (with client-certificate verification when the config asks for it).
    pub fn with_tls(mut self, config: Arc<rustls::ServerConfig>) -> Self {
        self.tls = Some(tokio_rustls::TlsAcceptor::from(config));
        self
    }

    pub fn routes(&self) -> Vec<(Method, &'static str)> {
        self.router.routes()
    }

    /// Accept connections until `shutdown`, then drain in-flight requests within the grace
    /// period. Returns when every connection is closed or the grace period is over.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: Shutdown) -> std::io::Result<()> {
        let graceful = GracefulShutdown::new();
        let local = listener.local_addr()?;
        tracing::info!(service = self.name, addr = %local, tls = self.tls.is_some(), "listening");
        self.health.set_started();
        loop {
            let (stream, peer) = tokio::select! {
                _ = shutdown.wait() => break,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off briefly rather than spin.
                        tracing::warn!(service = self.name, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let me = self.clone();
            match &self.tls {
                None => {
                    let conn = http1::Builder::new().keep_alive(true).serve_connection(
                        TokioIo::new(stream),
                        service_fn(move |req| {
                            let me = me.clone();
                            async move { Ok::<_, Infallible>(me.handle(req, peer, None).await) }
                        }),
                    );
                    let fut = graceful.watch(conn);
                    tokio::spawn(async move {
                        let _ = fut.await;
                    });
                }
                Some(acceptor) => {
                    let acceptor = acceptor.clone();
                    let watcher = graceful.watcher();
                    tokio::spawn(async move {
                        let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                tracing::debug!(error = %e, %peer, "TLS handshake failed");
                                return;
                            }
                            Err(_) => return,
                        };
                        let cert = tls
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .map(|leaf| ClientCert {
                                der: leaf.as_ref().to_vec(),
                                fingerprint: hex::encode(crate::crypto::sha256(leaf.as_ref())),
                            });
                        let conn = http1::Builder::new().keep_alive(true).serve_connection(
                            TokioIo::new(tls),
                            service_fn(move |req| {
                                let me = me.clone();
                                let cert = cert.clone();
                                async move { Ok::<_, Infallible>(me.handle(req, peer, cert).await) }
                            }),
                        );
                        let _ = watcher.watch(conn).await;
                    });
                }
            }
        }
        drop(listener);
        tracing::info!(service = self.name, "stopped accepting; draining");
        if tokio::time::timeout(self.opts.grace_period, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!(service = self.name, "grace period over; closing remaining connections");
        }
        Ok(())
    }

    async fn handle(
        self: Arc<Self>,
        req: http::Request<Incoming>,
        peer: SocketAddr,
        cert: Option<ClientCert>,
    ) -> http::Response<Full<Bytes>> {
        let started = Instant::now();
        let request_id = request_id(&req);
        let method = req.method().clone();
        let span = tracing::info_span!("request", service = self.name, request_id = %request_id, method = %method, path = %req.uri().path());
        let (route, mut resp) = self
            .clone()
            .route_request(req, peer, cert, request_id.clone())
            .instrument(span)
            .await;
        if let Ok(v) = HeaderValue::from_str(&request_id) {
            resp.headers_mut().insert("x-request-id", v);
        }
        let status = resp.status();
        self.metrics
            .requests
            .with_label_values(&[route, method.as_str(), status.as_str()])
            .inc();
        self.metrics
            .duration
            .with_label_values(&[route])
            .observe(started.elapsed().as_secs_f64());
        if status.is_server_error() {
            tracing::warn!(service = self.name, %request_id, route, status = status.as_u16(), "request failed");
        } else {
            tracing::debug!(service = self.name, %request_id, route, status = status.as_u16(), "request");
        }
        resp
    }

    async fn route_request(
        self: Arc<Self>,
        req: http::Request<Incoming>,
        peer: SocketAddr,
        cert: Option<ClientCert>,
        request_id: String,
    ) -> (&'static str, Response) {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/healthz") => {
                return (
                    "/healthz",
                    json_response(StatusCode::OK, &serde_json::json!({"status": "ok"})),
                );
            }
            (&Method::GET, "/readyz") => {
                let ready = self.health.is_ready();
                let mut body = self.health.report();
                if !ready {
                    let err = Error::new(ErrorCode::NotReady, "a dependency is unavailable");
                    body["error"] = err.to_json(Some(&request_id))["error"].clone();
                }
                let status = if ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                return ("/readyz", json_response(status, &body));
            }
            (&Method::GET, "/metrics") => {
                return (
                    "/metrics",
                    super::text_response(StatusCode::OK, "text/plain; version=0.0.4", render(&self.registry)),
                );
            }
            _ => {}
        }
        if let Some(l) = &self.limiter
            && let Err(retry) = l.check(&peer.ip(), 1.0)
        {
            let err = Error::new(ErrorCode::RateLimited, "too many requests").with_retry_after(retry);
            return ("rate_limited", error_response(&err, Some(&request_id)));
        }
        let ctx = RequestCtx {
            request_id: request_id.clone(),
            peer,
            client_cert: cert,
        };
        let api = ApiRequest::new(req, ctx, self.opts.max_body_bytes);
        let (route, fut) = self.router.dispatch(self.state.clone(), api);
        let result = match tokio::time::timeout(self.opts.request_timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(Error::new(ErrorCode::Unavailable, "the request timed out")),
        };
        match result {
            Ok(resp) => (route, resp),
            Err(err) => {
                if err.status().is_server_error() {
                    tracing::warn!(error = %err, "request error");
                }
                (route, error_response(&err, Some(&request_id)))
            }
        }
    }
}

fn request_id<B>(req: &http::Request<B>) -> String {
    if let Some(v) = req.headers().get("x-request-id").and_then(|v| v.to_str().ok())
        && !v.is_empty()
        && v.len() <= 64
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return v.to_string();
    }
    uuid::Uuid::new_v4().simple().to_string()
}
