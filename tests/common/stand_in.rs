//! The stand-in for Azure OpenAI a user can start (`cargo run --example fake-azure`),
//! built and run by the tests of the quick start, with the proxy pointed at it.

use super::{Running, BIN};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// The prefixes of the variables cargo sets for a test it runs.
const CARGO_SET: [&str; 7] = [
    "CARGO_MANIFEST_",
    "CARGO_PKG_",
    "CARGO_CRATE_",
    "CARGO_BIN_",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_TARGET_TMPDIR",
    "CARGO_RUSTC_CURRENT_DIR",
];

/// The example's binary, built if it is not (`cargo test --test fake_azure` builds
/// only this test's targets). Examples land in `examples/` beside this test's `deps/`.
fn fake_azure_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    // Without the variables cargo set for this test: a dependency's build script that
    // watches one (ring's watches CARGO_MANIFEST_DIR) would be rebuilt, and again by
    // the next `cargo test`.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if CARGO_SET.iter().any(|p| name.starts_with(p)) {
            build.env_remove(&*name);
        }
    }
    let built = build
        .args(["build", "--quiet", "--example", "fake-azure"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .unwrap();
    assert!(built.success(), "cargo build --example fake-azure failed");
    profile_dir.join("examples/fake-azure")
}

/// The stand-in running on a free port; killed when dropped.
pub struct FakeAzure {
    child: Child,
    pub url: String,
    pub banner: String,
}

impl FakeAzure {
    pub fn start() -> FakeAzure {
        let mut child = Command::new(fake_azure_bin())
            .arg("0")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut banner = String::new();
        let url = loop {
            let line = lines
                .next()
                .expect("fake-azure ended before listening")
                .unwrap();
            banner.push_str(&line);
            banner.push('\n');
            if let Some(rest) = line.split("listening on ").nth(1) {
                break rest.split_whitespace().next().unwrap().to_string();
            }
        };
        FakeAzure { child, url, banner }
    }

    /// The proxy as the quick start runs it (`ENVIRONMENT=fake`, the example
    /// configuration), pointed at this stand-in, on a free port.
    pub fn proxy(&self) -> Running {
        Running::start(
            Command::new(BIN)
                .env_clear()
                .env("ENVIRONMENT", "fake")
                .env("FAKE_AZURE_URL", &self.url)
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .args(["--port", "0"]),
        )
    }
}

impl Drop for FakeAzure {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
