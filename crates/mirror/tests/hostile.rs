//! Malformed and hostile input: the NBD server answers with the protocol's
//! error or closes the connection — never panics, never writes outside the
//! volume — and the replication listener refuses strangers and stale
//! primaries.

mod common;
use common::*;
use pairvisor_mirror::nbd::client::{ClientError, NbdClient};
use pairvisor_mirror::nbd::proto::*;
use serde_json::json;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn connect(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Reads the server greeting (18 bytes) and sends client flags.
fn greet(s: &mut TcpStream, cflags: u32) {
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    assert_eq!(&g[0..8], &NBDMAGIC.to_be_bytes());
    assert_eq!(&g[8..16], &IHAVEOPT.to_be_bytes());
    s.write_all(&cflags.to_be_bytes()).unwrap();
}

fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(s.read(&mut b), Ok(0) | Err(_))
}

fn send_opt(s: &mut TcpStream, opt: u32, data: &[u8]) {
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    s.write_all(&v).unwrap();
}

fn read_opt_reply(s: &mut TcpStream) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).unwrap();
    assert_eq!(&h[0..8], &REPLY_MAGIC_OPT.to_be_bytes());
    let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
    let rep = u32::from_be_bytes(h[12..16].try_into().unwrap());
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
    let mut d = vec![0u8; len as usize];
    s.read_exact(&mut d).unwrap();
    (opt, rep, d)
}

