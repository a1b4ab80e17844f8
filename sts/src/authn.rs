//! Who is asking: a workload authenticated by a Caracal API key, a JWT from a trusted issuer,
//! or an mTLS client certificate under a trusted CA. Each resolves to a tenant, an agent and
//! the credential used (mandates record it, so revoking the credential revokes them).

use std::sync::Arc;
use std::time::{Duration, Instant};

use caracal_shared::egress::{EgressGuard, EgressPolicy};
use caracal_shared::http::ClientCert;
use caracal_shared::http::client::HttpClient;
use caracal_shared::ids::{JwtIssuerId, TenantId};
use caracal_shared::store::agents::{Agent, JwtIssuer, MatchKind};
use caracal_shared::time::{now_micros, now_secs};
use moka::future::Cache;

use crate::State;
use crate::jwt::{self, Jwks};
use crate::oauth::OAuthError;

/// An authenticated workload.
#[derive(Debug, Clone)]
pub struct Principal {
    pub tenant: TenantId,
    pub agent: Agent,
    /// The credential or identity id (`cred_…`, `idn_…`).
    pub credential: String,
    pub via: &'static str,
}

impl Principal {
    /// A stable, non-secret name for the requester (approvals bind to it).
    pub fn requester(&self) -> String {
        hex::encode(caracal_shared::crypto::sha256(
            format!("{}|{}", self.agent.id, self.credential).as_bytes(),
        ))
    }
}

/// Fetched JWKS per issuer, refreshed on an unknown key id (at most once per `min_refresh`, so
/// tokens with random key ids cannot make the STS hammer an issuer).
pub struct JwksCache {
    fetched: Cache<JwtIssuerId, (Instant, Arc<Jwks>)>,
    client: HttpClient,
    min_refresh: Duration,
}

impl JwksCache {
    pub fn new(egress_allow: Vec<caracal_shared::egress::Cidr>, min_refresh: Duration) -> Self {
        let guard = EgressGuard::system(EgressPolicy::allowing(egress_allow));
        JwksCache {
            fetched: Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(600))
                .build(),
            client: HttpClient::new(Arc::new(guard)).with_timeout(Duration::from_secs(5)),
            min_refresh,
        }
    }

    async fn fetch(&self, url: &str) -> std::result::Result<Jwks, String> {
        let r = self
            .client
            .get(url)
            .await
            .map_err(|e| format!("cannot fetch the issuer's keys: {}", e.message))?;
        if !r.status.is_success() {
            return Err(format!("the issuer's key endpoint answered {}", r.status));
        }
        Jwks::parse(&r.json_value())
    }

    /// Keys for `issuer`; `need_kid` forces a refresh when the cached set lacks it.
    pub async fn keys(&self, issuer: &JwtIssuer, need_kid: Option<&str>) -> std::result::Result<Arc<Jwks>, String> {
        if let Some(inline) = &issuer.jwks {
            return Jwks::parse(inline).map(Arc::new);
        }
        let url = issuer.jwks_url.as_deref().ok_or("the issuer has no keys configured")?;
        if let Some((at, set)) = self.fetched.get(&issuer.id).await {
            let missing = need_kid.is_some_and(|k| !set.has_kid(k));
            if !missing || at.elapsed() < self.min_refresh {
                return Ok(set);
            }
        }
        let set = Arc::new(self.fetch(url).await?);
        self.fetched.insert(issuer.id, (Instant::now(), set.clone())).await;
        Ok(set)
    }
}

impl State {
    pub async fn principal_from_api_key(&self, secret: &str) -> std::result::Result<Principal, OAuthError> {
        let bad = || OAuthError::invalid_client("unknown, revoked or expired API key");
        let key = self.caches.api_key(&self.pepper, secret).await?.ok_or_else(bad)?;
        if !key.usable_at(now_micros()) {
            return Err(bad());
        }
        let agent = self.caches.agent(key.tenant_id, key.agent_id).await?;
        Ok(Principal {
            tenant: key.tenant_id,
            agent,
            credential: key.id.to_string(),
            via: "api_key",
        })
    }

