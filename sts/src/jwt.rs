//! JWT verification against an issuer's JSON Web Key Set, with `ring`.
//!
//! Accepted algorithms: RS256/384/512, PS256/384/512, ES256, ES384 and EdDSA (Ed25519). The
//! algorithm must agree with the key (`kty`, `crv`, and the key's `alg` when it declares one):
//! `none`, HMAC algorithms (an issuer's key set is public) and mismatches are refused.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::{self, UnparsedPublicKey};
use serde::Deserialize;
use serde_json::Value;

/// Largest JWT accepted.
pub const MAX_JWT_LEN: usize = 16 * 1024;

#[derive(Debug, Clone, Deserialize)]
pub struct Header {
    pub alg: String,
    #[serde(default)]
    pub kid: Option<String>,
    #[serde(default)]
    pub typ: Option<String>,
    #[serde(default)]
    pub crit: Option<Value>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Jwk {
    pub kty: String,
    #[serde(default)]
    pub kid: Option<String>,
    #[serde(default)]
    pub alg: Option<String>,
    #[serde(default, rename = "use")]
    pub use_: Option<String>,
    #[serde(default)]
    pub n: Option<String>,
    #[serde(default)]
    pub e: Option<String>,
    #[serde(default)]
    pub crv: Option<String>,
    #[serde(default)]
    pub x: Option<String>,
    #[serde(default)]
    pub y: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Jwks {
    #[serde(default)]
    pub keys: Vec<Jwk>,
}

impl Jwks {
    pub fn parse(v: &Value) -> Result<Jwks, String> {
        serde_json::from_value(v.clone()).map_err(|e| format!("invalid JWKS: {e}"))
    }

    /// Keys that may verify a token with this header: by `kid` when given, else all.
    pub fn candidates<'a>(&'a self, h: &'a Header) -> impl Iterator<Item = &'a Jwk> + 'a {
        self.keys
            .iter()
            .filter(move |k| h.kid.is_none() || k.kid == h.kid)
            .filter(|k| k.use_.as_deref().is_none_or(|u| u == "sig"))
    }

    pub fn has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid.as_deref() == Some(kid))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwtError {
    Malformed(&'static str),
    UnsupportedAlgorithm(String),
    UnknownKey,
    BadSignature,
}

impl std::fmt::Display for JwtError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JwtError::Malformed(w) => write!(f, "malformed JWT ({w})"),
            JwtError::UnsupportedAlgorithm(a) => write!(f, "JWT algorithm {a:?} is not accepted"),
            JwtError::UnknownKey => f.write_str("no key of the issuer matches the JWT"),
            JwtError::BadSignature => f.write_str("JWT signature is invalid"),
        }
    }
}

/// A JWT split and decoded, signature not yet checked.
pub struct Unverified {
    pub header: Header,
    pub claims: serde_json::Map<String, Value>,
    signing_input: String,
    signature: Vec<u8>,
}

pub fn decode(token: &str) -> Result<Unverified, JwtError> {
    if token.len() > MAX_JWT_LEN {
        return Err(JwtError::Malformed("too long"));
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(JwtError::Malformed("expected three parts"));
    };
    let dec = |x: &str| {
        URL_SAFE_NO_PAD
            .decode(x)
            .map_err(|_| JwtError::Malformed("bad base64url"))
    };
    let header: Header = serde_json::from_slice(&dec(h)?).map_err(|_| JwtError::Malformed("bad header"))?;
    if header.crit.is_some() {
        return Err(JwtError::Malformed("critical header extensions are not supported"));
    }
    let claims: serde_json::Map<String, Value> =
        serde_json::from_slice(&dec(p)?).map_err(|_| JwtError::Malformed("claims are not a JSON object"))?;
    let signature = dec(s)?;
    Ok(Unverified {
        header,
        claims,
        signing_input: format!("{h}.{p}"),
        signature,
    })
}

fn b64(x: &Option<String>) -> Result<Vec<u8>, JwtError> {
    let s = x.as_deref().ok_or(JwtError::Malformed("key component missing"))?;
    URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| JwtError::Malformed("bad key component"))
}

fn verify_one(alg: &str, k: &Jwk, msg: &[u8], sig: &[u8]) -> Result<bool, JwtError> {
    if let Some(ka) = &k.alg
        && ka != alg
    {
        return Ok(false);
    }
    let rsa = |params: &'static signature::RsaParameters| -> Result<bool, JwtError> {
        if k.kty != "RSA" {
            return Ok(false);
        }
        let comps = signature::RsaPublicKeyComponents {
            n: b64(&k.n)?,
            e: b64(&k.e)?,
        };
        Ok(comps.verify(params, msg, sig).is_ok())
    };
    let ec = |crv: &str, alg_: &'static dyn signature::VerificationAlgorithm| -> Result<bool, JwtError> {
        if k.kty != "EC" || k.crv.as_deref() != Some(crv) {
            return Ok(false);
        }
        let mut point = vec![0x04];
        point.extend(b64(&k.x)?);
        point.extend(b64(&k.y)?);
        Ok(UnparsedPublicKey::new(alg_, point).verify(msg, sig).is_ok())
    };
    match alg {
        "RS256" => rsa(&signature::RSA_PKCS1_2048_8192_SHA256),
        "RS384" => rsa(&signature::RSA_PKCS1_2048_8192_SHA384),
        "RS512" => rsa(&signature::RSA_PKCS1_2048_8192_SHA512),
        "PS256" => rsa(&signature::RSA_PSS_2048_8192_SHA256),
        "PS384" => rsa(&signature::RSA_PSS_2048_8192_SHA384),
        "PS512" => rsa(&signature::RSA_PSS_2048_8192_SHA512),
        "ES256" => ec("P-256", &signature::ECDSA_P256_SHA256_FIXED),
        "ES384" => ec("P-384", &signature::ECDSA_P384_SHA384_FIXED),
        "EdDSA" => {
            if k.kty != "OKP" || k.crv.as_deref() != Some("Ed25519") {
                return Ok(false);
            }
            Ok(UnparsedPublicKey::new(&signature::ED25519, b64(&k.x)?)
                .verify(msg, sig)
                .is_ok())
        }
        other => Err(JwtError::UnsupportedAlgorithm(other.to_string())),
    }
}

impl Unverified {
    /// Check the signature with the issuer's keys.
    pub fn verify(&self, jwks: &Jwks) -> Result<(), JwtError> {
        let alg = self.header.alg.as_str();
        if alg.eq_ignore_ascii_case("none") || alg.starts_with("HS") {
            return Err(JwtError::UnsupportedAlgorithm(alg.to_string()));
        }
        let mut tried = false;
        for k in jwks.candidates(&self.header) {
            tried = true;
            if verify_one(alg, k, self.signing_input.as_bytes(), &self.signature)? {
                return Ok(());
            }
        }
        if tried {
            Err(JwtError::BadSignature)
        } else {
            Err(JwtError::UnknownKey)
        }
    }

    pub fn str_claim(&self, name: &str) -> Option<&str> {
        self.claims.get(name).and_then(|v| v.as_str())
    }

    pub fn num_claim(&self, name: &str) -> Option<i64> {
        self.claims
            .get(name)
            .and_then(|v| v.as_i64().or_else(|| v.as_f64().map(|f| f as i64)))
    }

    /// `aud` as a list (a string or an array of strings).
    pub fn audiences(&self) -> Vec<&str> {
        match self.claims.get("aud") {
            Some(Value::String(s)) => vec![s.as_str()],
            Some(Value::Array(a)) => a.iter().filter_map(|v| v.as_str()).collect(),
            _ => vec![],
        }
    }
}
