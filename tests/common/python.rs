//! The repository's Python (`.venv`, installed by `scripts/test` from tests/requirements.txt)
//! for the end-to-end tests that drive official SDKs and parsers.

use std::path::{Path, PathBuf};

/// The venv's Python, if it can import `module`. Without it: `None` (the caller skips the test
/// with a note), except under CI (`CI` set), where a missing tool must fail the run.
pub fn venv_python(module: &str) -> Option<PathBuf> {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    let ok = python.exists()
        && std::process::Command::new(&python)
            .args(["-c", &format!("import {module}")])
            .output()
            .is_ok_and(|o| o.status.success());
    if ok {
        return Some(python);
    }
    let hint = "python3 -m venv .venv && .venv/bin/pip install -r tests/requirements.txt";
    if std::env::var_os("CI").is_some() {
        panic!("{} cannot import {module}; run `{hint}`", python.display());
    }
    eprintln!(
        "note: skipping: {} cannot import {module} ({hint})",
        python.display()
    );
    None
}
