//! Typed, prefixed identifiers.
//!
//! Every id is a UUIDv7 (time-ordered, so cursor pagination by id follows creation order)
//! rendered as `<prefix>_<32 lowercase hex>`, e.g. `agt_0193e0c2d7a87c41b0e3a3f1d2c4b5a6`.
//! The prefix makes ids self-describing in logs and lets parsing reject an id of the wrong
//! kind (an agent id passed where a tenant id is expected is a 400, not a silent miss).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

use crate::error::{Error, ErrorCode};

macro_rules! typed_id {
    ($(#[$m:meta])* $name:ident, $prefix:literal) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Uuid);

        const _: () = assert!($prefix.len() <= 8, "id prefixes are at most 8 bytes");

        impl $name {
            pub const PREFIX: &'static str = $prefix;

            pub fn new() -> Self {
                $name(Uuid::now_v7())
            }

            pub fn from_uuid(u: Uuid) -> Self {
                $name(u)
            }

            pub fn uuid(&self) -> Uuid {
                self.0
            }

            /// The text form (`<prefix>_<32 hex>`) written into `buf`, without allocating.
            pub fn encode<'b>(&self, buf: &'b mut [u8; ID_TEXT_MAX]) -> &'b str {
                encode_prefixed($prefix, &self.0, buf)
            }

            pub fn parse(s: &str) -> Result<Self, Error> {
                parse_prefixed(s, $prefix).map($name).ok_or_else(|| {
                    Error::new(
                        ErrorCode::ValidationFailed,
                        format!("invalid {} id (expected {}_<32 hex>)", stringify!($name), $prefix),
                    )
                })
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.encode(&mut [0; ID_TEXT_MAX]))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(self, f)
            }
        }

        impl FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self, Error> {
                Self::parse(s)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.encode(&mut [0; ID_TEXT_MAX]))
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = std::borrow::Cow::<str>::deserialize(d)?;
                Self::parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

/// Longest text form of an id: a prefix of at most 8 bytes, `_`, 32 hex digits.
pub const ID_TEXT_MAX: usize = 8 + 1 + 32;

fn encode_prefixed<'b>(prefix: &str, u: &Uuid, buf: &'b mut [u8; ID_TEXT_MAX]) -> &'b str {
    let p = prefix.len().min(8);
    buf[..p].copy_from_slice(&prefix.as_bytes()[..p]);
    buf[p] = b'_';
    u.simple().encode_lower(&mut buf[p + 1..p + 33]);
    // ASCII throughout (a prefix literal and hex digits).
    std::str::from_utf8(&buf[..p + 33]).unwrap_or("")
}

fn parse_prefixed(s: &str, prefix: &str) -> Option<Uuid> {
    let rest = s.strip_prefix(prefix)?.strip_prefix('_')?;
    if rest.len() != 32 || !rest.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return None;
    }
    Uuid::try_parse(rest).ok()
}

typed_id!(/// A tenant: the namespace that isolates everything below it.
    TenantId, "ten");
typed_id!(/// An agent: a principal that acts through mandates.
    AgentId, "agt");
typed_id!(/// A workload credential (API key, JWT issuer binding, mTLS identity).
    CredentialId, "cred");
typed_id!(/// A protected upstream resource.
    ResourceId, "res");
typed_id!(/// A policy (its versions are numbered).
    PolicyId, "pol");
typed_id!(/// A grant of scopes on a resource to an agent.
    GrantId, "grt");
typed_id!(/// A budget.
    BudgetId, "bud");
typed_id!(/// A signing key.
    KeyId, "key");
typed_id!(/// An agent session.
    SessionId, "ses");
typed_id!(/// A mandate (its unique id, also carried in the token).
    MandateId, "mdt");
typed_id!(/// An event (bus message), the unit of idempotency.
    EventId, "evt");
typed_id!(/// An admin token.
    AdminTokenId, "adm");
typed_id!(/// A pending human approval.
    ApprovalId, "apr");
typed_id!(/// An invocation between agents.
    InvocationId, "inv");
typed_id!(/// A service lease.
    LeaseId, "lse");
typed_id!(/// A delegation edge.
    DelegationId, "dlg");
typed_id!(/// A trusted JWT issuer.
    JwtIssuerId, "jwi");
typed_id!(/// A trusted mTLS certificate authority.
    MtlsCaId, "mca");
typed_id!(/// A workload identity bound to an agent.
    IdentityId, "idn");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_reject_wrong_prefix() {
        let a = AgentId::new();
        let s = a.to_string();
        assert!(s.starts_with("agt_"));
        assert_eq!(s.len(), 4 + 32);
        assert_eq!(AgentId::parse(&s).unwrap(), a);
        assert!(TenantId::parse(&s).is_err());
        assert!(AgentId::parse("agt_").is_err());
        assert!(AgentId::parse(&s.to_uppercase()).is_err());
        assert!(AgentId::parse(&format!("{s}0")).is_err());
        assert_eq!(s, format!("agt_{}", a.uuid().simple()));
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(json, format!("\"{s}\""));
        assert_eq!(format!("{a:?}"), s);
        assert_eq!(serde_json::from_str::<AgentId>(&json).unwrap(), a);
    }

    #[test]
    fn ids_sort_by_creation() {
        let a = EventId::new();
        let b = EventId::new();
        assert!(a.to_string() < b.to_string());
    }
}
