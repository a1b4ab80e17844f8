//! The README's quickstart, executed literally: `caracal dev` on a fresh data directory, then
//! the shell block between `<!-- quickstart:start -->` and `<!-- quickstart:end -->` run by
//! bash with `set -euo pipefail`. Every step must print what the README promises. (Listeners
//! on port 0: the block only uses the addresses `caracal dev` writes to `.caracal/demo.env`.)

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn quickstart_block() -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let start = readme
        .find("<!-- quickstart:start -->")
        .expect("quickstart start marker");
    let end = readme.find("<!-- quickstart:end -->").expect("quickstart end marker");
    let block = &readme[start..end];
    let body_start = block.find("```sh\n").expect("a sh block") + "```sh\n".len();
    let body_end = block[body_start..].find("```").expect("end of block") + body_start;
    block[body_start..body_end].to_string()
}

#[test]
fn the_readme_quickstart_works_as_written() {
    let dir = std::env::temp_dir().join(format!("caracal-quickstart-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_caracal"));
    let mut dev = Command::new(bin)
        .arg("dev")
        .current_dir(&dir)
        .env("CARACAL_DEMO_PORT", "0")
        .env("CARACAL__CONTROL__LISTEN", "127.0.0.1:0")
        .env("CARACAL__STS__LISTEN", "127.0.0.1:0")
        .env("CARACAL__COORDINATOR__LISTEN", "127.0.0.1:0")
        .env("CARACAL__AUDIT__LISTEN", "127.0.0.1:0")
        .env("CARACAL__GATEWAY__LISTEN", "127.0.0.1:0")
        .env("CARACAL__GATEWAY__ADMIN_LISTEN", "127.0.0.1:0")
        .env("CARACAL__AUDIT__HEAD_INTERVAL", "100ms")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let env_file = dir.join(".caracal/demo.env");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !env_file.exists() {
        assert!(Instant::now() < deadline, "caracal dev wrote no demo.env");
        assert!(dev.try_wait().unwrap().is_none(), "caracal dev exited");
        std::thread::sleep(Duration::from_millis(100));
    }
    let script = format!("set -euo pipefail\n{}", quickstart_block());
    let path = format!(
        "{}:{}",
        bin.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("bash")
        .args(["-c", &script])
        .current_dir(&dir)
        .env("PATH", path)
        .env_remove("CARACAL_ADMIN_TOKEN")
        .output()
        .unwrap();
    let _ = Command::new("kill").args(["-INT", &dev.id().to_string()]).status();
    let _ = dev.wait();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "the quickstart failed:\n{text}\n{err}");
    let mut at = 0;
    for expected in [
        "\"credential_injected_by_gateway\":true",
        "policy_denied",
        "budget_exhausted",
        "chatcmpl-demo",
        "demo-tokens",
        "revoked:",
        "mandate_revoked",
        "decision",
        "OK: every entry matches",
    ] {
        match text[at..].find(expected) {
            Some(i) => at += i + expected.len(),
            None => panic!("the quickstart did not print {expected:?} (in order):\n{text}\n{err}"),
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}
