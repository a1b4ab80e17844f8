//! Mandate signing-key lifecycle: `next` (published, not signing) → `active` (signing) →
//! `retiring` (published until every mandate it signed has expired) → `retired`.
//!
//! A rotation promotes `next` to `active`, demotes `active` to `retiring` (kept for the longest
//! mandate lifetime) and generates a new `next`, so verifiers have seen the next key long before
//! it signs anything. Every change is an event on the sequenced keys stream.

use crate::bus::streams;
use crate::crypto::KeyRing;
use crate::error::{Error, ErrorCode, Result};
use crate::mandate;
use crate::store::Store;
use crate::store::admin::{KeyState, SigningKey};
use crate::store::outbox::NewEvent;
use crate::store::policies::MAX_MANDATE_LIFETIME_SECS;
use crate::time::now_micros;

const LOCK_KEY: i64 = 0x6361_7261_6361_6c02;

async fn lock(tx: &mut crate::store::Tx) -> Result<()> {
    if tx.kind() == crate::config::DbKind::Postgres {
        crate::store::tx_exec!(tx, sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(LOCK_KEY))?;
    }
    Ok(())
}

/// A key lifecycle change: on the sequenced keys stream (verifiers reload) and, as evidence,
/// on the audit stream.
async fn emit(tx: &mut crate::store::Tx, kind: &str, keys: &[SigningKey]) -> Result<()> {
    let body = serde_json::json!({
        "type": kind,
        "keys": keys.iter().map(|k| serde_json::json!({"kid": k.kid, "state": k.state})).collect::<Vec<_>>(),
    });
    tx.emit(NewEvent::new(streams::KEYS, kind, None, body.clone()).sequenced())
        .await?;
    tx.emit(NewEvent::new(streams::AUDIT, kind, None, body)).await?;
    Ok(())
}

/// Make sure an active and a next key exist (first start). Safe to call concurrently.
pub async fn ensure(store: &Store, seal: &KeyRing) -> Result<Vec<SigningKey>> {
    let mut tx = store.begin().await?;
    lock(&mut tx).await?;
    let keys = tx.signing_keys_locked().await?;
    let has_active = keys.iter().any(|k| k.state == KeyState::Active);
    let has_next = keys.iter().any(|k| k.state == KeyState::Next);
    if has_active && has_next {
        tx.rollback().await?;
        return Ok(keys);
    }
    let mut kid = keys.iter().map(|k| k.kid).max().unwrap_or(0);
    let mut added = Vec::new();
    if !has_active {
        kid += 1;
        let (private, public) = mandate::generate_key();
        added.push(
            tx.insert_signing_key(seal, kid, &public, &private, KeyState::Active)
                .await?,
        );
    }
    if !has_next {
        kid += 1;
        let (private, public) = mandate::generate_key();
        added.push(
            tx.insert_signing_key(seal, kid, &public, &private, KeyState::Next)
                .await?,
        );
    }
    emit(&mut tx, "keys.created", &added).await?;
    tx.commit().await?;
    store.signing_keys().await
}

/// Rotate: next → active, active → retiring (until its mandates expire), new next.
pub async fn rotate(store: &Store, seal: &KeyRing) -> Result<Vec<SigningKey>> {
    ensure(store, seal).await?;
    let mut tx = store.begin().await?;
    lock(&mut tx).await?;
    let keys = tx.signing_keys_locked().await?;
    let active = keys.iter().find(|k| k.state == KeyState::Active).cloned();
    let next = keys
        .iter()
        .find(|k| k.state == KeyState::Next)
        .cloned()
        .ok_or_else(|| Error::new(ErrorCode::Internal, "no next key to promote"))?;
    let retire_after = now_micros() + MAX_MANDATE_LIFETIME_SECS * 1_000_000 + 60_000_000;
    if let Some(a) = &active {
        tx.set_key_state(a.kid, KeyState::Retiring, Some(retire_after)).await?;
    }
    tx.set_key_state(next.kid, KeyState::Active, None).await?;
    let kid = keys.iter().map(|k| k.kid).max().unwrap_or(0) + 1;
    let (private, public) = mandate::generate_key();
    tx.insert_signing_key(seal, kid, &public, &private, KeyState::Next)
        .await?;
    let after = tx.signing_keys_locked().await?;
    emit(&mut tx, "keys.rotated", &after).await?;
    tx.commit().await?;
    Ok(after)
}

/// Retire keys whose last mandate has expired. Returns how many were retired.
pub async fn sweep(store: &Store) -> Result<usize> {
    let now = now_micros();
    let mut tx = store.begin().await?;
    lock(&mut tx).await?;
    let keys = tx.signing_keys_locked().await?;
    let due: Vec<&SigningKey> = keys
        .iter()
        .filter(|k| k.state == KeyState::Retiring && k.retire_after.is_some_and(|r| r <= now))
        .collect();
    for k in &due {
        tx.set_key_state(k.kid, KeyState::Retired, None).await?;
    }
    let n = due.len();
    if n > 0 {
        let after = tx.signing_keys_locked().await?;
        emit(&mut tx, "keys.retired", &after).await?;
    }
    tx.commit().await?;
    Ok(n)
}

/// The published key set: every key a verifier may meet (next, active, retiring).
pub fn published(keys: &[SigningKey]) -> Vec<&SigningKey> {
    keys.iter().filter(|k| k.state != KeyState::Retired).collect()
}
