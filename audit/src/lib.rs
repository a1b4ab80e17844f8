//! caracal-audit service library.

use std::sync::Arc;

use caracal_shared::http::Router;
use caracal_shared::runtime::Runtime;
use tokio::net::TcpListener;

/// Service state shared by every request handler.
pub struct State {
    pub rt: Runtime,
}

pub fn router() -> Router<State> {
    Router::new()
}

/// Serve until the runtime's shutdown is triggered, then drain.
pub async fn serve(rt: Runtime, listener: TcpListener) -> std::io::Result<()> {
    let state = Arc::new(State { rt: rt.clone() });
    rt.serve("audit", router(), state, listener).await
}