#[test]
fn handshake_abuse_closes_or_errors() {
    let d = tempfile::tempdir().unwrap();
    let n = Node::new(d.path(), "a", 8 * MIB);
    let p = n.start("primary", 1);
    let addr = n.nbd_addr();

    // Unknown client flags: closed.
    let mut s = connect(&addr);
    greet(&mut s, 0xffff_0000);
    assert!(closed(&mut s));

    // Bad option magic: closed.
    let mut s = connect(&addr);
    greet(&mut s, FLAG_C_FIXED_NEWSTYLE);
    s.write_all(&[0x42; 16]).unwrap();
    assert!(closed(&mut s));

    // Huge option length: closed without trying to read 4 GiB.
    let mut s = connect(&addr);
    greet(&mut s, FLAG_C_FIXED_NEWSTYLE);
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend_from_slice(&OPT_GO.to_be_bytes());
    v.extend_from_slice(&u32::MAX.to_be_bytes());
    s.write_all(&v).unwrap();
    assert!(closed(&mut s));

    // Unknown option, malformed GO, unknown export: error replies, and the
    // session goes on.
    let mut s = connect(&addr);
    greet(&mut s, FLAG_C_FIXED_NEWSTYLE);
    send_opt(&mut s, 4242, b"junk");
    assert_eq!(read_opt_reply(&mut s).1, REP_ERR_UNSUP);
    send_opt(&mut s, OPT_GO, &[0xff, 0xff, 0xff, 0xff, 1]);
    assert_eq!(read_opt_reply(&mut s).1, REP_ERR_INVALID);
    let mut go = 4u32.to_be_bytes().to_vec();
    go.extend_from_slice(b"nope");
    go.extend_from_slice(&0u16.to_be_bytes());
    send_opt(&mut s, OPT_GO, &go);
    assert_eq!(read_opt_reply(&mut s).1, REP_ERR_UNKNOWN);
    send_opt(&mut s, OPT_SET_META_CONTEXT, &[0; 8]);
    assert_eq!(
        read_opt_reply(&mut s).1,
        REP_ERR_INVALID,
        "meta before structured"
    );
    send_opt(&mut s, OPT_STARTTLS, &[]);
    assert_eq!(read_opt_reply(&mut s).1, REP_ERR_POLICY);
    send_opt(&mut s, OPT_LIST, &[]);
    let (_, rep, data) = read_opt_reply(&mut s);
    assert_eq!(rep, REP_SERVER);
    assert_eq!(&data[4..], b"vol");
    assert_eq!(read_opt_reply(&mut s).1, REP_ACK);
    send_opt(&mut s, OPT_ABORT, &[]);
    assert_eq!(read_opt_reply(&mut s).1, REP_ACK);

    // Old-style NBD_OPT_EXPORT_NAME with the wrong name: closed.
    let mut s = connect(&addr);
    greet(&mut s, FLAG_C_FIXED_NEWSTYLE);
    send_opt(&mut s, OPT_EXPORT_NAME, b"wrong");
    assert!(closed(&mut s));

    // ... and with the right one, the server sends size and flags.
    let mut s = connect(&addr);
    greet(&mut s, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    send_opt(&mut s, OPT_EXPORT_NAME, b"vol");
    let mut r = [0u8; 10];
    s.read_exact(&mut r).unwrap();
    assert_eq!(u64::from_be_bytes(r[0..8].try_into().unwrap()), 8 * MIB);
    drop(p);
}

#[test]
fn transmission_abuse() {
    let d = tempfile::tempdir().unwrap();
    let n = Node::new(d.path(), "a", 8 * MIB);
    let p = n.start("primary", 1);
    let addr = n.nbd_addr();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = NbdClient::connect_tcp(&addr, "vol").await.unwrap();
        let errno = |r: Result<Vec<u8>, ClientError>| match r {
            Err(ClientError::Server(e)) => e,
            other => panic!("expected an error reply, got {other:?}"),
        };
        // Out of range and overflowing ranges.
        assert_eq!(errno(c.read(8 * MIB, 1).await), EINVAL);
        assert_eq!(errno(c.read(u64::MAX - 10, 4096).await), EINVAL);
        assert!(matches!(
            c.write(8 * MIB - 10, &[1u8; 20], false).await,
            Err(ClientError::Server(ENOSPC))
        ));
        assert!(matches!(
            c.write(u64::MAX - 4, &[1u8; 20], true).await,
            Err(ClientError::Server(ENOSPC))
        ));
        assert_eq!(errno(c.raw(CMD_TRIM, 0, 8 * MIB - 1, 2).await), ENOSPC);
        assert_eq!(errno(c.raw(CMD_WRITE_ZEROES, 0, u64::MAX, 1).await), ENOSPC);
        // Oversized read, unknown command, unknown flags, block status
        // without a negotiated context.
        assert_eq!(errno(c.read(0, u32::MAX).await), EINVAL);
        assert_eq!(errno(c.raw(99, 0, 0, 0).await), EINVAL);
        assert_eq!(errno(c.raw(CMD_READ, 0x8000, 0, 0).await), EINVAL);
        assert_eq!(errno(c.raw(CMD_BLOCK_STATUS, 0, 0, 4096).await), EINVAL);
        // The connection still works.
        c.write(0, &[7u8; 4096], true).await.unwrap();
        assert_eq!(c.read(0, 4096).await.unwrap(), vec![7u8; 4096]);
    });
    // A write announcing a huge payload closes the connection.
    let mut s = connect(&addr);
    greet(&mut s, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    send_opt(&mut s, OPT_EXPORT_NAME, b"vol");
    let mut r = [0u8; 10];
    s.read_exact(&mut r).unwrap();
    let hdr = Request {
        flags: 0,
        kind: CMD_WRITE,
        cookie: 1,
        offset: 0,
        length: u32::MAX,
    }
    .encode();
    s.write_all(&hdr).unwrap();
    assert!(closed(&mut s));
    // Bad request magic closes it too.
    let mut s = connect(&addr);
    greet(&mut s, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    send_opt(&mut s, OPT_EXPORT_NAME, b"vol");
    s.read_exact(&mut r).unwrap();
    s.write_all(&[0xee; 28]).unwrap();
    assert!(closed(&mut s));
    // Random garbage at every stage never kills the server.
    for seed in 0..50u64 {
        let mut s = connect(&addr);
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let junk: Vec<u8> = (0..200)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let _ = s.write_all(&junk);
    }
    // Nothing was written outside the volume, and the server is alive.
    assert_eq!(
        std::fs::metadata(n.dir.join("data.raw")).unwrap().len(),
        8 * MIB
    );
    rt.block_on(async {
        let c = NbdClient::connect_tcp(&addr, "vol").await.unwrap();
        assert_eq!(c.read(0, 4096).await.unwrap(), vec![7u8; 4096]);
    });
    assert_eq!(p.status()["role"], "primary");
}

#[test]
fn replication_refuses_strangers() {
    let d = tempfile::tempdir().unwrap();
    let b = Node::new(d.path(), "b", 8 * MIB);
    let pb = b.start("secondary", 0);
    let before = std::fs::read(b.dir.join("meta.json")).unwrap();

    // Garbage instead of a hello.
    let mut s = connect(&b.repl_addr());
    let mut g = [0u8; 44];
    s.read_exact(&mut g).unwrap();
    assert_eq!(&g[0..8], b"PVMIRROR");
    s.write_all(&[0xff; 64]).unwrap();
    assert!(closed(&mut s));

    // A well-formed hello with a wrong MAC and a huge epoch.
    let mut s = connect(&b.repl_addr());
    s.read_exact(&mut g).unwrap();
    let hello =
        serde_json::to_vec(&json!({"volume_id":"vol","size":8*MIB,"region_size":MIB,"epoch":999}))
            .unwrap();
    let mut m = (hello.len() as u32).to_be_bytes().to_vec();
    m.extend_from_slice(&hello);
    m.extend_from_slice(&[0u8; 64]);
    s.write_all(&m).unwrap();
    assert!(closed(&mut s));
    assert_eq!(
        std::fs::read(b.dir.join("meta.json")).unwrap(),
        before,
        "stranger changed the replica"
    );

    // A primary with the wrong secret is refused as well, and refuses in turn.
    let mut a = Node::new(d.path(), "a", 8 * MIB);
    a.secret = d.path().join("other-secret");
    std::fs::write(&a.secret, b"not the unit secret").unwrap();
    a.partner = Some(b.repl_addr());
    let pa = a.start("primary", 1);
    wait_until("auth failure reported", Duration::from_secs(10), || {
        let s = pa.status();
        s["link"]["last_error"].as_str().map(|e| e.to_string())
    });
    assert_eq!(pa.link_state(), "connecting");
    assert_eq!(std::fs::read(b.dir.join("meta.json")).unwrap(), before);
    assert_eq!(pb.link_state(), "waiting");
}

#[test]
fn stale_epoch_is_rejected() {
    let d = tempfile::tempdir().unwrap();
    let mut a = Node::new(d.path(), "a", 8 * MIB);
    let b = Node::new(d.path(), "b", 8 * MIB);
    let c0 = Node::new(d.path(), "c", 8 * MIB);
    a.partner = Some(b.repl_addr());
    let pb = b.start("secondary", 0);
    let pa = a.start("primary", 5);
    pa.wait_link("in_sync", Duration::from_secs(20));
    assert_eq!(pb.status()["epoch"], 5);
    drop(pa);
    // A stale primary (epoch 3) cannot replicate into b.
    let mut c = c0.clone();
    c.partner = Some(b.repl_addr());
    let pc = c.start("primary", 3);
    let err = wait_until("stale epoch refusal", Duration::from_secs(10), || {
        pc.status()["link"]["last_error"]
            .as_str()
            .filter(|e| e.contains("stale epoch"))
            .map(|e| e.to_string())
    });
    assert!(err.contains("seen epoch 5"), "{err}");
    // Promotion with a stale epoch is refused on b too.
    let r = pb.ctl(json!({"cmd":"promote","epoch":4}));
    assert_eq!(r["ok"], false);
    assert!(r["error"].as_str().unwrap().contains("stale"), "{r}");
}

/// An authenticated replication peer (it knows the unit secret) that sends
/// malformed frames: the handshake of a primary, done by hand.
struct FakePrimary {
    s: TcpStream,
    next: u64,
}

impl FakePrimary {
    fn connect(addr: &str, secret: &[u8], size: u64) -> FakePrimary {
        use pairvisor_mirror::repl::proto::*;
        let mut s = connect(addr);
        let mut g = [0u8; 44];
        s.read_exact(&mut g).unwrap();
        assert_eq!(&g[0..8], GREETING);
        assert_eq!(&g[8..12], &VERSION.to_be_bytes());
        let ns = &g[12..44];
        let hello =
            serde_json::to_vec(&json!({"volume_id":"vol","size":size,"region_size":MIB,"epoch":1}))
                .unwrap();
        let nc = [7u8; 32];
        let tag = mac(secret, LABEL_CLIENT, &[ns, &nc, &hello]);
        let mut m = (hello.len() as u32).to_be_bytes().to_vec();
        m.extend_from_slice(&hello);
        m.extend_from_slice(&nc);
        m.extend_from_slice(&tag);
        s.write_all(&m).unwrap();
        let mut len = [0u8; 4];
        s.read_exact(&mut len).unwrap();
        let mut welcome = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut welcome).unwrap();
        let w: serde_json::Value = serde_json::from_slice(&welcome).unwrap();
        assert_eq!(w["accepted"], true, "{w}");
        s.read_exact(&mut len).unwrap();
        let mut rest = vec![0u8; u32::from_be_bytes(len) as usize + 32];
        s.read_exact(&mut rest).unwrap();
        let plan =
            serde_json::to_vec(&json!({"proceed":true,"reason":null,"resync":false})).unwrap();
        let mut m = (plan.len() as u32).to_be_bytes().to_vec();
        m.extend_from_slice(&plan);
        s.write_all(&m).unwrap();
        FakePrimary { s, next: 1 }
    }

    /// Sends a frame with `payload` (and `len` as given); returns its id.
    fn send(&mut self, kind: u16, flags: u16, offset: u64, len: u32, payload: &[u8]) -> u64 {
        use pairvisor_mirror::repl::proto::Frame;
        let id = self.next;
        self.next += 1;
        let mut m = Frame {
            kind,
            flags,
            id,
            offset,
            len,
            aux: 0,
        }
        .encode()
        .to_vec();
        m.extend_from_slice(payload);
        self.s.write_all(&m).unwrap();
        id
    }

    /// Reads one reply: (id, status).
    fn reply(&mut self) -> (u64, u32) {
        use pairvisor_mirror::repl::proto::{Frame, K_REPLY};
        let mut h = [0u8; Frame::LEN];
        self.s.read_exact(&mut h).unwrap();
        let f = Frame::decode(&h).expect("reply magic");
        assert_eq!(f.kind, K_REPLY);
        let mut body = vec![0u8; f.len as usize];
        self.s.read_exact(&mut body).unwrap();
        (f.id, f.aux)
    }

    /// Sends a frame and waits for its reply's status (the PART frames
    /// used here are answered in order).
    fn call(&mut self, kind: u16, flags: u16, offset: u64, len: u32, payload: &[u8]) -> u32 {
        let id = self.send(kind, flags, offset, len, payload);
        let (rid, status) = self.reply();
        assert_eq!(rid, id);
        status
    }
}

