//! `caracal budgets show`: spend, reservations and what remains of each budget's current
//! window, as the gateways' shared ledger counts them (read-only; budgets are managed through
//! the control API).

use std::process::ExitCode;
use std::time::Duration;

use caracal_shared::http::client::HttpClient;
use clap::{Args, Subcommand};
use serde_json::Value;

#[derive(Args, Debug, Clone)]
pub struct Conn {
    /// The control-plane API.
    #[arg(long, env = "CARACAL_CONTROL_URL", default_value = "http://127.0.0.1:7402")]
    pub control: String,
    /// An admin token with the read scope.
    #[arg(long, env = "CARACAL_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// With a platform token: the tenant to look at.
    #[arg(long, env = "CARACAL_TENANT")]
    pub tenant: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum BudgetsCmd {
    /// Every budget of the tenant (or one, by id) with its current window's usage.
    Show {
        #[command(flatten)]
        conn: Conn,
        budget_id: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

fn row(b: &Value) -> String {
    let u = &b["usage"];
    let n = |v: &Value| v.as_i64().map(|x| x.to_string()).unwrap_or_else(|| "-".into());
    format!(
        "{:<24}  {:<8}  {:>14}  {:>14}  {:>14}  {:>14}  {}",
        b["name"].as_str().unwrap_or(""),
        b["unit"].as_str().unwrap_or(""),
        n(&b["limit"]),
        n(&u["spent"]),
        n(&u["reserved"]),
        n(&u["remaining"]),
        u["resets_at"].as_str().unwrap_or(""),
    )
}

pub fn run(cmd: BudgetsCmd) -> ExitCode {
    let BudgetsCmd::Show { conn, budget_id, json } = cmd;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async move {
        let Some(token) = conn.token.as_deref() else {
            eprintln!("error: an admin token is needed (--token or CARACAL_ADMIN_TOKEN)");
            return ExitCode::from(2);
        };
        let auth = format!("Bearer {token}");
        let mut h = vec![("authorization", auth.as_str())];
        if let Some(t) = &conn.tenant {
            h.push(("x-caracal-tenant", t.as_str()));
        }
        let path = match &budget_id {
            Some(id) => format!("/v1/budgets/{}", caracal_shared::http::form_encode(id)),
            None => "/v1/budgets?limit=200".into(),
        };
        let url = format!("{}{path}", conn.control.trim_end_matches('/'));
        let r = match HttpClient::unrestricted()
            .with_timeout(Duration::from_secs(30))
            .get_with(&url, &h)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                eprintln!("error: cannot reach the control API at {}: {}", conn.control, e.message);
                return ExitCode::from(2);
            }
        };
        let v = r.json_value();
        if !r.status.is_success() {
            eprintln!(
                "error: {} {}: {}",
                r.status.as_u16(),
                v["error"]["code"].as_str().unwrap_or(""),
                v["error"]["message"].as_str().unwrap_or("")
            );
            return ExitCode::from(2);
        }
        if json {
            println!("{v:#}");
            return ExitCode::SUCCESS;
        }
        println!(
            "{:<24}  {:<8}  {:>14}  {:>14}  {:>14}  {:>14}  RESETS",
            "BUDGET", "UNIT", "LIMIT", "SPENT", "RESERVED", "REMAINING"
        );
        match v["items"].as_array() {
            Some(items) => items.iter().for_each(|b| println!("{}", row(b))),
            None => println!("{}", row(&v)),
        }
        ExitCode::SUCCESS
    })
}