    pub async fn principal_from_jwt(&self, token: &str) -> std::result::Result<Principal, OAuthError> {
        let grant = |m: String| OAuthError::invalid_grant(m);
        let t = jwt::decode(token).map_err(|e| grant(e.to_string()))?;
        let iss = t
            .str_claim("iss")
            .ok_or_else(|| grant("the JWT has no iss claim".into()))?
            .to_string();
        let issuers = self.caches.issuers(&iss).await?;
        if issuers.is_empty() {
            return Err(grant("the JWT's issuer is not trusted".into()));
        }
        let now = now_secs();
        let mut last = String::from("the JWT is not valid for any trusting tenant");
        for issuer in issuers.iter() {
            let keys = match self.jwks.keys(issuer, t.header.kid.as_deref()).await {
                Ok(k) => k,
                Err(e) => {
                    last = e;
                    continue;
                }
            };
            if let Err(e) = t.verify(&keys) {
                last = e.to_string();
                continue;
            }
            let skew = issuer.max_skew_secs;
            match t.num_claim("exp") {
                Some(exp) if exp + skew > now => {}
                Some(_) => {
                    last = "the JWT has expired".into();
                    continue;
                }
                None => {
                    last = "the JWT has no exp claim".into();
                    continue;
                }
            }
            if t.num_claim("nbf").is_some_and(|nbf| nbf - skew > now) {
                last = "the JWT is not valid yet (nbf)".into();
                continue;
            }
            if t.num_claim("iat").is_some_and(|iat| iat - skew > now) {
                last = "the JWT was issued in the future (iat)".into();
                continue;
            }
            let auds = t.audiences();
            if !auds.iter().any(|a| issuer.audiences.iter().any(|x| x == a)) {
                last = "the JWT's audience is not accepted".into();
                continue;
            }
            let Some(subject) = t.str_claim(&issuer.subject_claim) else {
                last = format!("the JWT has no {} claim", issuer.subject_claim);
                continue;
            };
            let Some(ident) = self
                .rt
                .store
                .identity_for(&issuer.id.to_string(), MatchKind::Subject, subject)
                .await?
            else {
                last = "no agent is bound to this JWT subject".into();
                continue;
            };
            let agent = self.caches.agent(ident.tenant_id, ident.agent_id).await?;
            return Ok(Principal {
                tenant: ident.tenant_id,
                agent,
                credential: ident.id.to_string(),
                via: "jwt",
            });
        }
        Err(grant(last))
    }

    pub async fn principal_from_cert(&self, cert: Option<&ClientCert>) -> std::result::Result<Principal, OAuthError> {
        let cert = cert.ok_or_else(|| {
            OAuthError::invalid_client("no client certificate was presented (use the STS's TLS listener)")
        })?;
        let names = cert_names(&cert.der)
            .ok_or_else(|| OAuthError::invalid_client("the client certificate cannot be parsed"))?;
        let leaf = rustls_pki_types::CertificateDer::from(cert.der.clone());
        let ee = webpki::EndEntityCert::try_from(&leaf)
            .map_err(|_| OAuthError::invalid_client("the client certificate cannot be parsed"))?;
        let now = rustls_pki_types::UnixTime::now();
        for ca in self.caches.cas().await?.iter() {
            let Ok(ders) = caracal_shared::store::agents::parse_ca_pem(&ca.ca_pem) else {
                continue;
            };
            let cas: Vec<rustls_pki_types::CertificateDer<'static>> =
                ders.into_iter().map(rustls_pki_types::CertificateDer::from).collect();
            let anchors: Vec<_> = cas
                .iter()
                .filter_map(|c| webpki::anchor_from_trusted_cert(c).ok())
                .collect();
            let verified = ee
                .verify_for_usage(
                    webpki::ALL_VERIFICATION_ALGS,
                    &anchors,
                    &[],
                    now,
                    webpki::KeyUsage::client_auth(),
                    None,
                    None,
                )
                .is_ok();
            if !verified {
                continue;
            }
            let candidates = names
                .uris
                .iter()
                .map(|u| (MatchKind::SanUri, u))
                .chain(names.dns.iter().map(|d| (MatchKind::SanDns, d)))
                .chain(names.cn.iter().map(|c| (MatchKind::Cn, c)));
            for (kind, subject) in candidates {
                if let Some(ident) = self.rt.store.identity_for(&ca.id.to_string(), kind, subject).await?
                    && ident.tenant_id == ca.tenant_id
                {
                    let agent = self.caches.agent(ident.tenant_id, ident.agent_id).await?;
                    return Ok(Principal {
                        tenant: ident.tenant_id,
                        agent,
                        credential: ident.id.to_string(),
                        via: "mtls",
                    });
                }
            }
        }
        Err(OAuthError::invalid_client(
            "the client certificate is not bound to an agent under a trusted CA",
        ))
    }
}

pub struct CertNames {
    pub uris: Vec<String>,
    pub dns: Vec<String>,
    pub cn: Option<String>,
}

/// SAN URIs, SAN DNS names and the subject CN of a certificate.
pub fn cert_names(der: &[u8]) -> Option<CertNames> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let mut uris = Vec::new();
    let mut dns = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::URI(u) => uris.push(u.to_string()),
                GeneralName::DNSName(d) => dns.push(d.to_string()),
                _ => {}
            }
        }
    }
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok())
        .map(String::from);
    Some(CertNames { uris, dns, cn })
}

/// Hint of who a failed attempt claimed to be, for per-(source, client) limits. Never secret.
pub fn client_hint(subject_type: &str, token: &str) -> String {
    let digest = hex::encode(&caracal_shared::crypto::sha256(token.as_bytes())[..8]);
    match subject_type {
        crate::oauth::TT_API_KEY => format!("key:{digest}"),
        crate::oauth::TT_JWT | crate::oauth::TT_ID_TOKEN => match jwt::decode(token) {
            Ok(t) => format!(
                "jwt:{}:{}",
                t.str_claim("iss").unwrap_or(""),
                t.str_claim("sub").unwrap_or("")
            ),
            Err(_) => format!("jwt:{digest}"),
        },
        _ => format!("other:{digest}"),
    }
}
