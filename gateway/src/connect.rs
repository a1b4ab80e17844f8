//! `HTTPS_PROXY`: CONNECT tunnels. Pingora does not tunnel CONNECT, so the forward listener is
//! fronted by this `ServerApp`: it peeks at the first request of each connection; a CONNECT is
//! handled here, anything else goes to Pingora unchanged.
//!
//! A tunnel is allowed when the mandate covers a resource at exactly that host and port and a
//! rule allows method `CONNECT` there (a tunnel carries traffic the gateway cannot see, so it
//! must be granted explicitly — or the resource is intercepted for full L7 control). The
//! destination passes the egress guard, the decision is audited, then bytes are relayed. The
//! tunnel closes when idle too long, and is cut when its mandate is revoked or expires.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use caracal_shared::error::{Error, ErrorCode};
use caracal_shared::policy::Facts;
use caracal_shared::time::now_secs;
use pingora::apps::ServerApp;
use pingora::protocols::Stream;
use pingora::proxy::HttpProxy;
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::decide::{AuditInfo, Established, Target, Who, credential};
use crate::proxy::Proxy;
use crate::request_id::RequestId;
use crate::state::{Cached, Gateway, ResourceEntry};

const MAX_HEAD: usize = 16 * 1024;

/// A tunnel's decision: who, which resource, the deciding rule, the checked address.
/// (No address: the tunnel is intercepted, each request inside is decided and routed itself.)
type Allowed = (Arc<Cached>, Arc<ResourceEntry>, String, Option<std::net::SocketAddr>);
/// A refusal and what was established before it.
type Refused = (Error, Option<Arc<Cached>>, Option<Arc<ResourceEntry>>);

pub struct Front {
    pub proxy: Arc<HttpProxy<Proxy>>,
    pub gw: Arc<Gateway>,
}

#[async_trait]
impl ServerApp for Front {
    async fn process_new(self: &Arc<Self>, mut stream: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        let first_request = Duration::from_secs(60);
        let (stream, connect) = if stream.get_ssl().is_some() {
            // The mTLS listener: Pingora cannot peek into TLS, so read the first bytes and put
            // them back in front of the stream.
            let prefix = crate::mtls::read_prefix(&mut stream, 8, first_request).await.ok()?;
            let connect = prefix == b"CONNECT ";
            (Box::new(crate::mtls::Rewound::new(prefix, stream)) as Stream, connect)
        } else {
            let mut b = [0u8; 8];
            match tokio::time::timeout(first_request, stream.try_peek(&mut b)).await {
                Ok(Ok(peeked)) => (stream, peeked && &b == b"CONNECT "),
                _ => return None,
            }
        };
        if connect {
            self.tunnel(stream, shutdown).await;
            return None;
        }
        let mut next = self.proxy.process_new(stream, shutdown).await;
        while let Some(s) = next {
            next = self.proxy.process_new(s, shutdown).await;
        }
        None
    }
}

struct Head {
    authority: String,
    secret: Option<String>,
    request_id: RequestId,
    /// Bytes the client sent after the head (to pass on).
    rest: Vec<u8>,
}

async fn read_head(stream: &mut Stream) -> Result<Head, Error> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(remaining, stream.read(&mut chunk))
            .await
            .map_err(|_| Error::bad_request("the CONNECT request was not sent in time"))?
            .map_err(|_| Error::bad_request("the connection failed"))?;
        if n == 0 {
            return Err(Error::bad_request("the connection closed"));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                if req.method != Some("CONNECT") {
                    return Err(Error::bad_request("expected CONNECT"));
                }
                let authority = req
                    .path
                    .ok_or_else(|| Error::bad_request("CONNECT names no target"))?
                    .to_string();
                let get = |n: &str| {
                    req.headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case(n))
                        .and_then(|h| std::str::from_utf8(h.value).ok())
                };
                let secret = get("proxy-authorization").and_then(credential).map(Cow::into_owned);
                let request_id = RequestId::from_caller(get("x-request-id").map(str::as_bytes));
                return Ok(Head {
                    authority,
                    secret,
                    request_id,
                    rest: buf[len..].to_vec(),
                });
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => continue,
            Ok(httparse::Status::Partial) => return Err(Error::bad_request("the CONNECT request head is too large")),
            Err(_) => return Err(Error::bad_request("malformed CONNECT request")),
        }
    }
}

async fn write_error(stream: &mut Stream, err: &Error, request_id: &str) {
    let auth = matches!(
        err.code,
        ErrorCode::MandateMissing
            | ErrorCode::MandateInvalid
            | ErrorCode::MandateExpired
            | ErrorCode::ProxyAuthRequired
    );
    let status = if auth { 407 } else { err.status().as_u16() };
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error");
    let body = err.to_json(Some(request_id)).to_string();
    let mut head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\nX-Request-Id: {request_id}\r\n",
        body.len()
    );
    if auth {
        head.push_str("Proxy-Authenticate: Basic realm=\"caracal\"\r\n");
    }
    if let Some(s) = err.retry_after_secs {
        head.push_str(&format!("Retry-After: {s}\r\n"));
    }
    head.push_str("\r\n");
    head.push_str(&body);
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.flush().await;
}

