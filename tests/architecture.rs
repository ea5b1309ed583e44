//! Architecture invariants checked on the source tree (issue 12): the domain modules (`users`,
//! `quota`, `providers`) do not import `AppState` — they are handed what they need, so they
//! do not sit in a circle of imports through the HTTP layer — and the admission decision lives
//! in `auth` alone (no lockout check outside it).

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn files_under(module: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = Vec::new();
    rust_files(&root.join(module), &mut out);
    let single = root.join(format!("{module}.rs"));
    if single.exists() {
        out.push(single);
    }
    out
}

/// The non-test part of a source file (everything before its `#[cfg(test)]` module).
fn code(p: &Path) -> String {
    let s = std::fs::read_to_string(p).expect("readable source");
    match s.find("#[cfg(test)]") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

#[test]
fn domain_modules_do_not_import_app_state() {
    for module in ["users", "quota", "providers"] {
        for f in files_under(module) {
            assert!(
                !code(&f).contains("AppState"),
                "{} names AppState: hand the module the parts it needs instead",
                f.display()
            );
        }
    }
}

#[test]
fn only_auth_asks_the_lockout() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut all = Vec::new();
    rust_files(&root, &mut all);
    for f in all {
        if f.starts_with(root.join("auth")) {
            continue;
        }
        let c = code(&f);
        for call in ["lockout.refusal(", "lockout.record_failure("] {
            assert!(
                !c.contains(call),
                "{} calls {call}: the lockout is asked and fed only in src/auth",
                f.display()
            );
        }
    }
}
