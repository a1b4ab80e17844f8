//! TLS server pieces shared by the listeners that accept client certificates (the STS's and
//! the gateway's): a client-certificate verifier whose trust anchors follow the database (every
//! tenant's trusted mTLS CAs, rebuilt without a restart), and PEM loading.
//!
//! Which CA and which agent a certificate maps to is decided after the handshake, against the
//! tenant's identities; the TLS layer only proves possession of a key certified by a trusted CA.

use std::sync::{Arc, RwLock};

use rustls::DistinguishedName;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};

use crate::error::{Error, Result};
use crate::store::agents::{MtlsCa, parse_ca_pem};

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Verifies client certificates against the current set of trusted CAs. Client certificates
/// are optional at the TLS layer (other credentials work over the same listener); a presented
/// certificate must chain to a trusted CA.
#[derive(Debug)]
pub struct DynamicClientVerifier {
    inner: RwLock<Option<Arc<dyn ClientCertVerifier>>>,
    algs: WebPkiSupportedAlgorithms,
}

impl DynamicClientVerifier {
    pub fn new(cas: &[MtlsCa]) -> Result<Arc<Self>> {
        Ok(Arc::new(DynamicClientVerifier {
            inner: RwLock::new(build(cas)?),
            algs: provider().signature_verification_algorithms,
        }))
    }

    /// Replace the trust anchors.
    pub fn update(&self, cas: &[MtlsCa]) -> Result<()> {
        let inner = build(cas)?;
        *self.inner.write().unwrap_or_else(|p| p.into_inner()) = inner;
        Ok(())
    }
}

fn build(cas: &[MtlsCa]) -> Result<Option<Arc<dyn ClientCertVerifier>>> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in cas {
        if let Ok(ders) = parse_ca_pem(&ca.ca_pem) {
            for d in ders {
                let _ = roots.add(CertificateDer::from(d));
            }
        }
    }
    if roots.is_empty() {
        return Ok(None);
    }
    let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| Error::internal(format!("client verifier: {e}")))?;
    Ok(Some(v))
}

impl ClientCertVerifier for DynamicClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner()).clone();
        match inner {
            Some(v) => v.verify_client_cert(end_entity, intermediates, now),
            None => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// A certificate chain from a PEM file (`what` names the setting in errors).
pub fn load_chain(path: &std::path::Path, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| Error::validation(format!("{what}: {e}")))?
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| Error::validation(format!("{what}: {e}")))?;
    if chain.is_empty() {
        return Err(Error::validation(format!(
            "{what}: no certificate in {}",
            path.display()
        )));
    }
    Ok(chain)
}

/// A private key from a PEM file.
pub fn load_key(path: &std::path::Path, what: &str) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| Error::validation(format!("{what}: {e}")))
}

/// A server configuration presenting `chain`/`key` and verifying clients with `verifier`.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    verifier: Arc<dyn ClientCertVerifier>,
) -> Result<Arc<rustls::ServerConfig>> {
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::internal(format!("TLS: {e}")))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| Error::validation(format!("TLS certificate: {e}")))?;
    Ok(Arc::new(config))
}
