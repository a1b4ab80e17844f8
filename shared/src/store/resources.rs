//! Resources: protected upstreams, how their credential is injected, and the credential itself,
//! sealed at rest and write-only through the API.

use serde::{Deserialize, Serialize};

use super::entity::{Entity, check_version, conflict_on_unique, entity_sql};
use super::{Store, Tx, read, tx_exec};
use crate::crypto::{KeyRing, Secret};
use crate::egress::Cidr;
use crate::error::{Error, ErrorCode, Result};
use crate::ids::{ResourceId, TenantId};
use crate::seal::{Sealed, open, seal};
use crate::time::{Micros, now_micros};

/// How the gateway presents the upstream credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InjectKind {
    /// `Authorization: Bearer <credential>`
    Bearer,
    /// A named header carries the credential (e.g. `x-api-key`).
    Header,
    /// `Authorization: Basic base64(username:password)`
    Basic,
    /// A named query parameter carries the credential.
    Query,
    /// No credential (the upstream needs none).
    None,
}

impl InjectKind {
    fn as_str(self) -> &'static str {
        match self {
            InjectKind::Bearer => "bearer",
            InjectKind::Header => "header",
            InjectKind::Basic => "basic",
            InjectKind::Query => "query",
            InjectKind::None => "none",
        }
    }
    fn parse(s: &str) -> InjectKind {
        match s {
            "bearer" => InjectKind::Bearer,
            "header" => InjectKind::Header,
            "basic" => InjectKind::Basic,
            "query" => InjectKind::Query,
            _ => InjectKind::None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Injection {
    pub kind: InjectKind,
    /// Header or query parameter name (for `header` and `query`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// Price of one model, in micro-units of the budget's currency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPrice {
    /// Model name pattern (`*` any characters).
    pub model: String,
    #[serde(default)]
    pub input_per_mtok: i64,
    #[serde(default)]
    pub output_per_mtok: i64,
    #[serde(default)]
    pub cached_input_per_mtok: i64,
    /// Worst case output tokens when the request sets no `max_tokens`.
    #[serde(default)]
    pub default_max_tokens: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pricing {
    /// Fixed fee per request (micro-units).
    #[serde(default)]
    pub per_request: i64,
    #[serde(default)]
    pub models: Vec<ModelPrice>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceSettings {
    /// Non-public address ranges this upstream may resolve to (e.g. an internal service).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress_allow: Vec<String>,
    /// Terminate TLS for this resource's hosts (HTTPS_PROXY) to apply full L7 control.
    #[serde(default)]
    pub intercept_tls: bool,
    /// Allowed models (JSON `model` field); empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
    /// Allowed operations as `METHOD /path-glob`; empty: any (policy still applies).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub operations: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pricing: Option<Pricing>,
    /// CA bundle (PEM) trusted for this upstream's certificate instead of the system roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_ca_pem: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Resource {
    pub id: ResourceId,
    pub tenant_id: TenantId,
    pub name: String,
    pub description: String,
    /// `https://api.openai.com` (scheme, host, optional port and base path).
    pub base_url: String,
    /// Host names requests to this resource may target (lowercase; `*.` prefix for subdomains).
    pub hosts: Vec<String>,
    pub inject: Injection,
    /// Whether a credential is set (its value is never returned).
    pub has_credential: bool,
    pub credential_version: i64,
    pub settings: ResourceSettings,
    pub version: i64,
    pub created_at: Micros,
    pub updated_at: Micros,
}

type ResourceRow = (
    String,
    String,
    String,
    String,
    String,
    String,
    String,
    Option<String>,
    Option<String>,
    i64,
    String,
    i64,
    i64,
    i64,
);

impl Entity for Resource {
    type Row = ResourceRow;
    const WHAT: &'static str = "resource";
    entity_sql!(
        "resources",
        "id, tenant_id, name, description, base_url, hosts, inject_kind, inject_name, cred_kek_id, cred_version, settings, version, created_at, updated_at"
    );
    fn from_row(r: ResourceRow) -> Result<Resource> {
        Ok(Resource {
            id: ResourceId::parse(&r.0)?,
            tenant_id: TenantId::parse(&r.1)?,
            name: r.2,
            description: r.3,
            base_url: r.4,
            hosts: serde_json::from_str(&r.5).unwrap_or_default(),
            inject: Injection {
                kind: InjectKind::parse(&r.6),
                name: r.7,
            },
            has_credential: r.8.is_some(),
            credential_version: r.9,
            settings: serde_json::from_str(&r.10).unwrap_or_default(),
            version: r.11,
            created_at: r.12,
            updated_at: r.13,
        })
    }
    fn id_string(&self) -> String {
        self.id.to_string()
    }
}

/// Split a base URL into (scheme, host, port, base path); validates it.
pub fn parse_base_url(url: &str) -> Result<(String, String, u16, String)> {
    let uri: http::Uri = url
        .parse()
        .map_err(|_| Error::validation(format!("base_url {url:?} is not a URL")))?;
    let scheme = match uri.scheme_str() {
        Some("https") => "https",
        Some("http") => "http",
        _ => return Err(Error::validation("base_url must be http:// or https://")),
    };
    let host = uri
        .host()
        .ok_or_else(|| Error::validation("base_url has no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    if uri.query().is_some() {
        return Err(Error::validation("base_url cannot have a query"));
    }
    let port = uri.port_u16().unwrap_or(if scheme == "https" { 443 } else { 80 });
    let path = uri.path().trim_end_matches('/').to_string();
    Ok((scheme.to_string(), host, port, path))
}

/// Whether `host` is one of `patterns` (lower-case names, or `*.suffix` for any subdomain),
/// compared without regard to ASCII case and without allocating (the gateway asks per request).
pub fn host_matches(patterns: &[String], host: &str) -> bool {
    let hb = host.as_bytes();
    patterns.iter().any(|h| match h.strip_prefix("*.") {
        Some(suffix) => {
            hb.len() > suffix.len() + 1
                && hb[hb.len() - suffix.len()..].eq_ignore_ascii_case(suffix.as_bytes())
                && hb[hb.len() - suffix.len() - 1] == b'.'
        }
        None => h.as_bytes().eq_ignore_ascii_case(hb),
    })
}

impl Resource {
    pub fn validate(&self) -> Result<()> {
        crate::store::tenants::validate_slug("name", &self.name)?;
        let (_, host, _, _) = parse_base_url(&self.base_url)?;
        if self.hosts.len() > 50 {
            return Err(Error::validation("at most 50 hosts"));
        }
        for h in &self.hosts {
            let bare = h.strip_prefix("*.").unwrap_or(h);
            if bare.is_empty()
                || bare.len() > 253
                || !bare
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b':')
                || h.to_ascii_lowercase() != *h
            {
                return Err(Error::validation(format!(
                    "invalid host {h:?} (lowercase host names, optional \"*.\" prefix)"
                )));
            }
        }
        if !self.hosts.is_empty() && !self.host_allowed(&host) {
            return Err(Error::validation("the base_url host must be one of hosts"));
        }
        match (self.inject.kind, &self.inject.name) {
            (InjectKind::Header | InjectKind::Query, None) => {
                return Err(Error::validation(
                    "inject.name is required for header and query injection",
                ));
            }
            (InjectKind::Header, Some(n)) if http::HeaderName::from_bytes(n.as_bytes()).is_err() => {
                return Err(Error::validation("inject.name is not a valid header name"));
            }
            (InjectKind::Bearer | InjectKind::Basic | InjectKind::None, Some(_)) => {
                return Err(Error::validation(
                    "inject.name only applies to header and query injection",
                ));
            }
            _ => {}
        }
        for c in &self.settings.egress_allow {
            c.parse::<Cidr>()
                .map_err(|e| Error::validation(format!("settings.egress_allow: {e}")))?;
        }
        for op in &self.settings.operations {
            let ok = op
                .split_once(' ')
                .is_some_and(|(m, p)| !m.is_empty() && p.starts_with('/'));
            if !ok {
                return Err(Error::validation(format!(
                    "settings.operations: {op:?} must be \"METHOD /path-glob\""
                )));
            }
        }
        if let Some(pem) = &self.settings.upstream_ca_pem {
            crate::store::agents::parse_ca_pem(pem)?;
        }
        Ok(())
    }

    /// Every host this resource answers for (the base URL host when `hosts` is empty).
    pub fn effective_hosts(&self) -> Vec<String> {
        if !self.hosts.is_empty() {
            return self.hosts.clone();
        }
        parse_base_url(&self.base_url)
            .map(|(_, h, _, _)| vec![h])
            .unwrap_or_default()
    }

    pub fn host_allowed(&self, host: &str) -> bool {
        host_matches(&self.effective_hosts(), host)
    }

    fn aad(tenant: TenantId, id: ResourceId, cred_version: i64) -> Vec<u8> {
        format!("caracal-resource-credential-v1|{tenant}|{id}|{cred_version}").into_bytes()
    }
}

impl Tx {
    pub async fn insert_resource(&mut self, r: &Resource) -> Result<Resource> {
        r.validate()?;
        let now = now_micros();
        tx_exec!(self, sqlx::query(
            "INSERT INTO resources (id, tenant_id, name, description, base_url, hosts, inject_kind, inject_name, cred_version, settings, version, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 0, $9, 1, $10, $10)")
            .bind(r.id.to_string()).bind(r.tenant_id.to_string()).bind(&r.name).bind(&r.description).bind(&r.base_url)
            .bind(serde_json::to_string(&r.hosts)?).bind(r.inject.kind.as_str()).bind(&r.inject.name)
            .bind(serde_json::to_string(&r.settings)?).bind(now))
        .map_err(|e| conflict_on_unique(e, format!("a resource named {:?} already exists", r.name)))?;
        Ok(Resource {
            has_credential: false,
            credential_version: 0,
            version: 1,
            created_at: now,
            updated_at: now,
            ..r.clone()
        })
    }

    pub async fn save_resource(&mut self, r: &Resource, expected: Option<i64>) -> Result<Resource> {
        r.validate()?;
        let cur: Resource = self.get(r.tenant_id, &r.id.to_string()).await?;
        check_version("resource", expected, cur.version)?;
        let now = now_micros();
        let n = tx_exec!(self, sqlx::query(
            "UPDATE resources SET description = $1, base_url = $2, hosts = $3, inject_kind = $4, inject_name = $5, settings = $6,
             version = version + 1, updated_at = $7 WHERE tenant_id = $8 AND id = $9 AND version = $10")
            .bind(&r.description).bind(&r.base_url).bind(serde_json::to_string(&r.hosts)?).bind(r.inject.kind.as_str())
            .bind(&r.inject.name).bind(serde_json::to_string(&r.settings)?).bind(now)
            .bind(r.tenant_id.to_string()).bind(r.id.to_string()).bind(cur.version))?;
        if n != 1 {
            return Err(Error::new(
                ErrorCode::PreconditionFailed,
                "the resource was modified concurrently",
            ));
        }
        Ok(Resource {
            name: cur.name,
            has_credential: cur.has_credential,
            credential_version: cur.credential_version,
            version: cur.version + 1,
            created_at: cur.created_at,
            updated_at: now,
            ..r.clone()
        })
    }

    /// Seal and store the upstream credential (write-only). `None` removes it.
    pub async fn set_resource_credential(
        &mut self,
        seal_ring: &KeyRing,
        tenant: TenantId,
        id: ResourceId,
        value: Option<&Secret>,
    ) -> Result<Resource> {
        let cur: Resource = self.get(tenant, &id.to_string()).await?;
        let next = cur.credential_version + 1;
        let sealed = match value {
            Some(v) => {
                if v.is_empty() || v.len() > 16 * 1024 {
                    return Err(Error::validation("credential must be 1-16384 bytes"));
                }
                Some(seal(seal_ring, &Resource::aad(tenant, id, next), v.expose())?)
            }
            None => None,
        };
        let now = now_micros();
        tx_exec!(self, sqlx::query(
            "UPDATE resources SET cred_kek_id = $1, cred_wrapped_dek = $2, cred_nonce = $3, cred_ciphertext = $4, cred_version = $5,
             version = version + 1, updated_at = $6 WHERE tenant_id = $7 AND id = $8")
            .bind(sealed.as_ref().map(|s| s.kek_id.clone())).bind(sealed.as_ref().map(|s| s.wrapped_dek.clone()))
            .bind(sealed.as_ref().map(|s| s.nonce.clone())).bind(sealed.as_ref().map(|s| s.ciphertext.clone()))
            .bind(next).bind(now).bind(tenant.to_string()).bind(id.to_string()))?;
        Ok(Resource {
            has_credential: sealed.is_some(),
            credential_version: next,
            version: cur.version + 1,
            updated_at: now,
            ..cur
        })
    }
}

impl Store {
    /// Open the resource's credential (gateway only: it holds the seal key).
    pub async fn resource_credential(&self, seal_ring: &KeyRing, r: &Resource) -> Result<Option<Secret>> {
        type Row = (Option<String>, Option<Vec<u8>>, Option<Vec<u8>>, Option<Vec<u8>>, i64);
        let row: Option<Row> = read!(self, p => sqlx::query_as(
            "SELECT cred_kek_id, cred_wrapped_dek, cred_nonce, cred_ciphertext, cred_version FROM resources WHERE tenant_id = $1 AND id = $2")
            .bind(r.tenant_id.to_string()).bind(r.id.to_string()).fetch_optional(p).await)?;
        let Some((Some(kek_id), Some(wrapped_dek), Some(nonce), Some(ciphertext), ver)) = row else {
            return Ok(None);
        };
        let s = Sealed {
            kek_id,
            wrapped_dek,
            nonce,
            ciphertext,
        };
        open(seal_ring, &Resource::aad(r.tenant_id, r.id, ver), &s).map(Some)
    }

    pub async fn resource_by_name(&self, tenant: TenantId, name: &str) -> Result<Resource> {
        let row: Option<ResourceRow> = read!(self, p => sqlx::query_as(
            "SELECT id, tenant_id, name, description, base_url, hosts, inject_kind, inject_name, cred_kek_id, cred_version, settings, version, created_at, updated_at
             FROM resources WHERE tenant_id = $1 AND name = $2").bind(tenant.to_string()).bind(name).fetch_optional(p).await)?;
        row.map(Resource::from_row)
            .transpose()?
            .ok_or_else(|| Error::not_found("resource"))
    }

    /// Every resource of every tenant (gateway snapshot), bounded.
    pub async fn all_resources(&self, max: i64) -> Result<Vec<Resource>> {
        let rows: Vec<ResourceRow> = read!(self, p => sqlx::query_as(
            "SELECT id, tenant_id, name, description, base_url, hosts, inject_kind, inject_name, cred_kek_id, cred_version, settings, version, created_at, updated_at
             FROM resources ORDER BY id LIMIT $1").bind(max).fetch_all(p).await)?;
        rows.into_iter().map(Resource::from_row).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(hosts: &[&str], base: &str) -> Resource {
        Resource {
            id: ResourceId::new(),
            tenant_id: TenantId::new(),
            name: "r".into(),
            description: String::new(),
            base_url: base.into(),
            hosts: hosts.iter().map(|s| s.to_string()).collect(),
            inject: Injection {
                kind: InjectKind::Bearer,
                name: None,
            },
            has_credential: false,
            credential_version: 0,
            settings: Default::default(),
            version: 1,
            created_at: 0,
            updated_at: 0,
        }
    }

    #[test]
    fn hosts_and_validation() {
        let r = res(&["api.openai.com", "*.example.com"], "https://api.openai.com/v1");
        r.validate().unwrap();
        assert!(r.host_allowed("API.openai.com"));
        assert!(r.host_allowed("a.example.com"));
        assert!(!r.host_allowed("example.com"));
        assert!(!r.host_allowed("evilexample.com"));
        assert!(res(&["other.com"], "https://api.openai.com").validate().is_err());
        assert!(res(&[], "ftp://x").validate().is_err());
        assert_eq!(
            res(&[], "http://127.0.0.1:9000/base/").effective_hosts(),
            vec!["127.0.0.1"]
        );
        let mut h = res(&[], "https://x.com");
        h.inject = Injection {
            kind: InjectKind::Header,
            name: None,
        };
        assert!(h.validate().is_err());
        assert_eq!(
            parse_base_url("https://X.com:8443/a/").unwrap(),
            ("https".into(), "x.com".into(), 8443, "/a".into())
        );
    }
}
