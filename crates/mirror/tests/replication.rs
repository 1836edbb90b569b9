//! Two `pv-mirror` processes replicating one volume: synchronous writes,
//! degraded mode and resync, the lease holding I/O, split brain, verify,
//! switchover with epochs, statistics.

mod common;
use common::*;
use pairvisor_mirror::nbd::client::NbdClient;
use serde_json::json;
use std::time::Duration;

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(30);

fn pair(root: &std::path::Path, size: u64) -> (Node, Node) {
    let mut a = Node::new(root, "a", size);
    let mut b = Node::new(root, "b", size);
    a.partner = Some(b.repl_addr());
    b.partner = Some(a.repl_addr());
    (a, b)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i % 253) as u8))
        .collect()
}

#[test]
fn acknowledged_writes_are_on_both_replicas() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = pair(d.path(), 32 * MIB);
    let pb = b.start("secondary", 0);
    let pa = a.start("primary", 1);
    pa.wait_link("in_sync", T);
    assert_eq!(pb.link_state(), "replicating");
    rt().block_on(async {
        let c = NbdClient::connect_tcp(&a.nbd_addr(), "vol").await.unwrap();
        for i in 0..20u64 {
            let off = i * 1_500_000;
            let data = pattern(i as u8, 70_000);
            c.write(off, &data, i % 2 == 0).await.unwrap();
            // Acknowledged: it must already be in the partner's replica.
            let on_b = pb.data();
            assert_eq!(
                &on_b[off as usize..off as usize + data.len()],
                &data[..],
                "write {i}"
            );
        }
        c.write_zeroes(0, 4096).await.unwrap();
        c.flush().await.unwrap();
        assert_eq!(&pb.data()[..4096], &[0u8; 4096][..]);
    });
    let s = pa.status();
    assert!(s["stats"]["replicated_ops"].as_u64().unwrap() >= 21, "{s}");
    assert!(s["stats"]["replication_latency_avg_us"].as_f64().unwrap() > 0.0);
    assert_eq!(s["stats"]["write_ops"], 21);
    assert!(
        (s["stats"]["avg_write_bytes"].as_f64().unwrap() - (20.0 * 70_000.0) / 21.0).abs() < 1.0
    );
    assert!(s["stats"]["sync_link_advice"]["overall"].is_string());
    let v = pa.ctl(json!({"cmd":"verify"}));
    assert_eq!(v["result"]["differing_count"], 0, "{v}");
    assert_eq!(pa.data(), pb.data());
    // Writes to the secondary's export are refused.
    rt().block_on(async {
        let c = NbdClient::connect_tcp(&b.nbd_addr(), "vol").await.unwrap();
        assert!(c.write(0, &[1; 512], false).await.is_err());
    });
}

#[test]
fn degraded_writes_then_bitmap_resync() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = pair(d.path(), 256 * MIB);
    let mut pb = b.start("secondary", 0);
    let pa = a.start("primary", 1);
    pa.wait_link("in_sync", T);
    let full = pa.status()["last_resync"].clone();
    assert_eq!(
        full["total_regions"], 256,
        "first sync is a full copy: {full}"
    );
    pb.kill();
    rt().block_on(async {
        let c = NbdClient::connect_tcp(&a.nbd_addr(), "vol").await.unwrap();
        // Three regions written while the partner is down.
        for (i, off) in [5 * MIB, 100 * MIB + 17, 200 * MIB].iter().enumerate() {
            c.write(*off, &pattern(i as u8 + 1, 300_000), true)
                .await
                .unwrap();
        }
    });
    let s = pa.status();
    assert_eq!(s["degraded"], true, "{s}");
    assert!(s["dirty_regions"].as_u64().unwrap() >= 3);
    assert_ne!(
        s["gen"]["bitmap"], 0,
        "degraded writes start a new generation"
    );
    let pb = b.start("secondary", 0);
    pa.wait_link("in_sync", T);
    let r = pa.status()["last_resync"].clone();
    let copied = r["total_regions"].as_u64().unwrap();
    assert!(
        (3..=8).contains(&copied),
        "only dirty regions are copied: {r}"
    );
    assert!(pa.status()["dirty_regions"].as_u64().unwrap() <= 4);
    assert_eq!(pa.status()["gen"]["current"], pb.status()["gen"]["current"]);
    assert_eq!(pb.status()["consistent"], true);
    let v = pa.ctl(json!({"cmd":"verify"}));
    assert_eq!(v["result"]["differing_count"], 0, "{v}");
    assert_eq!(pa.data(), pb.data());
}

