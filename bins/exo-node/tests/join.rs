//! Joining by code, as a user does it on two devices (two processes with their own homes):
//! `exo-node invite` on a device of the cluster shows the command to run; `exo-node join` with a
//! wrong code is refused and keeps nothing; with the right one the new device keeps the
//! cluster's key and can call the cluster's nodes; an expired invitation lets nobody in.
//!
//! Runs the real default model for the last step: run with `--release` (as CI does).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::time::Duration;

mod common;

use common::{KEY, exo_node};

/// Starts `exo-node invite` for the cluster of [`KEY`] on loopback; returns it and the
/// command it tells the user to run on the new device.
fn invite(expires: &str) -> (Child, String) {
    let home = tempfile::tempdir().unwrap();
    let mut child = exo_node()
        .env("EXO_HOME", home.path())
        .args(["invite", "--cluster-key", KEY, "--listen", "127.0.0.1:0"])
        .args(["--expires", expires])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("exo-node join "), "{line:?}");
    (child, line.trim().to_owned())
}

/// Runs the join command `command` (as printed) with the code replaced by `code` if given,
/// in `home`.
fn join(command: &str, code: Option<&str>, home: &std::path::Path) -> std::process::Output {
    let mut words: Vec<&str> = command.split_whitespace().skip(1).collect();
    if let Some(code) = code {
        words[1] = code;
    }
    exo_node()
        .env("EXO_HOME", home)
        .args(words)
        .output()
        .unwrap()
}

fn stderr_of(child: &mut Child) -> String {
    let mut text = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut text).unwrap();
    text
}

#[test]
fn a_device_joins_with_the_code_and_a_wrong_or_expired_code_gets_nothing() {
    let (mut inviter, command) = invite("60s");
    let code = command.split_whitespace().nth(2).unwrap().to_owned();
    let new_device = tempfile::tempdir().unwrap();

    // A wrong code: refused, and the new device keeps no key.
    let wrong = match code.strip_prefix('0') {
        Some(rest) => format!("1{rest}"),
        None => format!("0{}", &code[1..]),
    };
    let refused = join(&command, Some(&wrong), new_device.path());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(stderr.contains("wrong code"), "{stderr}");
    assert!(!new_device.path().join("cluster.key").exists());

    // The right one: the device keeps the cluster's key, and the invitation ends.
    let joined = join(&command, None, new_device.path());
    let stderr = String::from_utf8_lossy(&joined.stderr);
    assert!(joined.status.success(), "{stderr}");
    let kept = std::fs::read_to_string(new_device.path().join("cluster.key")).unwrap();
    assert_eq!(kept.trim(), KEY);
    let status = common::wait_exit(&mut inviter, Duration::from_secs(10));
    assert!(status.expect("the invitation still runs").success());
    let said = stderr_of(&mut inviter);
    assert!(said.contains("joined cluster"), "{said}");
    assert!(said.contains("wrong join code"), "{said}");

    // With that key alone (no --cluster-key) it calls a node of the cluster over the shard
    // service, whose TLS lets in only the cluster's devices.
    let nodes = common::spawn_nodes(1, "400MiB", KEY, &[]);
    let status = exo_node()
        .env("EXO_HOME", new_device.path())
        .env_remove("EXO_CLUSTER_KEY")
        .args(["status", "--node", &nodes[0].grpc])
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    // A device of another cluster cannot.
    let stranger = tempfile::tempdir().unwrap();
    std::fs::write(
        stranger.path().join("cluster.key"),
        format!("{}\n", "ab".repeat(32)),
    )
    .unwrap();
    let refused = exo_node()
        .env("EXO_HOME", stranger.path())
        .env_remove("EXO_CLUSTER_KEY")
        .args(["status", "--node", &nodes[0].grpc])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(stderr.contains("not of this cluster"), "{stderr}");

    // An invitation that expired lets nobody in.
    let (mut expired, command) = invite("1s");
    let status = common::wait_exit(&mut expired, Duration::from_secs(10));
    assert!(!status.expect("the expired invitation still runs").success());
    let said = stderr_of(&mut expired);
    assert!(said.contains("expired"), "{said}");
    let late = tempfile::tempdir().unwrap();
    let refused = join(&command, None, late.path());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(stderr.contains("no invitation is open"), "{stderr}");
    assert!(!late.path().join("cluster.key").exists());
}
