//! The profile-guided build (issue 18): `.cargo/rustc-pgo`, the rustc wrapper named by
//! `.cargo/config.toml`, adds the profile to optimised x86_64 Linux builds and to nothing else,
//! and the profile it names is the one whose id Cargo sees (so a new profile rebuilds).
//!
//! The wrapper is run with `echo` in rustc's place: what it prints is the command rustc would
//! have been given.

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn profile() -> PathBuf {
    root().join(".cargo/pgo/llm-gatekeeper.profdata")
}

/// The arguments rustc would get when the wrapper is called with `args`.
fn wrapped(args: &[&str]) -> String {
    let out = Command::new(root().join(".cargo/rustc-pgo"))
        .arg("echo")
        .args(args)
        .output()
        .expect("run .cargo/rustc-pgo");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim_end()
        .to_string()
}

fn host_is_x86_64_linux() -> bool {
    cfg!(all(target_arch = "x86_64", target_os = "linux"))
}

#[test]
fn an_optimised_build_gets_the_profile_by_its_absolute_path() {
    let args = [
        "--crate-name",
        "tokio",
        "-C",
        "opt-level=3",
        "-C",
        "lto=fat",
    ];
    let got = wrapped(&args);
    if !host_is_x86_64_linux() {
        assert_eq!(got, args.join(" "));
        return;
    }
    let flag = format!("-Cprofile-use={}", profile().display());
    assert_eq!(got, format!("{} {flag}", args.join(" ")));
    assert!(Path::new(flag.trim_start_matches("-Cprofile-use=")).is_absolute());
}

#[test]
fn other_invocations_pass_through_unchanged() {
    for args in [
        // A debug or test build, and a build script in a release build.
        &["--crate-name", "llm_gatekeeper", "-C", "opt-level=0"][..],
        &["--crate-name", "build_script_build", "-C", "debuginfo=0"],
        // Cargo asking rustc about itself.
        &["-vV"],
        // Another target.
        &["-C", "opt-level=3", "--target", "aarch64-unknown-linux-gnu"],
        &["-C", "opt-level=3", "--target=aarch64-unknown-linux-gnu"],
        // Taking a profile (bench/pgo), or given one already.
        &["-C", "opt-level=3", "-Cprofile-generate=/tmp/p"],
        &["-C", "opt-level=3", "-C", "profile-use=/tmp/other.profdata"],
    ] {
        assert_eq!(wrapped(args), args.join(" "), "{args:?}");
    }
}

#[test]
fn the_environment_reaches_rustc_whole() {
    // Cargo gives an integration test the binary's path in a variable whose name is not a
    // shell name; `env!` reads it in rustc, behind the wrapper.
    let out = Command::new(root().join(".cargo/rustc-pgo"))
        .arg("env")
        .env("CARGO_BIN_EXE_llm-gatekeeper", "/x/llm-gatekeeper")
        .output()
        .expect("run .cargo/rustc-pgo");
    assert!(out.status.success(), "{out:?}");
    let env = String::from_utf8(out.stdout).expect("utf-8");
    assert!(
        env.lines()
            .any(|l| l == "CARGO_BIN_EXE_llm-gatekeeper=/x/llm-gatekeeper"),
        "{env}"
    );
}

#[test]
fn cargo_sees_the_id_of_the_profile_the_wrapper_uses() {
    let bytes = std::fs::read(profile()).expect(".cargo/pgo/llm-gatekeeper.profdata (bench/pgo)");
    // An indexed LLVM profile (what `llvm-profdata merge` writes), not a raw one.
    assert_eq!(&bytes[..8], b"\xfflprofi\x81", "not an indexed profile");
    let id = &hex::encode(Sha256::digest(&bytes))[..16];
    let config = std::fs::read_to_string(root().join(".cargo/config.toml")).expect("config");
    assert!(
        config.contains(&format!("gatekeeper_pgo=\"{id}\"")),
        ".cargo/config.toml does not carry the profile's id {id}: run bench/pgo, which sets both"
    );
    let trained =
        std::fs::read_to_string(root().join(".cargo/pgo/trained-on")).expect("trained-on");
    assert!(
        trained.lines().any(|l| l.starts_with("source ")),
        "{trained}"
    );
}
