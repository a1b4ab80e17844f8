//! The `caracal` binary as a newcomer runs it.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use caracal_shared::http::client::HttpClient;

fn caracal() -> Command {
    Command::new(env!("CARGO_BIN_EXE_caracal"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_serves_all_five_services_and_stops_cleanly_on_ctrl_c() {
    let dir = std::env::temp_dir().join(format!("caracal-dev-{}", uuid::Uuid::new_v4().simple()));
    let started = Instant::now();
    let mut child = caracal()
        .arg("dev")
        .arg("--data-dir")
        .arg(&dir)
        .env("CARACAL_DEMO_PORT", "0")
        .env("CARACAL__CONTROL__LISTEN", "127.0.0.1:0")
        .env("CARACAL__STS__LISTEN", "127.0.0.1:0")
        .env("CARACAL__COORDINATOR__LISTEN", "127.0.0.1:0")
        .env("CARACAL__AUDIT__LISTEN", "127.0.0.1:0")
        .env("CARACAL__GATEWAY__LISTEN", "127.0.0.1:0")
        .env("CARACAL__GATEWAY__ADMIN_LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Read the banner: "  <name>   http://<addr>".
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut addrs = std::collections::BTreeMap::new();
    while addrs.len() < 6 {
        let line = rx.recv_timeout(Duration::from_secs(30)).expect("banner");
        let parts: Vec<&str> = line.split_whitespace().collect();
        if parts.len() == 2 && parts[1].starts_with("http://") {
            addrs.insert(parts[0].to_string(), parts[1].to_string());
        }
    }
    let c = HttpClient::unrestricted();
    for name in ["control", "sts", "coordinator", "audit", "gateway-admin"] {
        let r = c.get(&format!("{}/healthz", addrs[name])).await.unwrap();
        assert_eq!(r.status, 200, "{name}");
        let r = c.get(&format!("{}/readyz", addrs[name])).await.unwrap();
        assert_eq!(r.status, 200, "{name} ready");
        let r = c.get(&format!("{}/metrics", addrs[name])).await.unwrap();
        assert!(r.text().contains("caracal_build_info"), "{name} metrics");
    }
    assert!(started.elapsed() < Duration::from_secs(30), "up within seconds");
    // The proxy refuses what carries no mandate (fail closed).
    let gw = addrs["gateway"].trim_start_matches("http://").to_string();
    let r = c.get(&format!("http://{gw}/anything")).await.unwrap();
    assert_eq!(r.status, 407);

    Command::new("kill")
        .arg("-INT")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "caracal dev did not stop on Ctrl-C");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "clean exit, got {status:?}");
    // The data directory holds the database and the generated (private) keys.
    assert!(dir.join("caracal.db").exists());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("dev-keys.toml"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "dev keys are private");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn malformed_config_exits_non_zero_listing_every_problem() {
    let dir = std::env::temp_dir().join(format!("caracal-cfg-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.toml");
    std::fs::write(
        &path,
        "[database]\nurl = \"mysql://nope\"\n[bus]\nbackend = \"kafka\"\n[control]\nlisten = \"not-an-address\"\n[gatway]\nthreads = 1\n",
    )
    .unwrap();
    let out = caracal()
        .arg("check-config")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "database.url",
        "bus.backend",
        "control.listen",
        "gatway.threads: unknown setting",
    ] {
        assert!(err.contains(needle), "missing {needle} in {err}");
    }
    // The same check runs before serving.
    let out = caracal()
        .arg("serve")
        .arg("control")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = caracal()
        .arg("check-config")
        .arg("--config")
        .arg(dir.join("missing.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let _ = std::fs::remove_dir_all(dir);
}

/// A service that cannot run (here: the coordinator without `keys.pepper`) takes the process
/// down with a non-zero exit and says why, instead of leaving it up half-working.
#[test]
fn a_service_that_cannot_start_exits_non_zero() {
    let dir = std::env::temp_dir().join(format!("caracal-nostart-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("c.toml");
    std::fs::write(
        &path,
        format!(
            "data_dir = \"{d}\"\n[database]\nurl = \"sqlite://{d}/c.db\"\n[coordinator]\nlisten = \"127.0.0.1:0\"\n\
             [keys.bus]\nactive = \"b1\"\n[keys.bus.keys]\n\"b1\" = \"hex:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\"\n",
            d = dir.display()
        ),
    )
    .unwrap();
    let mut child = caracal()
        .args(["serve", "coordinator", "--config"])
        .arg(&path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the process kept running without its service");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(status.code(), Some(1), "{text}");
    assert!(text.contains("keys.pepper"), "{text}");
    let _ = std::fs::remove_dir_all(dir);
}

/// `caracal ca export` prints the interception CA agents must trust (created on first use,
/// key kept private); `caracal ca rotate` makes a new one and keeps the old in the bundle.
#[test]
fn ca_export_and_rotate() {
    let dir = std::env::temp_dir().join(format!("caracal-ca-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("c.toml");
    std::fs::write(&path, format!("data_dir = \"{}\"\n", dir.display())).unwrap();
    let run = |args: &[&str]| {
        let o = caracal().args(args).arg("--config").arg(&path).output().unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).to_string(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };
    let (code, pem, err) = run(&["ca", "export"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(pem.matches("BEGIN CERTIFICATE").count(), 1);
    assert!(!pem.contains("PRIVATE KEY"), "the key never leaves the CA file");
    let file = dir.join("intercept-ca.json");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    }
    let (code, again, _) = run(&["ca", "export"]);
    assert_eq!((code, again.as_str()), (Some(0), pem.as_str()), "stable until rotated");
    let (code, _, err) = run(&["ca", "rotate"]);
    assert_eq!(code, Some(0), "{err}");
    let (_, bundle, _) = run(&["ca", "export"]);
    assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 2);
    assert!(
        bundle.ends_with(&pem) && !bundle.starts_with(&pem),
        "new first, the old one still trusted"
    );
    let _ = std::fs::remove_dir_all(dir);
}