#[test]
fn replication_peer_frames_are_checked() {
    use pairvisor_mirror::repl::proto::*;
    let d = tempfile::tempdir().unwrap();
    let b = Node::new(d.path(), "b", 8 * MIB);
    let pb = b.start("secondary", 0);
    let secret = std::fs::read(&b.secret).unwrap();
    let mut p = FakePrimary::connect(&b.repl_addr(), &secret, 8 * MIB);
    let chunk = vec![0xabu8; 4096];
    // Out of range, overflowing, on a kind that is not WRITE, unknown flags:
    // errors, and the connection goes on.
    assert_eq!(p.call(K_WRITE, F_PART, 8 * MIB - 100, 4096, &chunk), EINVAL);
    assert_eq!(p.call(K_WRITE, F_PART, 8 * MIB, 4096, &chunk), EINVAL);
    assert_eq!(p.call(K_WRITE, F_PART, u64::MAX - 10, 4096, &chunk), EINVAL);
    assert_eq!(p.call(K_ZERO, F_PART, 0, 4096, &[]), EINVAL);
    assert_eq!(p.call(K_FLUSH, F_PART, 0, 0, &[]), EINVAL);
    assert_eq!(p.call(K_WRITE, 0x80 | F_PART, 0, 4096, &chunk), EINVAL);
    // VERIFY ranges: empty, too long, outside the volume, overflowing.
    assert_eq!(p.call(K_VERIFY, 0, 0, 0, &[]), EINVAL);
    assert_eq!(p.call(K_VERIFY, 0, 0, MAX_VERIFY_LEN + 1, &[]), EINVAL);
    assert_eq!(p.call(K_VERIFY, 0, 8 * MIB - 4096, 8192, &[]), EINVAL);
    assert_eq!(p.call(K_VERIFY, 0, u64::MAX - 10, 4096, &[]), EINVAL);
    assert_eq!(p.call(K_VERIFY, 0, 0, 4096, &[]), 0);
    // A well-formed streamed write: PART chunks, then the durable last one.
    assert_eq!(p.call(K_WRITE, F_PART, 4096, 4096, &chunk), 0);
    assert_eq!(p.call(K_WRITE, F_PART, 8192, 4096, &[0xcd; 4096]), 0);
    assert_eq!(p.call(K_WRITE, F_DURABLE, 12288, 4096, &[0xef; 4096]), 0);
    let data = std::fs::read(b.dir.join("data.raw")).unwrap();
    assert_eq!(data.len() as u64, 8 * MIB, "the data file grew");
    assert!(data[..4096].iter().all(|&x| x == 0));
    assert!(data[4096..8192].iter().all(|&x| x == 0xab));
    assert!(data[8192..12288].iter().all(|&x| x == 0xcd));
    assert!(data[12288..16384].iter().all(|&x| x == 0xef));
    assert!(data[16384..].iter().all(|&x| x == 0));
    // An oversized PART payload closes the connection without a write.
    p.send(K_WRITE, F_PART, 0, MAX_FRAME_PAYLOAD + 1, &[]);
    assert!(closed(&mut p.s));
    assert_eq!(
        std::fs::metadata(b.dir.join("data.raw")).unwrap().len(),
        8 * MIB
    );
    assert_eq!(pb.status()["role"], "secondary");
}

