//! TLS interception for `HTTPS_PROXY`: for resources configured with `intercept_tls`, the
//! gateway answers the CONNECT, terminates the client's TLS with a certificate for the
//! requested host issued on the fly by its own CA (cached, short-lived), and runs every request
//! inside the tunnel through the full request path (policy, budgets, credential injection,
//! audit) before re-encrypting to the real upstream (verified against the system roots or the
//! resource's CA).
//!
//! The CA lives in one file (`gateway.intercept_ca`, default `<data_dir>/intercept-ca.json`,
//! mode 0600), generated on first start; its key never leaves the gateway. `caracal ca export`
//! prints the certificates agents must trust (current and previous, during a rotation);
//! `caracal ca rotate` makes a new CA and keeps the old certificate in the bundle.
//!
//! The requests inside a tunnel carry no `Proxy-Authorization`: the CONNECT's credential is
//! kept in a per-tunnel context the proxy finds through an opaque handle in the decrypted
//! stream's TLS digest.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use caracal_shared::error::{Error, ErrorCode, Result};
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::SslDigest;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream, TimingDigest,
    UniqueID, UniqueIDType,
};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The CA file: the current CA (certificate and key) and previous certificates (still trusted
/// by agents during a rotation).
#[derive(Serialize, Deserialize)]
pub struct CaFile {
    pub common_name: String,
    pub cert_pem: String,
    pub key_pem: String,
    #[serde(default)]
    pub previous: Vec<String>,
}

impl std::fmt::Debug for CaFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaFile")
            .field("common_name", &self.common_name)
            .finish_non_exhaustive()
    }
}

fn ca_params(cn: &str) -> Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(|e| Error::internal(e.to_string()))?;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.distinguished_name.push(DnType::CommonName, cn);
    p.distinguished_name.push(DnType::OrganizationName, "Caracal");
    Ok(p)
}

impl CaFile {
    /// A new CA named with generation `n`.
    pub fn generate(n: u32) -> Result<CaFile> {
        let cn = format!(
            "Caracal TLS interception CA {n} ({})",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let mut p = ca_params(&cn)?;
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::hours(1);
        p.not_after = now + time::Duration::days(3650);
        let key = KeyPair::generate().map_err(|e| Error::internal(e.to_string()))?;
        let cert = p.self_signed(&key).map_err(|e| Error::internal(e.to_string()))?;
        Ok(CaFile {
            common_name: cn,
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            previous: Vec::new(),
        })
    }

    pub fn load(path: &Path) -> Result<CaFile> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::new(
                ErrorCode::ValidationFailed,
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        serde_json::from_str(&text).map_err(|e| {
            Error::new(
                ErrorCode::ValidationFailed,
                format!("{} is not a CA file: {e}", path.display()),
            )
        })
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d).map_err(|e| Error::internal(e.to_string()))?;
        }
        let tmp = path.with_extension("tmp");
        let text = serde_json::to_string_pretty(self)?;
        {
            use std::io::Write;
            let mut o = std::fs::OpenOptions::new();
            o.write(true).create(true).truncate(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                o.mode(0o600);
            }
            let mut f = o
                .open(&tmp)
                .map_err(|e| Error::internal(format!("{}: {e}", tmp.display())))?;
            f.write_all(text.as_bytes())
                .map_err(|e| Error::internal(e.to_string()))?;
            f.sync_all().map_err(|e| Error::internal(e.to_string()))?;
        }
        std::fs::rename(&tmp, path).map_err(|e| Error::internal(e.to_string()))
    }

    /// Load `path`, creating a CA there when it does not exist.
    pub fn load_or_create(path: &Path) -> Result<CaFile> {
        if path.exists() {
            return CaFile::load(path);
        }
        let ca = CaFile::generate(1)?;
        ca.save(path)?;
        tracing::info!(path = %path.display(), "created the TLS interception CA");
        Ok(ca)
    }

    /// Replace the CA with a new one; the old certificate stays in the exported bundle.
    pub fn rotate(path: &Path) -> Result<CaFile> {
        let old = CaFile::load(path)?;
        let n = old
            .common_name
            .split_whitespace()
            .nth(4)
            .and_then(|s| s.parse::<u32>().ok())
            .unwrap_or(1)
            + 1;
        let mut new = CaFile::generate(n)?;
        new.previous = std::iter::once(old.cert_pem).chain(old.previous).take(2).collect();
        new.save(path)?;
        Ok(new)
    }

    /// Every certificate agents should trust (current first).
    pub fn bundle(&self) -> String {
        std::iter::once(self.cert_pem.as_str())
            .chain(self.previous.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join("")
    }
}

/// Where the CA file is, by configuration.
pub fn ca_path(cfg: &caracal_shared::config::Config) -> PathBuf {
    cfg.gateway
        .intercept_ca
        .clone()
        .unwrap_or_else(|| cfg.data_dir.join("intercept-ca.json"))
}