#[test]
fn lease_lost_holds_io_until_partner_returns() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = pair(d.path(), 16 * MIB);
    let mut pb = b.start("secondary", 0);
    let pa = a.start("primary", 1);
    pa.wait_link("in_sync", T);
    assert_eq!(
        pa.ctl(json!({"cmd":"set_may_degrade","allow":false}))["ok"],
        true
    );
    pb.kill();
    let rt = rt();
    let addr = a.nbd_addr();
    let w = rt.spawn(async move {
        let c = NbdClient::connect_tcp(&addr, "vol").await.unwrap();
        c.write(3 * MIB, &pattern(9, 8192), true).await
    });
    wait_until("write held", T, || {
        (pa.status()["writes_held"].as_u64() == Some(1)).then_some(())
    });
    assert!(
        !w.is_finished(),
        "a write was acknowledged without partner and lease"
    );
    let pb = b.start("secondary", 0);
    wait_until("held write released", T, || w.is_finished().then_some(()));
    rt.block_on(w).unwrap().unwrap();
    pa.wait_link("in_sync", T);
    assert_eq!(
        &pb.data()[3 * MIB as usize..3 * MIB as usize + 8192],
        &pattern(9, 8192)[..]
    );
    // Lease back: degraded writes are acknowledged again.
    pa.ctl(json!({"cmd":"set_may_degrade","allow":true}));
    drop(pb);
    rt.block_on(async {
        let c = NbdClient::connect_tcp(&a.nbd_addr(), "vol").await.unwrap();
        c.write(0, &[1u8; 4096], true).await.unwrap();
    });
}

#[test]
fn split_brain_is_detected_and_resolved_by_decision() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = pair(d.path(), 32 * MIB);
    let pb = b.start("secondary", 0);
    let mut pa = a.start("primary", 1);
    pa.wait_link("in_sync", T);
    pa.kill();
    // Failover: b is promoted and writes alone.
    assert_eq!(pb.ctl(json!({"cmd":"promote","epoch":2}))["ok"], true);
    rt().block_on(async {
        let c = NbdClient::connect_tcp(&b.nbd_addr(), "vol").await.unwrap();
        c.write(MIB, &pattern(2, 4096), true).await.unwrap();
    });
    // Meanwhile the old primary comes back believing it is primary, alone,
    // and writes too (no fencing in this test).
    let mut a_alone = a.clone();
    a_alone.partner = None;
    let pa = a_alone.start("primary", 1);
    rt().block_on(async {
        let c = NbdClient::connect_tcp(&a.nbd_addr(), "vol").await.unwrap();
        c.write(2 * MIB, &pattern(1, 4096), true).await.unwrap();
    });
    // The unit demotes a; b reaches it and finds both were written.
    assert_eq!(pa.ctl(json!({"cmd":"demote"}))["ok"], true);
    pb.wait_link("split_brain", T);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        pb.link_state(),
        "split_brain",
        "never resynced without a decision"
    );
    assert_ne!(pa.data(), pb.data());
    // The admin keeps b's copy.
    assert_eq!(
        pb.ctl(json!({"cmd":"decide","decision":"keep_local"}))["ok"],
        true
    );
    pb.wait_link("in_sync", T);
    let v = pb.ctl(json!({"cmd":"verify"}));
    assert_eq!(v["result"]["differing_count"], 0, "{v}");
    assert_eq!(pa.data(), pb.data());
    assert_eq!(
        &pa.data()[MIB as usize..MIB as usize + 4096],
        &pattern(2, 4096)[..]
    );
    assert_eq!(pb.status()["decision"], serde_json::Value::Null);
}

#[test]
fn verify_reports_differing_regions() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = pair(d.path(), 16 * MIB);
    let mut pb = b.start("secondary", 0);
    let pa = a.start("primary", 1);
    pa.wait_link("in_sync", T);
    pb.kill();
    // Damage region 5 of b's copy behind the engine's back.
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(b.dir.join("data.raw"))
        .unwrap();
    f.write_all_at(b"bit rot", 5 * MIB + 123).unwrap();
    drop(f);
    let _pb = b.start("secondary", 0);
    pa.wait_link("in_sync", T);
    let v = pa.ctl(json!({"cmd":"verify"}));
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["result"]["differing"], json!([5]), "{v}");
    assert_eq!(pa.status()["last_verify"]["differing_count"], 1);
}

#[test]
fn switchover_with_epochs() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = pair(d.path(), 16 * MIB);
    let pb = b.start("secondary", 0);
    let pa = a.start("primary", 1);
    pa.wait_link("in_sync", T);
    // Planned switchover: demote a, promote b with the next epoch.
    pa.ctl(json!({"cmd":"demote"}));
    let r = pb.ctl(json!({"cmd":"promote","epoch":2}));
    assert_eq!(r["ok"], true, "{r}");
    pb.wait_link("in_sync", T);
    assert_eq!(pa.status()["epoch"], 2);
    rt().block_on(async {
        let c = NbdClient::connect_tcp(&b.nbd_addr(), "vol").await.unwrap();
        c.write(7 * MIB, &pattern(7, 65536), true).await.unwrap();
        let old = NbdClient::connect_tcp(&a.nbd_addr(), "vol").await.unwrap();
        assert!(
            old.write(0, &[1; 512], true).await.is_err(),
            "demoted replica refuses writes"
        );
    });
    assert_eq!(
        &pa.data()[7 * MIB as usize..7 * MIB as usize + 65536],
        &pattern(7, 65536)[..]
    );
    // Promoting a again needs a higher epoch than 2.
    pb.ctl(json!({"cmd":"demote"}));
    assert_eq!(pa.ctl(json!({"cmd":"promote","epoch":2}))["ok"], false);
    assert_eq!(pa.ctl(json!({"cmd":"promote","epoch":3}))["ok"], true);
    pa.wait_link("in_sync", T);
}
