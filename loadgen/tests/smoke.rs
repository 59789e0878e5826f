//! The loadgen against a broker it spawns itself: the JSON report carries
//! every field and no acknowledged message is lost.

use std::process::Command;

/// Runs the loadgen with `args` (plus `--json`), checks it succeeded, and
/// returns its JSON report.
fn loadgen_json(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_keelmq-loadgen"))
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "loadgen failed: {stderr}");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stderr}"))
}

#[test]
fn spawn_run_reports_json_with_nothing_lost() {
    // The broker binary sits beside the loadgen's in the target dir.
    let v = loadgen_json(&[
        "--spawn",
        "--rate",
        "2000",
        "--size",
        "100",
        "--duration",
        "2",
        "--warmup",
        "0.5",
    ]);
    for key in [
        "sent",
        "acked",
        "received",
        "lost",
        "duplicates",
        "errors",
        "rate_msgs",
        "mb_per_s",
        "ack_p50_us",
        "ack_p99_us",
        "ack_p999_us",
        "e2e_p50_us",
        "e2e_p99_us",
        "e2e_p999_us",
        "e2e_p9999_us",
        "e2e_max_us",
        "steal_pct",
        "cpu_busy_pct",
    ] {
        assert!(v.get(key).is_some(), "missing {key}: {v}");
    }
    assert_eq!(v["lost"], 0);
    assert_eq!(v["errors"], 0);
    assert_eq!(v["sent"], 5000, "open loop: 2.5 s at 2000/s");
    assert_eq!(v["acked"], 5000);
    assert_eq!(v["received"], 5000);
    assert!(v["e2e_p50_us"].as_u64().unwrap() > 0);
    assert_eq!(v["mode"], "busy-poll");
}

#[test]
fn an_omb_workload_file_runs() {
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path().join("w.yaml");
    std::fs::write(
        &w,
        "name: smoke omb\ntopics: 1\npartitionsPerTopic: 4\nmessageSize: 64\nsubscriptionsPerTopic: 1\nconsumerPerSubscription: 2\nproducerRate: 2000\ntestDurationMinutes: 0.03\nwarmupDurationMinutes: 0.01\n",
    )
    .unwrap();
    let v = loadgen_json(&["--spawn", "--workload", w.to_str().unwrap()]);
    assert_eq!(v["lost"], 0);
    assert_eq!(v["workload"], "smoke omb");
    assert_eq!(v["sent"], 4800, "(1.8 s + 0.6 s) at 2000/s");
    assert_eq!(v["received"], 4800);
}

#[test]
fn blocking_clients_run_a_thread_each_and_lose_nothing() {
    let v = loadgen_json(&[
        "--spawn",
        "--client-mode",
        "blocking",
        "--queues",
        "2",
        "--producers",
        "2",
        "--consumers",
        "2",
        "--rate",
        "2000",
        "--duration",
        "2",
        "--warmup",
        "0.5",
    ]);
    assert_eq!(v["mode"], "blocking");
    assert_eq!(v["lost"], 0);
    assert_eq!(v["errors"], 0);
    assert_eq!(
        v["sent"], 5000,
        "open loop: 2.5 s at 2000/s over 2 producers"
    );
    assert_eq!(v["received"], 5000);
}

#[test]
fn scheduled_messages_are_never_early_and_report_lateness() {
    let v = loadgen_json(&[
        "--spawn",
        "--rate",
        "2000",
        "--duration",
        "1",
        "--warmup",
        "0",
        "--delay-ms",
        "300",
        "--delay-spread-ms",
        "200",
    ]);
    assert_eq!(v["lost"], 0, "{v}");
    assert_eq!(v["early"], 0, "{v}");
    assert_eq!(v["mismatched"], 0, "{v}");
    assert_eq!(v["received"], 2000);
    assert_eq!(v["lateness_count"], 2000);
    assert!(v["lateness_p50_ms"].as_f64().unwrap() > 0.0);
    assert!(v["lateness_max_ms"].as_f64().unwrap() >= v["lateness_p99_ms"].as_f64().unwrap());
    assert!(v["schedule_fired"].as_u64().unwrap() >= 2000, "{v}");
    assert!(v.get("schedule_fire_lateness_p99_ms").is_some());
    // e2e includes the delay.
    assert!(v["e2e_p50_us"].as_u64().unwrap() >= 300_000);
}

#[test]
fn a_due_burst_comes_due_together() {
    let v = loadgen_json(&[
        "--spawn",
        "--group-mode",
        "message",
        "--due-burst",
        "5000",
        "--delay-ms",
        "2000",
        "--delay-spread-ms",
        "300",
    ]);
    assert_eq!(v["lost"], 0, "{v}");
    assert_eq!(v["early"], 0, "{v}");
    assert_eq!(v["sent"], 5000);
    assert_eq!(v["received"], 5000);
    assert_eq!(v["due_burst"], 5000);
    assert!(v["burst_s"].as_f64().unwrap() > 0.0, "{v}");
    // Nothing arrives before the burst's first due time.
    assert!(v["e2e_p50_us"].as_u64().unwrap() >= 1_000_000, "{v}");
}

#[test]
fn filtered_backlogs_expect_only_what_passes() {
    let v = loadgen_json(&[
        "--spawn",
        "--queues",
        "2",
        "--backlog",
        "20000",
        "--filter-tag-pass-pct",
        "1",
    ]);
    assert_eq!(v["filter"], "TAG pass");
    assert_eq!(v["acked"], 20000);
    assert_eq!(v["expected"], 200, "{v}");
    assert_eq!(v["received"], 200, "{v}");
    assert_eq!(v["lost"], 0);
    assert_eq!(v["unexpected"], 0);
    assert!(v["drain_msgs_per_s"].as_f64().unwrap() > v["consumed_msgs_per_s"].as_f64().unwrap());
    let g = loadgen_json(&[
        "--spawn",
        "--group-mode",
        "message",
        "--backlog",
        "5000",
        "--filter-sql-pass-pct",
        "10",
    ]);
    assert_eq!(g["filter"], "SQL92 k = 1");
    assert_eq!(g["received"], 500, "{g}");
    assert_eq!(g["lost"], 0);
    assert_eq!(g["unexpected"], 0);
    assert_eq!(g["mismatched"], 0);
}

#[test]
fn priorities_report_e2e_each() {
    let v = loadgen_json(&[
        "--spawn",
        "--group-mode",
        "message",
        "--priorities",
        "3",
        "--rate",
        "2000",
        "--consume-rate",
        "1500",
        "--duration",
        "1",
        "--warmup",
        "0",
    ]);
    assert_eq!(v["lost"], 0, "{v}");
    assert_eq!(v["mismatched"], 0, "{v}");
    let rows = v["e2e_by_priority"].as_array().unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0]["priority"], 2);
    let total: u64 = rows.iter().map(|r| r["count"].as_u64().unwrap()).sum();
    assert_eq!(total, 2000);
    assert!(rows.iter().all(|r| r["count"].as_u64().unwrap() > 500));
    assert!(rows.iter().all(|r| r.get("p999_us").is_some()));
}
