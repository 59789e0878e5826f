//! Configuration errors and refusals to start: one clear line, non-zero exit.

use crate::*;
use std::process::Command;

fn serve(args: &[&str]) -> std::process::Output {
    Command::new(keelmq_bin())
        .arg("serve")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn an_unknown_config_key_is_named_and_the_exit_code_is_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "[storage]\nsegment_size = 10\n").unwrap();
    let out = serve(&[
        "--config",
        cfg.to_str().unwrap(),
        "--data-dir",
        dir.path().join("d").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("segment_size") && err.contains("bad.toml"),
        "{err}"
    );

    std::fs::write(&cfg, "[broker]\ndurability_default = \"maybe\"\n").unwrap();
    let out = serve(&["--config", cfg.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("maybe"));

    std::fs::write(&cfg, "[storage]\nsegment_bytes_max = 1000\n").unwrap();
    let out = serve(&[
        "--config",
        cfg.to_str().unwrap(),
        "--data-dir",
        dir.path().join("d").to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("storage.segment_bytes_max"));

    let out = serve(&["--profile", "fastest"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown profile 'fastest'"));
}

#[test]
fn a_data_dir_in_use_is_refused_with_a_hint() {
    let b = Broker::start(1, None);
    let port = free_port().to_string();
    let out = serve(&[
        "--data-dir",
        b.data_dir().to_str().unwrap(),
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--shards",
        "1",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another keelmq process"), "{err}");
    assert!(b.admin().stats().is_ok(), "the first broker is unaffected");
}

#[test]
fn a_taken_port_and_a_changed_shard_count_are_refused() {
    let mut b = Broker::start(1, None);
    let other = tempfile::tempdir().unwrap();
    let out = serve(&[
        "--data-dir",
        other.path().to_str().unwrap(),
        "--listen",
        &b.addr,
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot listen on"));
    assert!(b.stop().success());
    let out = serve(&[
        "--data-dir",
        b.data_dir().to_str().unwrap(),
        "--listen",
        &b.addr,
        "--shards",
        "2",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("created with 1 shards"));
}

#[test]
fn profiles_start_the_broker() {
    for profile in ["low-latency", "throughput", "durable"] {
        let dir = tempfile::tempdir().unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let mut child = Command::new(keelmq_bin())
            .args([
                "serve",
                "--profile",
                profile,
                "--shards",
                "1",
                "--listen",
                &addr,
                "--data-dir",
            ])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut admin = wait_until(
            std::time::Duration::from_secs(20),
            "broker with a profile",
            || keelmq::client::Admin::connect(&addr).ok(),
        );
        let t = admin.create_topic("p", 1, None).unwrap();
        let expected = if profile == "durable" {
            "fsync"
        } else {
            "written"
        };
        assert_eq!(t.durability.name(), expected, "profile {profile}");
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

#[test]
fn a_memlock_limit_too_low_is_a_startup_error_with_the_ulimit_to_set() {
    let dir = tempfile::tempdir().unwrap();
    let script = format!(
        "ulimit -l 600 && exec {} serve --shards 2 --listen 127.0.0.1:{} --data-dir {}",
        keelmq_bin(),
        free_port(),
        dir.path().display()
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("RLIMIT_MEMLOCK") && err.contains("ulimit -l"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one clear line: {err}");
}

#[test]
fn an_unusable_data_dir_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"not a directory").unwrap();
    let out = serve(&[
        "--data-dir",
        file.join("data").to_str().unwrap(),
        "--listen",
        &format!("127.0.0.1:{}", free_port()),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is not usable") && err.contains("plain-file"),
        "{err}"
    );
}
