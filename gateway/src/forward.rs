//! The gateway's own forwarder, for requests whose body it had to read before deciding
//! (a rule looks at the JSON `model` or the MCP tool) when that body is larger than Pingora's
//! replay buffer (64 KiB). It sends the request — body and all — to the egress-checked address
//! over a pooled keep-alive connection (TLS verified against the system roots or the
//! resource's CA) and hands back the response, whose body the caller streams to the client
//! chunk by chunk (never buffered).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use caracal_shared::error::{Error, ErrorCode, Result};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::{TcpSocket, TcpStream};

#[derive(Clone, PartialEq, Eq, Hash)]
struct Key {
    addr: SocketAddr,
    tls: Option<String>,
    ca: Option<usize>,
}

pub struct Forwarder {
    idle: Mutex<HashMap<Key, Vec<SendRequest<Full<Bytes>>>>>,
    system_roots: Arc<rustls::ClientConfig>,
    connect_timeout: Duration,
    bind: Vec<IpAddr>,
}

/// Connect to a checked upstream address, from the configured source address of its family
/// (`gateway.upstream_bind`), within `timeout`.
pub async fn dial(addr: SocketAddr, bind: &[IpAddr], timeout: Duration) -> Result<TcpStream> {
    let connect = async {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(src) = bind.iter().find(|b| b.is_ipv4() == addr.is_ipv4()) {
            socket.bind(SocketAddr::new(*src, 0))?;
        }
        socket.connect(addr).await
    };
    let tcp = tokio::time::timeout(timeout, connect)
        .await
        .map_err(|_| Error::new(ErrorCode::UpstreamTimeout, "connecting to the upstream timed out"))?
        .map_err(|e| {
            Error::new(
                ErrorCode::UpstreamUnreachable,
                format!("cannot connect to the upstream: {e}"),
            )
        })?;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// Returns a connection to the pool once its response has been read completely.
pub struct Lease {
    key: Key,
    sender: Option<SendRequest<Full<Bytes>>>,
    pool: Arc<Forwarder>,
}

impl Lease {
    pub fn release(mut self) {
        if let Some(s) = self.sender.take()
            && !s.is_closed()
        {
            let mut idle = self.pool.idle.lock().unwrap_or_else(|p| p.into_inner());
            let list = idle.entry(self.key.clone()).or_default();
            if list.len() < 32 {
                list.push(s);
            }
        }
    }
}

fn tls_config(roots: rustls::RootCertStore) -> Result<rustls::ClientConfig> {
    let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::internal(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(c)
}

impl Forwarder {
    pub fn new(connect_timeout: Duration, bind: Vec<IpAddr>) -> Result<Arc<Forwarder>> {
        let mut roots = rustls::RootCertStore::empty();
        if pingora::tls::load_platform_certs_incl_env_into_store(&mut roots).is_err() || roots.is_empty() {
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        }
        Ok(Arc::new(Forwarder {
            idle: Mutex::new(HashMap::new()),
            system_roots: Arc::new(tls_config(roots)?),
            connect_timeout,
            bind,
        }))
    }

    /// Send `req` to `addr` (TLS to `sni` when given, verified against `ca_der` when given,
    /// else the system roots).
    pub async fn send(
        self: &Arc<Self>,
        addr: SocketAddr,
        sni: Option<&str>,
        ca_der: Option<&[Vec<u8>]>,
        req: http::Request<Full<Bytes>>,
    ) -> Result<(http::Response<Incoming>, Lease)> {
        let key = Key {
            addr,
            tls: sni.map(String::from),
            ca: ca_der.map(|c| c.as_ptr() as usize),
        };
        let pooled = {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            let mut found = None;
            if let Some(list) = idle.get_mut(&key) {
                while let Some(s) = list.pop() {
                    if !s.is_closed() {
                        found = Some(s);
                        break;
                    }
                }
            }
            found
        };
        let mut sender = match pooled {
            Some(s) => s,
            None => self.connect(addr, sni, ca_der).await?,
        };
        sender.ready().await.map_err(|e| {
            Error::new(
                ErrorCode::UpstreamUnreachable,
                format!("upstream connection failed: {e}"),
            )
        })?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| Error::new(ErrorCode::UpstreamUnreachable, format!("upstream request failed: {e}")))?;
        Ok((
            resp,
            Lease {
                key,
                sender: Some(sender),
                pool: self.clone(),
            },
        ))
    }

    async fn connect(
        &self,
        addr: SocketAddr,
        sni: Option<&str>,
        ca_der: Option<&[Vec<u8>]>,
    ) -> Result<SendRequest<Full<Bytes>>> {
        let tcp = dial(addr, &self.bind, self.connect_timeout).await?;
        let unreachable = |e: hyper::Error| {
            Error::new(
                ErrorCode::UpstreamUnreachable,
                format!("upstream handshake failed: {e}"),
            )
        };
        match sni {
            None => {
                let (s, conn) = http1::handshake(TokioIo::new(tcp)).await.map_err(unreachable)?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                Ok(s)
            }
            Some(host) => {
                let cfg = match ca_der {
                    None => self.system_roots.clone(),
                    Some(ders) => {
                        let mut roots = rustls::RootCertStore::empty();
                        for d in ders {
                            let _ = roots.add(rustls_pki_types::CertificateDer::from(d.clone()));
                        }
                        Arc::new(tls_config(roots)?)
                    }
                };
                let name = ServerName::try_from(host.to_string())
                    .map_err(|_| Error::bad_request("invalid upstream host name"))?;
                let tls = tokio_rustls::TlsConnector::from(cfg)
                    .connect(name, tcp)
                    .await
                    .map_err(|e| Error::new(ErrorCode::UpstreamUnreachable, format!("upstream TLS failed: {e}")))?;
                let (s, conn) = http1::handshake(TokioIo::new(tls)).await.map_err(unreachable)?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                Ok(s)
            }
        }
    }
}
