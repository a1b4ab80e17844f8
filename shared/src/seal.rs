//! Envelope encryption for secrets at rest (upstream credentials, signing keys).
//!
//! Each secret gets a fresh 256-bit data key (DEK); the secret is encrypted with AES-256-GCM
//! under the DEK, and the DEK is wrapped with AES-256-GCM under a key-encryption key derived
//! from the `keys.seal` ring (by key id, so KEKs rotate). Both encryptions take the same
//! **associated data**, which names the row the secret belongs to (e.g. tenant, resource and
//! credential version): a ciphertext copied into another row fails to open.

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};

use crate::crypto::{KeyRing, Secret, random_bytes};
use crate::error::{Error, ErrorCode, Result};

#[derive(Clone, PartialEq, Eq)]
pub struct Sealed {
    pub kek_id: String,
    /// nonce (12 bytes) ‖ AES-GCM(KEK, DEK)
    pub wrapped_dek: Vec<u8>,
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

impl std::fmt::Debug for Sealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealed")
            .field("kek_id", &self.kek_id)
            .finish_non_exhaustive()
    }
}

fn kek(ring_: &KeyRing, id: &str) -> Result<LessSafeKey> {
    let secret = ring_
        .secret(id)
        .ok_or_else(|| Error::new(ErrorCode::Internal, format!("seal key {id:?} is not configured")))?;
    // Derive the AES key from the configured secret (any length ≥ 32 bytes) with HMAC.
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.expose());
    let derived = ring::hmac::sign(&k, b"caracal-seal-kek-v1");
    let unbound = UnboundKey::new(&AES_256_GCM, derived.as_ref()).map_err(|_| Error::internal("seal key setup"))?;
    Ok(LessSafeKey::new(unbound))
}

fn nonce12() -> [u8; 12] {
    let mut n = [0u8; 12];
    n.copy_from_slice(&random_bytes(12));
    n
}

/// Encrypt `plaintext` for the row described by `aad`.
pub fn seal(ring_: &KeyRing, aad: &[u8], plaintext: &[u8]) -> Result<Sealed> {
    let dek_bytes = random_bytes(32);
    let dek = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &dek_bytes).map_err(|_| Error::internal("dek"))?);
    let data_nonce = nonce12();
    let mut ciphertext = plaintext.to_vec();
    dek.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(data_nonce),
        Aad::from(aad),
        &mut ciphertext,
    )
    .map_err(|_| Error::internal("seal failed"))?;

    let kek_id = ring_.active_id().to_string();
    let wrap_nonce = nonce12();
    let mut wrapped = dek_bytes;
    let wrap_aad = [b"dek|".as_slice(), aad].concat();
    kek(ring_, &kek_id)?
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(wrap_nonce),
            Aad::from(&wrap_aad),
            &mut wrapped,
        )
        .map_err(|_| Error::internal("wrap failed"))?;
    let mut wrapped_dek = wrap_nonce.to_vec();
    wrapped_dek.extend_from_slice(&wrapped);
    Ok(Sealed {
        kek_id,
        wrapped_dek,
        nonce: data_nonce.to_vec(),
        ciphertext,
    })
}

/// Decrypt a sealed secret; fails if `aad` is not the row it was sealed for.
pub fn open(ring_: &KeyRing, aad: &[u8], s: &Sealed) -> Result<Secret> {
    let fail = || {
        Error::new(
            ErrorCode::Internal,
            "a sealed secret could not be opened (wrong key or wrong row)",
        )
    };
    if s.wrapped_dek.len() < 12 + 16 || s.nonce.len() != 12 {
        return Err(fail());
    }
    let (wn, wct) = s.wrapped_dek.split_at(12);
    let mut wn_arr = [0u8; 12];
    wn_arr.copy_from_slice(wn);
    let mut dek_buf = wct.to_vec();
    let wrap_aad = [b"dek|".as_slice(), aad].concat();
    let dek_bytes = kek(ring_, &s.kek_id)?
        .open_in_place(Nonce::assume_unique_for_key(wn_arr), Aad::from(&wrap_aad), &mut dek_buf)
        .map_err(|_| fail())?
        .to_vec();
    let dek = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &dek_bytes).map_err(|_| fail())?);
    let mut n = [0u8; 12];
    n.copy_from_slice(&s.nonce);
    let mut buf = s.ciphertext.clone();
    let pt = dek
        .open_in_place(Nonce::assume_unique_for_key(n), Aad::from(aad), &mut buf)
        .map_err(|_| fail())?;
    Ok(Secret::new(pt.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_row_binding() {
        let ring_ = KeyRing::generate("s1");
        let s = seal(&ring_, b"ten_1|res_1|1", b"sk-live-123").unwrap();
        assert_eq!(open(&ring_, b"ten_1|res_1|1", &s).unwrap().expose(), b"sk-live-123");
        assert!(open(&ring_, b"ten_1|res_2|1", &s).is_err(), "moved to another row");
        assert!(open(&ring_, b"ten_1|res_1|2", &s).is_err(), "replayed old version");
        let mut t = s.clone();
        t.ciphertext[0] ^= 1;
        assert!(open(&ring_, b"ten_1|res_1|1", &t).is_err());
        assert!(
            open(&KeyRing::generate("s1"), b"ten_1|res_1|1", &s).is_err(),
            "other key"
        );
        assert!(!format!("{s:?}").contains("ciphertext"));
    }
}
