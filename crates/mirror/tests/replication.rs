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
fn regions_larger_than_a_frame_resync_in_pieces() {
    // 128 MiB regions: more than one replication frame may carry.
    let d = tempfile::tempdir().unwrap();
    let (mut a, mut b) = pair(d.path(), 512 * MIB);
    a.region_size = 128 * MIB;
    b.region_size = 128 * MIB;
    let mut pb = b.start("secondary", 0);
    let pa = a.start("primary", 1);
    pa.wait_link("in_sync", T);
    pb.kill();
    let data = pattern(9, 3 * MIB as usize);
    rt().block_on(async {
        let c = NbdClient::connect_tcp(&a.nbd_addr(), "vol").await.unwrap();
        // Data at both ends of region 1 and a hole between them.
        c.write(128 * MIB, &data, true).await.unwrap();
        c.write(256 * MIB - 3 * MIB, &data, true).await.unwrap();
    });
    assert_eq!(pa.status()["dirty_regions"], 1);
    let pb = b.start("secondary", 0);
    pa.wait_link("in_sync", T);
    let r = pa.status()["last_resync"].clone();
    assert_eq!(r["total_regions"], 1, "{r}");
    assert_eq!(r["done_bytes"], 128 * MIB, "{r}");
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

/// Writes of at least the streaming threshold are replicated chunk by chunk
/// while their payload arrives: acknowledged, they are on both replicas,
/// whatever their size and alignment, with both durability policies, and
/// concurrent overlapping ones leave both replicas identical.
#[test]
fn streamed_writes_land_on_both_replicas() {
    for durability in ["every-write", "on-flush"] {
        let d = tempfile::tempdir().unwrap();
        let (mut a, mut b) = pair(d.path(), 48 * MIB);
        for n in [&mut a, &mut b] {
            n.extra = vec!["--durability".into(), durability.into()];
        }
        let pb = b.start("secondary", 0);
        let pa = a.start("primary", 1);
        pa.wait_link("in_sync", T);
        // (offset, length, FUA, streamed)
        let writes: &[(u64, u64, bool, bool)] = &[
            (0, 512 << 10, false, true),   // exactly the threshold: two chunks
            (MIB + 4096, MIB, true, true), // four chunks, FUA
            (3 * MIB + 17, 3 * MIB + 5, false, true), // unaligned, ragged last chunk
            (9 * MIB, 700_001, true, true),
            (12 * MIB, 16 * MIB, false, true), // many chunks
            (29 * MIB, (512 << 10) - 1, false, false), // just below: the ordinary path
            (30 * MIB, 300_000, true, false),
        ];
        rt().block_on(async {
            let c = NbdClient::connect_tcp(&a.nbd_addr(), "vol").await.unwrap();
            for (i, &(off, len, fua, _)) in writes.iter().enumerate() {
                let len = len as usize;
                let data = pattern(i as u8 * 31 + 1, len);
                c.write(off, &data, fua).await.unwrap();
                let on_b = pb.data();
                assert!(
                    on_b[off as usize..off as usize + len] == data[..],
                    "{durability}: write {i} ({len} bytes at {off}) is not on the secondary"
                );
            }
            // Concurrent, overlapping streamed writes: serialised, applied
            // in the same order on both replicas.
            let tasks: Vec<_> = (0..8u64)
                .map(|k| {
                    let c = c.clone();
                    tokio::spawn(async move {
                        let data = pattern(100 + k as u8, MIB as usize);
                        c.write(32 * MIB + k * (384 << 10), &data, k % 3 == 0).await
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap().unwrap();
            }
            c.flush().await.unwrap();
        });
        let s = pa.status();
        assert_eq!(s["stats"]["write_ops"], writes.len() as u64 + 8, "{s}");
        // One request at a time: each long write was streamed; the
        // concurrent ones may or may not have been.
        let streamed = writes.iter().filter(|w| w.3).count() as u64;
        let n = s["stats"]["streamed_writes"].as_u64().unwrap();
        assert!((streamed..=streamed + 8).contains(&n), "{s}");
        assert_eq!(s["link"]["state"], "in_sync", "{s}");
        let v = pa.ctl(json!({"cmd":"verify"}));
        assert_eq!(v["result"]["differing_count"], 0, "{durability}: {v}");
        assert!(pa.data() == pb.data(), "{durability}: replicas differ");
    }
}

/// A client that goes away in the middle of a streamed write's payload
/// leaves the replicas identical: the chunks that went out are settled on
/// both sides (or the link is broken and the marked regions resynced), and
/// the pair is in sync and verify-clean, also after the activity-log
/// cleaner ran.
#[test]
fn write_abandoned_mid_payload_leaves_replicas_identical() {
    use pairvisor_mirror::nbd::proto::*;
    use std::io::{Read, Write};
    let d = tempfile::tempdir().unwrap();
    let (a, b) = pair(d.path(), 32 * MIB);
    let pb = b.start("secondary", 0);
    let pa = a.start("primary", 1);
    pa.wait_link("in_sync", T);
    let resyncs_before = pa.status()["last_resync"].clone();
    for (round, sent) in [
        (0u8, 1_500_000usize),
        (1, 256 << 10),
        (2, 10),
        (3, 4 * MIB as usize - 1),
    ] {
        let mut s = std::net::TcpStream::connect(a.nbd_addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).unwrap();
        s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
            .unwrap();
        let mut opt = IHAVEOPT.to_be_bytes().to_vec();
        opt.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
        opt.extend_from_slice(&3u32.to_be_bytes());
        opt.extend_from_slice(b"vol");
        s.write_all(&opt).unwrap();
        let mut r = [0u8; 10];
        s.read_exact(&mut r).unwrap();
        let off = 2 * MIB + round as u64 * 5 * MIB + 4096;
        let hdr = Request {
            flags: 0,
            kind: CMD_WRITE,
            cookie: 7,
            offset: off,
            length: 4 * MIB as u32,
        }
        .encode();
        s.write_all(&hdr).unwrap();
        s.write_all(&pattern(200 + round, sent)).unwrap();
        s.flush().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        drop(s);
    }
    // Settling takes a moment; then the pair is in sync again.
    std::thread::sleep(Duration::from_millis(500));
    pa.wait_link("in_sync", T);
    let v = pa.ctl(json!({"cmd":"verify"}));
    assert_eq!(v["result"]["differing_count"], 0, "{v}");
    // Nothing failed, so settling kept the link: no resync was needed.
    assert_eq!(pa.status()["last_resync"], resyncs_before);
    // Once the cleaner cleared the idle marks, still the same.
    std::thread::sleep(Duration::from_millis(3000));
    pa.wait_link("in_sync", T);
    assert!(
        pa.data() == pb.data(),
        "replicas differ after an abandoned write"
    );
    rt().block_on(async {
        let c = NbdClient::connect_tcp(&a.nbd_addr(), "vol").await.unwrap();
        let data = pattern(9, 2 * MIB as usize);
        c.write(2 * MIB, &data, true).await.unwrap();
        assert!(pb.data()[2 * MIB as usize..4 * MIB as usize] == data[..]);
    });
    let v = pa.ctl(json!({"cmd":"verify"}));
    assert_eq!(v["result"]["differing_count"], 0, "{v}");
}

/// S2: the resync rate applies to a resync that is already running (the
/// unit's setting is pushed to running mirrors), and the progress reports
/// its rate and an ETA.
#[test]
fn a_resync_rate_change_applies_to_the_running_resync() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = pair(d.path(), 64 * MIB);
    let mut pb = b.start("secondary", 0);
    let pa = a.start("primary", 1);
    pa.wait_link("in_sync", T);
    pb.kill();
    rt().block_on(async {
        let c = NbdClient::connect_tcp(&a.nbd_addr(), "vol").await.unwrap();
        for i in 0..48u64 {
            c.write(i * MIB, &pattern(i as u8, MIB as usize), false)
                .await
                .unwrap();
        }
        c.flush().await.unwrap();
    });
    // 2 MB/s: 48 MiB would take about 25 s.
    pa.ctl(json!({"cmd":"set_resync_rate","bytes_per_sec": 2_000_000}));
    let _pb = b.start("secondary", 0);
    let slow = wait_until("a resync with an ETA", T, || {
        let s = pa.status();
        let eta = s["resync"]["eta_secs"].as_f64()?;
        (s["resync"]["done_bytes"].as_u64()? >= 2 * MIB).then_some((s, eta))
    });
    assert!(slow.1 > 5.0, "capped: ETA {} s ({})", slow.1, slow.0);
    assert!(
        slow.0["resync"]["bytes_per_sec"].as_f64().unwrap() < 8e6,
        "capped rate: {}",
        slow.0
    );
    // Lifted while it runs: it finishes long before the capped ETA.
    let lifted = std::time::Instant::now();
    pa.ctl(json!({"cmd":"set_resync_rate","bytes_per_sec": 0}));
    pa.wait_link("in_sync", Duration::from_secs(20));
    assert!(
        lifted.elapsed().as_secs_f64() < slow.1 * 0.8,
        "finished {:?} after lifting the cap; capped ETA was {} s",
        lifted.elapsed(),
        slow.1
    );
}
