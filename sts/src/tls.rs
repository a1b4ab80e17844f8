//! The STS's TLS listener for workloads that authenticate with a client certificate.
//!
//! The server certificate comes from `sts.tls_cert`/`sts.tls_key`. Client certificates are
//! optional at the TLS layer (API keys and JWTs work over this listener too) and verified
//! against every tenant's trusted CA; which CA and which agent is decided afterwards
//! (`authn::principal_from_cert`). The trust anchors follow the database: they are rebuilt
//! every few seconds, so a CA added or removed through the control API takes effect without a
//! restart.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use caracal_shared::error::{Error, Result};
use caracal_shared::runtime::Runtime;
use rustls::DistinguishedName;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};

use crate::State;

#[derive(Debug)]
struct DynamicVerifier {
    inner: RwLock<Option<Arc<dyn ClientCertVerifier>>>,
    algs: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for DynamicVerifier {
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
        let inner = self.inner.read().unwrap().clone();
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

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

async fn build_inner(state: &State) -> Result<Option<Arc<dyn ClientCertVerifier>>> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in state.caches.cas().await?.iter() {
        if let Ok(ders) = caracal_shared::store::agents::parse_ca_pem(&ca.ca_pem) {
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

pub async fn server_config(rt: &Runtime, state: Arc<State>) -> Result<Arc<rustls::ServerConfig>> {
    let cfg = &rt.config.sts;
    let (Some(cert_path), Some(key_path)) = (&cfg.tls_cert, &cfg.tls_key) else {
        return Err(Error::validation("sts.tls_listen needs sts.tls_cert and sts.tls_key"));
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
        .map_err(|e| Error::validation(format!("sts.tls_cert: {e}")))?
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| Error::validation(format!("sts.tls_cert: {e}")))?;
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| Error::validation(format!("sts.tls_key: {e}")))?;
    let verifier = Arc::new(DynamicVerifier {
        inner: RwLock::new(build_inner(&state).await?),
        algs: provider().signature_verification_algorithms,
    });
    let v2 = verifier.clone();
    let sd = rt.shutdown.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                _ = sd.wait() => break,
            }
            match build_inner(&state).await {
                Ok(inner) => *v2.inner.write().unwrap() = inner,
                Err(e) => tracing::warn!(error = %e, "cannot refresh trusted client CAs"),
            }
        }
    });
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::internal(format!("TLS: {e}")))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| Error::validation(format!("sts TLS certificate: {e}")))?;
    Ok(Arc::new(config))
}