/// Writes `bytes` to `s` and drains the answer until the server closes the
/// connection or goes quiet.
fn throw(s: &mut (impl Read + Write), bytes: &[u8]) {
    let _ = s.write_all(bytes);
    let _ = s.flush();
    let mut sink = [0u8; 4096];
    while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
}

/// Issue 13: arbitrary bytes on every port a partner or a local client can
/// reach — NBD before and after the greeting, replication after the
/// server's hello, the control socket — never take the replica process
/// down, never change its metadata, and a well-behaved client is served
/// right after (proptest: 64 generated cases, shrunk on failure).
#[test]
fn random_bytes_on_every_port_never_take_the_server_down() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    let d = tempfile::tempdir().unwrap();
    let n = Node::new(d.path(), "a", 8 * MIB);
    let p = n.start("primary", 1);
    let meta = std::fs::read(n.dir.join("meta.json")).unwrap();
    let nbd = n.nbd_addr();
    let repl = n.repl_addr();
    let control = n.control.clone();
    let mut runner = TestRunner::new(Config {
        cases: 64,
        failure_persistence: None,
        ..Config::default()
    });
    let bytes = proptest::collection::vec(any::<u8>(), 0..8192);
    runner
        .run(&(0u8..4, bytes), |(port, bytes)| {
            let quick = Some(Duration::from_millis(200));
            match port {
                0 => {
                    let mut s = connect(&nbd);
                    s.set_read_timeout(quick).unwrap();
                    throw(&mut s, &bytes);
                }
                1 => {
                    let mut s = connect(&nbd);
                    greet(&mut s, FLAG_C_FIXED_NEWSTYLE);
                    s.set_read_timeout(quick).unwrap();
                    let mut v = IHAVEOPT.to_be_bytes().to_vec();
                    v.extend_from_slice(&bytes);
                    throw(&mut s, &v);
                }
                2 => {
                    let mut s = connect(&repl);
                    let mut g = [0u8; 44];
                    s.read_exact(&mut g).unwrap();
                    s.set_read_timeout(quick).unwrap();
                    throw(&mut s, &bytes);
                }
                _ => {
                    let mut s = std::os::unix::net::UnixStream::connect(&control).unwrap();
                    s.set_read_timeout(quick).unwrap();
                    let mut v = bytes.clone();
                    v.push(b'\n');
                    throw(&mut s, &v);
                }
            }
            // Still up and serving, nothing changed.
            prop_assert_eq!(&p.status()["role"], "primary");
            Ok(())
        })
        .unwrap();
    assert_eq!(std::fs::read(n.dir.join("meta.json")).unwrap(), meta);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = NbdClient::connect_tcp(&nbd, "vol").await.unwrap();
        c.write(4096, &[7u8; 4096], true).await.unwrap();
        assert_eq!(c.read(4096, 4096).await.unwrap(), vec![7u8; 4096]);
    });
}

/// Issue 13: connections still in their replication handshake are capped
/// (16): a stranger holding many gets the extra ones closed at once, and
/// the listener serves again as soon as they go.
#[test]
fn replication_handshakes_in_progress_are_capped() {
    let d = tempfile::tempdir().unwrap();
    let n = Node::new(d.path(), "b", 8 * MIB);
    let _p = n.start("secondary", 0);
    let repl = n.repl_addr();
    let mut held = Vec::new();
    for _ in 0..16 {
        let mut s = connect(&repl);
        let mut g = [0u8; 44];
        s.read_exact(&mut g).unwrap();
        assert_eq!(&g[0..8], b"PVMIRROR");
        held.push(s);
    }
    let mut extra = connect(&repl);
    extra
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let mut g = [0u8; 44];
    assert!(
        matches!(extra.read(&mut g), Ok(0) | Err(_)),
        "a 17th pending handshake was served"
    );
    drop(held);
    wait_until("the listener serves again", Duration::from_secs(10), || {
        let mut s = connect(&repl);
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let mut g = [0u8; 44];
        s.read_exact(&mut g).ok().map(|_| ())
    });
}
