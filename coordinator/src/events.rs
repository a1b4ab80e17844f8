//! Every coordinator transition is an event on the COORDINATION stream, with its twin on the
//! AUDIT stream (evidence), written to the outbox in the transition's own transaction.

use caracal_shared::bus::streams;
use caracal_shared::error::Result;
use caracal_shared::ids::TenantId;
use caracal_shared::store::Tx;
use caracal_shared::store::outbox::NewEvent;
use serde::Serialize;
use serde_json::{Value, json};

/// Emit `kind` (e.g. `session.started`) with `subject` (the object after the transition).
pub async fn emit<T: Serialize>(tx: &mut Tx, kind: &str, tenant: TenantId, subject: &T, actor: &Value) -> Result<()> {
    let body = json!({ "object": subject, "actor": actor });
    tx.emit(NewEvent::new(streams::COORDINATION, kind, Some(tenant), body.clone()))
        .await?;
    let mut evidence = body;
    evidence["type"] = json!(kind.replace('.', "_"));
    tx.emit(NewEvent::new(streams::AUDIT, kind, Some(tenant), evidence))
        .await?;
    Ok(())
}

/// The actor of transitions the coordinator makes on its own (deadlines, cascades).
pub fn system(reason: &str) -> Value {
    json!({ "system": "coordinator", "reason": reason })
}
