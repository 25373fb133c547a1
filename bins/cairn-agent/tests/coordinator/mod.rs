//! What the tests that run a coordinator beside agents share (`fleet.rs`, `two_phase.rs`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

/// The coordinator's executable, next to the agent's, built if needed (cargo builds the bins of
/// the package under test only). It is built as `cargo test --workspace --all-targets` builds
/// it, with the same features, so under that command (the suite's) nothing is compiled again;
/// `-p cairn-coordinator` alone would resolve other features and rebuild half the workspace.
pub fn coordinator_exe() -> PathBuf {
    let exe = Path::new(env!("CARGO_BIN_EXE_cairn-agent")).with_file_name("cairn-coordinator");
    let release = exe.parent().and_then(|p| p.file_name()).is_some_and(|n| n == "release");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build.args(["build", "--quiet", "--workspace", "--all-targets"]);
    // What cargo sets for this test is not the suite's environment: ring's build script
    // reruns when CARGO_MANIFEST_DIR changes, and all of rustls after it.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        let per_test = ["CARGO_PKG_", "CARGO_BIN_", "CARGO_MANIFEST_", "CARGO_CRATE_"];
        if per_test.iter().any(|p| key.starts_with(p))
            || ["CARGO_PRIMARY_PACKAGE", "CARGO_TARGET_TMPDIR", "CARGO_RUSTC_CURRENT_DIR"]
                .contains(&key.as_ref())
        {
            build.env_remove(key.as_ref());
        }
    }
    if release {
        build.arg("--release");
    }
    let status = build.status().unwrap();
    assert!(status.success(), "building cairn-coordinator for the test");
    assert!(exe.exists(), "{} is missing", exe.display());
    exe
}

/// A child process, killed and reaped when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}
