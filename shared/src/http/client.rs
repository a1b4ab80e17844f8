//! The outbound HTTP/1.1 client used between services, by the CLI and by tests.
//!
//! Every connection goes through the [`EgressGuard`]: the host is resolved, every address is
//! checked, and the connection is made to a checked address (never re-resolved). HTTPS uses
//! rustls with the Mozilla roots or a configured CA, optionally presenting a client
//! certificate. Requests can be signed for service-to-service authentication.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::TcpStream;

use super::signing::RequestSigner;
use crate::egress::{EgressGuard, EgressPolicy};
use crate::error::{Error, ErrorCode, Result};

#[derive(Debug)]
pub struct ClientResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl ClientResponse {
    pub fn json<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_slice(&self.body)
            .map_err(|e| Error::new(ErrorCode::UpstreamUnreachable, format!("invalid JSON response: {e}")))
    }

    pub fn json_value(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Turn a non-2xx answer carrying a Caracal error body into an [`Error`].
    pub fn error_for_status(self) -> Result<ClientResponse> {
        if self.status.is_success() {
            return Ok(self);
        }
        let v = self.json_value();
        let code = v["error"]["code"]
            .as_str()
            .and_then(ErrorCode::from_str_code)
            .unwrap_or(if self.status.is_server_error() {
                ErrorCode::Unavailable
            } else {
                ErrorCode::BadRequest
            });
        let msg = v["error"]["message"]
            .as_str()
            .map(|s| s.to_string())
            .unwrap_or_else(|| format!("HTTP {}", self.status));
        let mut e = Error::new(code, msg);
        if let Some(d) = v["error"].get("details") {
            e = e.with_details(d.clone());
        }
        Err(e)
    }
}

#[derive(Clone)]
pub struct HttpClient {
    guard: Arc<EgressGuard>,
    tls: Arc<rustls::ClientConfig>,
    signer: Option<RequestSigner>,
    timeout: Duration,
    max_response: usize,
}

/// A rustls client config trusting the Mozilla roots (plus `extra_ca_pem` when given).
pub fn tls_client_config(
    extra_ca_pem: Option<&[u8]>,
    client_identity: Option<(
        Vec<rustls_pki_types::CertificateDer<'static>>,
        rustls_pki_types::PrivateKeyDer<'static>,
    )>,
) -> Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(pem) = extra_ca_pem {
        use rustls_pki_types::pem::PemObject;
        for c in rustls_pki_types::CertificateDer::pem_slice_iter(pem) {
            let c = c.map_err(|_| Error::validation("invalid CA certificate PEM"))?;
            roots
                .add(c)
                .map_err(|e| Error::validation(format!("unusable CA certificate: {e}")))?;
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::internal(format!("TLS setup: {e}")))?
        .with_root_certificates(roots);
    match client_identity {
        None => Ok(builder.with_no_client_auth()),
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| Error::validation(format!("unusable client certificate: {e}"))),
    }
}

impl HttpClient {
    pub fn new(guard: Arc<EgressGuard>) -> Self {
        HttpClient {
            guard,
            tls: Arc::new(tls_client_config(None, None).expect("default TLS config")),
            signer: None,
            timeout: Duration::from_secs(30),
            max_response: 64 * 1024 * 1024,
        }
    }

    /// A client that may reach any address (CLI and tests talking to configured endpoints).
    pub fn unrestricted() -> Self {
        HttpClient::new(Arc::new(EgressGuard::system(EgressPolicy {
            allow_all: true,
            ..Default::default()
        })))
    }

    pub fn with_tls(mut self, tls: rustls::ClientConfig) -> Self {
        self.tls = Arc::new(tls);
        self
    }