/// Issues (and caches) server certificates for intercepted hosts.
pub struct Interceptor {
    issuer: Issuer<'static, KeyPair>,
    configs: moka::sync::Cache<String, Arc<rustls::ServerConfig>>,
    /// Live tunnels: handle → what the CONNECT established.
    tunnels: Mutex<HashMap<[u8; 16], Arc<TunnelCtx>>>,
}

/// What a CONNECT established, for the requests inside its tunnel.
pub struct TunnelCtx {
    pub secret: Option<String>,
    pub host: String,
    pub port: u16,
}

impl std::fmt::Debug for TunnelCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelCtx")
            .field("host", &self.host)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

/// The marker in the TLS digest of an intercepted stream.
const DIGEST_MARK: &str = "caracal-intercepted";

impl Interceptor {
    pub fn new(ca: &CaFile) -> Result<Interceptor> {
        let key = KeyPair::from_pem(&ca.key_pem).map_err(|e| Error::validation(format!("interception CA key: {e}")))?;
        let issuer = Issuer::new(ca_params(&ca.common_name)?, key);
        Ok(Interceptor {
            issuer,
            configs: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(3600))
                .build(),
            tunnels: Mutex::new(HashMap::new()),
        })
    }

    /// A TLS server configuration presenting a certificate for `host` (valid one day).
    pub fn server_config(&self, host: &str) -> Result<Arc<rustls::ServerConfig>> {
        if let Some(c) = self.configs.get(host) {
            return Ok(c);
        }
        let mut p = CertificateParams::new(vec![host.to_string()]).map_err(|e| Error::validation(e.to_string()))?;
        p.distinguished_name.push(DnType::CommonName, host);
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::hours(1);
        p.not_after = now + time::Duration::days(1);
        p.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().map_err(|e| Error::internal(e.to_string()))?;
        let cert = p
            .signed_by(&key, &self.issuer)
            .map_err(|e| Error::internal(e.to_string()))?;
        let chain = vec![rustls_pki_types::CertificateDer::from(cert.der().to_vec())];
        let key =
            rustls_pki_types::PrivateKeyDer::Pkcs8(rustls_pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()));
        let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::internal(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| Error::internal(e.to_string()))?;
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let cfg = Arc::new(cfg);
        self.configs.insert(host.to_string(), cfg.clone());
        Ok(cfg)
    }

    /// Terminate the client's TLS on `stream` and return the decrypted stream, registered
    /// with `ctx` until it is dropped.
    pub async fn accept(self: &Arc<Self>, stream: Stream, ctx: TunnelCtx) -> Result<Stream> {
        let cfg = self.server_config(&ctx.host)?;
        let tls = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_rustls::TlsAcceptor::from(cfg).accept(stream),
        )
        .await
        .map_err(|_| Error::bad_request("the TLS handshake inside the tunnel timed out"))?
        .map_err(|e| Error::bad_request(format!("the TLS handshake inside the tunnel failed: {e}")))?;
        let handle: [u8; 16] = *uuid::Uuid::new_v4().as_bytes();
        self.tunnels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(handle, Arc::new(ctx));
        let digest = Arc::new(SslDigest::new(DIGEST_MARK, "TLS", None, None, handle.to_vec()));
        Ok(Box::new(Intercepted {
            inner: tls,
            digest,
            handle,
            owner: self.clone(),
        }))
    }

    /// The tunnel a decrypted stream belongs to (from its TLS digest).
    pub fn tunnel_of(&self, digest: Option<&SslDigest>) -> Option<Arc<TunnelCtx>> {
        let d = digest?;
        if d.cipher != DIGEST_MARK {
            return None;
        }
        let handle: [u8; 16] = d.cert_digest.as_slice().try_into().ok()?;
        self.tunnels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&handle)
            .cloned()
    }
}

/// The decrypted side of an intercepted tunnel, as a Pingora stream.
pub struct Intercepted {
    inner: tokio_rustls::server::TlsStream<Stream>,
    digest: Arc<SslDigest>,
    handle: [u8; 16],
    owner: Arc<Interceptor>,
}

impl std::fmt::Debug for Intercepted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Intercepted")
    }
}

impl Drop for Intercepted {
    fn drop(&mut self) {
        self.owner
            .tunnels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.handle);
    }
}

impl AsyncRead for Intercepted {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Intercepted {
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
impl Shutdown for Intercepted {
    async fn shutdown(&mut self) {
        use tokio::io::AsyncWriteExt;
        let _ = AsyncWriteExt::shutdown(&mut self.inner).await;
    }
}

impl UniqueID for Intercepted {
    fn id(&self) -> UniqueIDType {
        self.inner.get_ref().0.id()
    }
}

impl Ssl for Intercepted {
    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        Some(self.digest.clone())
    }
}

impl GetTimingDigest for Intercepted {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_ref().0.get_timing_digest()
    }
}

impl GetProxyDigest for Intercepted {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_ref().0.get_proxy_digest()
    }
}

impl GetSocketDigest for Intercepted {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_ref().0.get_socket_digest()
    }
}

impl Peek for Intercepted {}
