//! The STS's TLS listener for workloads that authenticate with a client certificate.
//!
//! The server certificate comes from `sts.tls_cert`/`sts.tls_key`. Client certificates are
//! optional at the TLS layer (API keys and JWTs work over this listener too) and verified
//! against every tenant's trusted CA; which CA and which agent is decided afterwards
//! (`authn::principal_from_cert`). The trust anchors follow the database: they are rebuilt
//! every few seconds, so a CA added or removed through the control API takes effect without a
//! restart.

use std::sync::Arc;
use std::time::Duration;

use caracal_shared::error::Result;
use caracal_shared::runtime::Runtime;
use caracal_shared::tls::{DynamicClientVerifier, load_chain, load_key};

use crate::State;

pub async fn server_config(rt: &Runtime, state: Arc<State>) -> Result<Arc<rustls::ServerConfig>> {
    let cfg = &rt.config.sts;
    let (Some(cert_path), Some(key_path)) = (&cfg.tls_cert, &cfg.tls_key) else {
        return Err(caracal_shared::error::Error::validation(
            "sts.tls_listen needs sts.tls_cert and sts.tls_key",
        ));
    };
    let chain = load_chain(cert_path, "sts.tls_cert")?;
    let key = load_key(key_path, "sts.tls_key")?;
    let verifier = DynamicClientVerifier::new(&state.caches.cas().await?)?;
    let v2 = verifier.clone();
    let sd = rt.shutdown.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                _ = sd.wait() => break,
            }
            let refreshed = match state.caches.cas().await {
                Ok(cas) => v2.update(&cas),
                Err(e) => Err(e),
            };
            if let Err(e) = refreshed {
                tracing::warn!(error = %e, "cannot refresh trusted client CAs");
            }
        }
    });
    caracal_shared::tls::server_config(chain, key, verifier)
}