    pub fn with_signer(mut self, signer: RequestSigner) -> Self {
        self.signer = Some(signer);
        self
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub async fn get(&self, url: &str) -> Result<ClientResponse> {
        self.request(Method::GET, url, &[], Bytes::new()).await
    }

    pub async fn get_with(&self, url: &str, headers: &[(&str, &str)]) -> Result<ClientResponse> {
        self.request(Method::GET, url, headers, Bytes::new()).await
    }

    pub async fn send_json<T: Serialize + ?Sized>(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: &T,
    ) -> Result<ClientResponse> {
        let mut h: Vec<(&str, &str)> = headers.to_vec();
        h.push(("content-type", "application/json"));
        let bytes = serde_json::to_vec(body).map_err(|e| Error::internal(e.to_string()))?;
        self.request(method, url, &h, Bytes::from(bytes)).await
    }

    pub async fn post_form(
        &self,
        url: &str,
        headers: &[(&str, &str)],
        form: &[(&str, &str)],
    ) -> Result<ClientResponse> {
        let body = form
            .iter()
            .map(|(k, v)| format!("{}={}", super::form_encode(k), super::form_encode(v)))
            .collect::<Vec<_>>()
            .join("&");
        let mut h: Vec<(&str, &str)> = headers.to_vec();
        h.push(("content-type", "application/x-www-form-urlencoded"));
        self.request(Method::POST, url, &h, Bytes::from(body)).await
    }

    /// Send one request on a fresh connection to a guard-checked address.
    pub async fn request(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<ClientResponse> {
        match tokio::time::timeout(self.timeout, self.request_inner(method, url, headers, body)).await {
            Ok(r) => r,
            Err(_) => Err(Error::new(
                ErrorCode::UpstreamTimeout,
                format!("request to {} timed out", host_of(url)),
            )),
        }
    }

    async fn request_inner(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<ClientResponse> {
        let uri: Uri = url
            .parse()
            .map_err(|_| Error::bad_request(format!("invalid URL {url:?}")))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(Error::bad_request("URL scheme must be http or https")),
        };
        let host = uri
            .host()
            .ok_or_else(|| Error::bad_request("URL has no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let target = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/").to_string();

        let addrs = self.guard.resolve_checked(&host, port).await?;
        let stream = connect_any(&addrs).await?;

        let mut req = http::Request::builder().method(method.clone()).uri(target.as_str());
        let authority = uri.authority().map(|a| a.as_str()).unwrap_or(&host).to_string();
        {
            let h = req.headers_mut().expect("builder has headers");
            h.insert(
                header::HOST,
                HeaderValue::from_str(&authority).map_err(|_| Error::bad_request("invalid host"))?,
            );
            for (k, v) in headers {
                let name =
                    HeaderName::from_bytes(k.as_bytes()).map_err(|_| Error::bad_request("invalid header name"))?;
                let value = HeaderValue::from_str(v).map_err(|_| Error::bad_request("invalid header value"))?;
                h.append(name, value);
            }
            if let Some(s) = &self.signer {
                s.sign(h, method.as_str(), &target, &body);
            }
        }
        let req = req
            .body(Full::new(body))
            .map_err(|e| Error::bad_request(format!("invalid request: {e}")))?;

        let resp = if https {
            let name = ServerName::try_from(host.clone()).map_err(|_| Error::bad_request("invalid TLS server name"))?;
            let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect(name, stream)
                .await
                .map_err(|e| {
                    Error::new(
                        ErrorCode::UpstreamUnreachable,
                        format!("TLS handshake with {host} failed: {e}"),
                    )
                })?;
            send(TokioIo::new(tls), req).await?
        } else {
            send(TokioIo::new(stream), req).await?
        };
        let (parts, body) = resp.into_parts();
        let body = Limited::new(body, self.max_response)
            .collect()
            .await
            .map_err(|_| Error::new(ErrorCode::UpstreamUnreachable, "failed to read the response body"))?
            .to_bytes();
        Ok(ClientResponse {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }
}

async fn connect_any(addrs: &[SocketAddr]) -> Result<TcpStream> {
    let mut last = None;
    for a in addrs {
        match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(a)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Ok(Err(e)) => last = Some(e.to_string()),
            Err(_) => last = Some("connect timed out".into()),
        }
    }
    Err(Error::new(
        ErrorCode::UpstreamUnreachable,
        format!("cannot connect: {}", last.unwrap_or_else(|| "no address".into())),
    ))
}

async fn send<I>(io: I, req: http::Request<Full<Bytes>>) -> Result<http::Response<hyper::body::Incoming>>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| Error::new(ErrorCode::UpstreamUnreachable, format!("HTTP handshake failed: {e}")))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender
        .send_request(req)
        .await
        .map_err(|e| Error::new(ErrorCode::UpstreamUnreachable, format!("request failed: {e}")))
}

fn host_of(url: &str) -> String {
    url.parse::<Uri>()
        .ok()
        .and_then(|u| u.host().map(|h| h.to_string()))
        .unwrap_or_default()
}