impl Front {
    fn select_tunnel(
        snap: &crate::state::Snapshot,
        c: &Cached,
        host: &str,
        port: u16,
    ) -> Result<Arc<ResourceEntry>, Error> {
        c.m.claims
            .resources
            .iter()
            .filter_map(|rc| snap.resources.get(&rc.id))
            .find(|r| r.host_allowed(host) && r.base_port == port)
            .cloned()
            .ok_or_else(|| {
                Error::new(
                    ErrorCode::PolicyDenied,
                    format!("the mandate covers no resource at {host}:{port}"),
                )
            })
    }

    async fn tunnel(self: &Arc<Self>, mut client: Stream, shutdown: &ShutdownWatch) {
        let gw = self.gw.clone();
        let source: Option<IpAddr> = client
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet().map(|i| i.ip())));
        let cert = crate::mtls::peer_cert_of(client.get_ssl_digest().as_deref());
        let head = match read_head(&mut client).await {
            Ok(h) => h,
            Err(e) => {
                // Refused before anything could be read from the request: recorded all the
                // same (every decision is), under a fresh request id the client also gets.
                let request_id = RequestId::from_caller(None);
                gw.metrics.tunnels.with_label_values(&["deny"]).inc();
                gw.metrics.decisions.with_label_values(&["deny", e.code.as_str()]).inc();
                let info = AuditInfo {
                    request_id,
                    source,
                    kind: "connect",
                    mode: "forward",
                };
                let _ = gw.audit_decision(false, e.code.as_str(), Established::default(), info);
                write_error(&mut client, &e, &request_id).await;
                return;
            }
        };
        let info = AuditInfo {
            request_id: head.request_id,
            source,
            kind: "connect",
            mode: "forward",
        };
        let parsed = head.authority.rsplit_once(':').and_then(|(h, p)| {
            p.parse::<u16>()
                .ok()
                .map(|p| (h.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase(), p))
        });
        let target = parsed.as_ref().map(|(h, p)| Target {
            method: "CONNECT".into(),
            host: h.clone(),
            port: *p,
            https: true,
            path: "/".into(),
            query: None,
        });
        let decided: Result<Allowed, Refused> = async {
            let t = target
                .as_ref()
                .ok_or_else(|| (Error::bad_request("CONNECT target must be host:port"), None, None))?;
            let c = gw
                .authenticate(head.secret.as_deref(), cert.as_deref(), &head.request_id)
                .await
                .map_err(|e| (e, None, None))?;
            // One snapshot for the whole decision.
            let snap = gw.snapshot();
            let r = Self::select_tunnel(&snap, &c, &t.host, t.port).map_err(|e| (e, Some(c.clone()), None))?;
            if r.res.settings.intercept_tls {
                // Each request inside is decided on its own (and its destination checked).
                return Ok((c, r, "intercept".to_string(), None));
            }
            let facts = Facts {
                method: "CONNECT",
                host: &t.host,
                path: "/",
                model: "",
                tool: "",
            };
            let rule = gw
                .authorize(&snap, &c, &r, &facts)
                .map_err(|e| (e, Some(c.clone()), Some(r.clone())))?;
            let addr = gw
                .resolve(&r, &t.host, t.port)
                .await
                .map_err(|e| (e, Some(c.clone()), Some(r.clone())))?;
            Ok((c, r, rule, Some(addr)))
        }
        .await;
        let (c, r, addr) = match decided {
            Ok((c, r, rule, addr)) => {
                let est = Established {
                    mandate: Some(Who::of(&c)),
                    resource: Some(r.res.id),
                    rule: Some(rule),
                    ..Default::default()
                }
                .asked(target.clone());
                if let Err(e) = gw.audit_decision(true, "ok", est, info) {
                    gw.metrics.tunnels.with_label_values(&["deny"]).inc();
                    write_error(&mut client, &e, &head.request_id).await;
                    return;
                }
                (c, r, addr)
            }
            Err((e, c, r)) => {
                gw.metrics.tunnels.with_label_values(&["deny"]).inc();
                gw.metrics.decisions.with_label_values(&["deny", e.code.as_str()]).inc();
                let est = Established {
                    mandate: c.as_deref().map(Who::of),
                    resource: r.map(|r| r.res.id),
                    ..Default::default()
                }
                .asked(target);
                let _ = gw.audit_decision(false, e.code.as_str(), est, info);
                write_error(&mut client, &e, &head.request_id).await;
                return;
            }
        };
        let _ = r;
        let Some(addr) = addr else {
            self.intercept(client, head, target, c, shutdown).await;
            return;
        };
        let cfg = &gw.rt.config.gateway;
        let upstream = match crate::forward::dial(addr, &cfg.upstream_bind, cfg.upstream_connect_timeout).await {
            Ok(s) => s,
            Err(e) => {
                gw.metrics.upstream_errors.with_label_values(&["tunnel_connect"]).inc();
                write_error(&mut client, &e, &head.request_id).await;
                return;
            }
        };
        let _ = upstream.set_nodelay(true);
        // Pingora's stream buffers writes: flush, or the client never sees the 200.
        let established = async {
            client.write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n").await?;
            client.flush().await
        };
        if established.await.is_err() {
            return;
        }
        gw.metrics.tunnels.with_label_values(&["allow"]).inc();
        gw.metrics.allowed.inc();
        relay(gw, client, upstream, head.rest, c).await;
    }
}

