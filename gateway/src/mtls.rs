//! The gateway's mTLS listener: the forward proxy over TLS (`HTTPS_PROXY=https://gateway`),
//! where a client certificate under a tenant's trusted CA is a way in.
//!
//! The handshake verifies the chain against every tenant's trusted CAs (the set follows the
//! database, see `caracal_shared::tls`); the leaf is kept with the connection. A request with no
//! other credential is then authorized by a mandate the gateway obtains for that certificate
//! from the STS — once per mandate lifetime, in a request signed with the internal key, in which
//! the STS re-checks the chain and maps the certificate to its agent.
//!
//! Pingora cannot peek into TLS streams, so the first bytes of each connection are read here and
//! handed back in front of the stream ([`Rewound`]) — which is how CONNECT works over this
//! listener too.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::listeners::TlsAccept;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::TlsRef;
use pingora::protocols::{GetProxyDigest, GetSocketDigest, GetTimingDigest, SocketDigest, TimingDigest};
use pingora::protocols::{Peek, Shutdown, Ssl, Stream, UniqueID, UniqueIDType};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The verified client certificate of a connection.
pub struct PeerCert {
    pub der: Vec<u8>,
    /// SHA-256 of the DER (cache key; never a secret).
    pub fingerprint: [u8; 32],
}

impl std::fmt::Debug for PeerCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PeerCert({})", hex_prefix(&self.fingerprint))
    }
}

fn hex_prefix(b: &[u8]) -> String {
    b.iter().take(8).map(|x| format!("{x:02x}")).collect()
}

/// Keeps the leaf certificate with the connection's TLS digest.
pub struct CertCapture;

#[async_trait]
impl TlsAccept for CertCapture {
    async fn handshake_complete_callback(&self, tls: &TlsRef) -> Option<Arc<dyn std::any::Any + Send + Sync>> {
        let der = tls.peer_certificate_der()?.to_vec();
        let fingerprint = caracal_shared::crypto::sha256(&der);
        Some(Arc::new(Arc::new(PeerCert { der, fingerprint })))
    }
}

/// The client certificate a stream's TLS handshake verified, if any.
pub fn peer_cert_of(digest: Option<&pingora::protocols::tls::SslDigest>) -> Option<Arc<PeerCert>> {
    digest?.extension.get::<Arc<PeerCert>>().cloned()
}

/// A stream with bytes already read from it put back in front.
#[derive(Debug)]
pub struct Rewound {
    prefix: Vec<u8>,
    pos: usize,
    inner: Stream,
}

impl Rewound {
    pub fn new(prefix: Vec<u8>, inner: Stream) -> Self {
        Rewound { prefix, pos: 0, inner }
    }
}

/// Read up to `n` first bytes of a stream (stops early at EOF), within `timeout`.
pub async fn read_prefix(stream: &mut Stream, n: usize, timeout: Duration) -> std::io::Result<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; n];
    let mut got = 0;
    let read = async {
        while got < n {
            let k = stream.read(&mut buf[got..]).await?;
            if k == 0 {
                break;
            }
            got += k;
        }
        Ok::<_, std::io::Error>(())
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no request in time"))??;
    buf.truncate(got);
    Ok(buf)
}

impl AsyncRead for Rewound {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if self.pos < self.prefix.len() {
            let rest = &self.prefix[self.pos..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            self.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewound {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for Rewound {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for Rewound {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for Rewound {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }
    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }
    fn selected_alpn_proto(&self) -> Option<pingora::protocols::ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for Rewound {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }
}

impl GetProxyDigest for Rewound {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
}

impl GetSocketDigest for Rewound {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }
}

#[async_trait]
impl Peek for Rewound {}