impl Front {
    /// Terminate the client's TLS with a certificate for the CONNECT's host and serve the
    /// requests inside through the full request path.
    async fn intercept(
        self: &Arc<Self>,
        mut client: Stream,
        head: Head,
        target: Option<Target>,
        c: Arc<Cached>,
        shutdown: &ShutdownWatch,
    ) {
        let gw = self.gw.clone();
        let Some(t) = target else { return };
        let established = async {
            client.write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n").await?;
            client.flush().await
        };
        if established.await.is_err() {
            return;
        }
        let stream: Stream = if head.rest.is_empty() {
            client
        } else {
            Box::new(crate::mtls::Rewound::new(head.rest, client))
        };
        let ctx = crate::intercept::TunnelCtx {
            secret: head.secret,
            host: t.host.clone(),
            port: t.port,
        };
        let inner = match gw.interceptor.accept(stream, ctx).await {
            Ok(s) => s,
            Err(e) => {
                gw.metrics.tunnels.with_label_values(&["intercept_failed"]).inc();
                tracing::debug!(host = %t.host, error = %e, "interception handshake failed");
                return;
            }
        };
        gw.metrics.tunnels.with_label_values(&["intercept"]).inc();
        let _ = c;
        let mut next = self.proxy.process_new(inner, shutdown).await;
        while let Some(s) = next {
            next = self.proxy.process_new(s, shutdown).await;
        }
    }
}

/// Relay both directions until either side closes, the tunnel idles out, or its mandate is
/// revoked or expires.
async fn relay(gw: Arc<Gateway>, client: Stream, upstream: TcpStream, first: Vec<u8>, c: Arc<Cached>) {
    let idle = gw.rt.config.gateway.tunnel_idle_timeout;
    let last = Arc::new(AtomicI64::new(now_secs()));
    let up_bytes = Arc::new(AtomicU64::new(0));
    let down_bytes = Arc::new(AtomicU64::new(0));
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut ur, mut uw) = upstream.into_split();
    let l1 = last.clone();
    let ub = up_bytes.clone();
    let to_upstream = async move {
        if !first.is_empty() {
            uw.write_all(&first).await?;
            ub.fetch_add(first.len() as u64, Ordering::Relaxed);
        }
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = cr.read(&mut buf).await?;
            if n == 0 {
                let _ = uw.shutdown().await;
                return Ok::<_, std::io::Error>(());
            }
            uw.write_all(&buf[..n]).await?;
            ub.fetch_add(n as u64, Ordering::Relaxed);
            l1.store(now_secs(), Ordering::Relaxed);
        }
    };
    let l2 = last.clone();
    let db = down_bytes.clone();
    let to_client = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = ur.read(&mut buf).await?;
            if n == 0 {
                let _ = cw.shutdown().await;
                return Ok::<_, std::io::Error>(());
            }
            cw.write_all(&buf[..n]).await?;
            cw.flush().await?;
            db.fetch_add(n as u64, Ordering::Relaxed);
            l2.store(now_secs(), Ordering::Relaxed);
        }
    };
    let watch = async {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tick.tick().await;
            if c.is_revoked(&gw.revocations) {
                return "revoked";
            }
            if now_secs() >= c.m.claims.expires_at {
                return "expired";
            }
            if gw.revocations.is_stale() {
                return "revocation_feed_stale";
            }
            if (now_secs() - last.load(Ordering::Relaxed)) as u64 > idle.as_secs() {
                return "idle";
            }
        }
    };
    tokio::pin!(to_upstream, to_client, watch);
    let (mut up_done, mut down_done) = (false, false);
    while !(up_done && down_done) {
        tokio::select! {
            r = &mut to_upstream, if !up_done => { up_done = true; if r.is_err() { break; } }
            r = &mut to_client, if !down_done => { down_done = true; if r.is_err() { break; } }
            why = &mut watch => {
                tracing::info!(reason = why, mandate = %c.m.claims.mandate_id, "tunnel cut");
                break;
            }
        }
    }
    gw.metrics
        .tunnel_bytes
        .with_label_values(&["up"])
        .inc_by(up_bytes.load(Ordering::Relaxed));
    gw.metrics
        .tunnel_bytes
        .with_label_values(&["down"])
        .inc_by(down_bytes.load(Ordering::Relaxed));
}
