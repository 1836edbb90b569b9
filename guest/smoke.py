#!/usr/bin/env python3
"""Smoke test of the Pairvisor test guest (see guest/README.md).

Usage: smoke.py VMLINUZ INITRD [WORKDIR]

Boots the guest under QEMU/TCG the way Pairvisor does and checks every
behaviour of the contract. Exits non-zero on the first failure. Every QEMU
run is bounded by timeouts and killed on exit.
"""

import ctypes
import json
import os
import signal
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

BLOCK = 4096
APPEND = "console=ttyS0 panic=0 quiet"


def log(msg):
    print(f"smoke: {msg}", flush=True)


class Fail(Exception):
    pass


def expected_block(seed, block, gen):
    hdr = f"PVBLK seed={seed} block={block} gen={gen}\n".encode()
    return (hdr * (BLOCK // len(hdr) + 1))[:BLOCK]


def parse_block(data):
    """Return (seed, block, gen) if data is a well-formed block, else None."""
    m = re.match(rb"PVBLK seed=(\S+) block=(\d+) gen=(\d+)\n", data)
    if not m:
        return None
    seed, block, gen = m.group(1).decode(), int(m.group(2)), int(m.group(3))
    if data != expected_block(seed, block, gen):
        return None
    return seed, block, gen


def _die_with_parent():
    # QEMU gets SIGKILL if this script dies (e.g. killed by a timeout).
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def connect_unix(path, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            return s
        except OSError:
            s.close()
            if time.monotonic() > deadline:
                raise Fail(f"cannot connect to {path}")
            time.sleep(0.05)


class VM:
    def __init__(self, kernel, initrd, workdir, name, disk_mib=64, append=APPEND,
                 console=True):
        self.dir = os.path.join(workdir, name)
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir)
        self.disk = None
        args = [
            "qemu-system-x86_64", "-accel", "tcg", "-m", "256", "-smp", "1",
            "-nodefaults", "-no-user-config", "-display", "none",
            "-kernel", kernel, "-initrd", initrd, "-append", append,
            "-chardev", f"socket,id=console,path={self.dir}/console.sock,server=on,wait=off,logfile={self.dir}/console.log",
            "-serial", "chardev:console",
            "-device", "pvpanic",
            "-device", "virtio-serial-pci",
            "-chardev", f"socket,id=qga0,path={self.dir}/qga.sock,server=on,wait=off",
            "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        ]
        if disk_mib:
            self.disk = os.path.join(self.dir, "disk.raw")
            with open(self.disk, "wb") as f:
                f.truncate(disk_mib << 20)
            args += [
                "-drive", f"file={self.disk},format=raw,if=none,id=d0,cache=none,aio=threads",
                "-device", "virtio-blk-pci,drive=d0",
            ]
        args += ["-qmp", f"unix:{self.dir}/qmp.sock,server=on,wait=off", "-action", "panic=pause"]
        self.args = args
        self.lines = []
        self.events = []
        self.cond = threading.Condition()
        self.qmp_replies = []
        log(f"[{name}] " + " ".join(a if " " not in a else repr(a) for a in args))
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL,
                                     stdout=open(os.path.join(self.dir, "qemu.out"), "wb"),
                                     stderr=subprocess.STDOUT,
                                     preexec_fn=_die_with_parent)
        self.con = None
        self.qmp = connect_unix(f"{self.dir}/qmp.sock")
        if console:
            self.connect_console()
        self.qmp_file = self.qmp.makefile("rb")
        greeting = json.loads(self.qmp_file.readline())
        if "QMP" not in greeting:
            raise Fail(f"bad QMP greeting {greeting}")
        self.qmp.sendall(b'{"execute":"qmp_capabilities"}\n')
        threading.Thread(target=self._read_qmp, daemon=True).start()
        self.wait_qmp_reply()

    # ---- console
    def connect_console(self):
        self.con = connect_unix(f"{self.dir}/console.sock")
        threading.Thread(target=self._read_console, daemon=True).start()

    def wait_log(self, pattern, timeout=30.0):
        """Wait for a line matching regex in console.log (no client needed)."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with open(f"{self.dir}/console.log", "rb") as f:
                    for line in f.read().decode(errors="replace").splitlines():
                        if rx.search(line.rstrip("\r")):
                            return line
            except FileNotFoundError:
                pass
            time.sleep(0.1)
        raise Fail(f"timeout waiting for /{pattern}/ in console.log")

    def _read_console(self):
        buf = b""
        while True:
            try:
                data = self.con.recv(4096)
            except OSError:
                data = b""
            if not data:
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                text = line.decode(errors="replace").rstrip("\r")
                with self.cond:
                    self.lines.append((time.monotonic(), text))
                    self.cond.notify_all()

    def send(self, cmd):
        self.con.sendall(cmd.encode() + b"\n")

    def wait_line(self, pattern, timeout=30.0, start=0):
        """Wait for a console line matching regex; return (index, match)."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self.cond:
            i = start
            while True:
                while i < len(self.lines):
                    m = rx.search(self.lines[i][1])
                    if m:
                        return i, m
                    i += 1
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Fail(f"timeout waiting for console line /{pattern}/; "
                               f"last lines: {[l for _, l in self.lines[-10:]]}")
                self.cond.wait(left)

    def mark(self):
        with self.cond:
            return len(self.lines)

    # ---- QMP
    def _read_qmp(self):
        try:
            for raw in self.qmp_file:
                msg = json.loads(raw)
                with self.cond:
                    if "event" in msg:
                        self.events.append(msg)
                    else:
                        self.qmp_replies.append(msg)
                    self.cond.notify_all()
        except (OSError, ValueError):
            pass  # QEMU exited

    def wait_qmp_reply(self, timeout=10.0):
        deadline = time.monotonic() + timeout
        with self.cond:
            while not self.qmp_replies:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Fail("timeout waiting for QMP reply")
                self.cond.wait(left)
            return self.qmp_replies.pop(0)

    def qmp_cmd(self, cmd, **arguments):
        msg = {"execute": cmd}
        if arguments:
            msg["arguments"] = arguments
        self.qmp.sendall(json.dumps(msg).encode() + b"\n")
        r = self.wait_qmp_reply()
        if "error" in r:
            raise Fail(f"QMP {cmd} failed: {r}")
        return r["return"]

    def blockstats(self):
        for dev in self.qmp_cmd("query-blockstats"):
            if dev.get("device") == "d0":
                return dev["stats"]
        raise Fail("no blockstats for d0")

    def dirty_rate(self, secs=1):
        """Guest dirty page rate in MiB/s measured by QEMU (page sampling)."""
        self.qmp_cmd("calc-dirty-rate", **{"calc-time": secs})
        deadline = time.monotonic() + secs + 20
        while time.monotonic() < deadline:
            r = self.qmp_cmd("query-dirty-rate")
            if r.get("status") == "measured":
                return r["dirty-rate"]
            time.sleep(0.2)
        raise Fail("calc-dirty-rate did not finish")

    def wait_event(self, name, timeout=30.0):
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for ev in self.events:
                    if ev["event"] == name:
                        return ev
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Fail(f"timeout waiting for QMP event {name}; got {[e['event'] for e in self.events]}")
                self.cond.wait(left)

    def wait_exit(self, timeout=30.0):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise Fail("QEMU did not exit")

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for s in (self.con, self.qmp):
            try:
                if s is not None:
                    s.close()
            except OSError:
                pass

    def read_block(self, block):
        with open(self.disk, "rb") as f:
            f.seek(block * BLOCK)
            return f.read(BLOCK)


# ---------------------------------------------------------------- guest agent
class QGA:
    def __init__(self, path):
        self.s = connect_unix(path)
        self.s.settimeout(10)
        self.buf = b""

    def request(self, obj, delimited=False):
        if delimited:
            self.s.sendall(b"\xff")
        self.s.sendall(json.dumps(obj).encode() + b"\n")
        while b"\n" not in self.buf:
            data = self.s.recv(4096)
            if not data:
                raise Fail("QGA connection closed")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def close(self):
        self.s.close()


def check(cond, what):
    if not cond:
        raise Fail(what)
    log(f"ok: {what}")


def qga_checks(vm):
    path = f"{vm.dir}/qga.sock"
    for round_ in range(3):  # connect, disconnect, reconnect
        q = QGA(path)
        t = time.monotonic()
        sync_id = 1000 + round_
        # First request after (re)connect: guest-sync to flush stale replies.
        r = q.request({"execute": "guest-sync", "arguments": {"id": sync_id}})
        check(json.loads(r) == {"return": sync_id},
              f"QGA guest-sync {sync_id} (round {round_}, {time.monotonic() - t:.2f}s) -> {r!r}")
        r = q.request({"execute": "guest-ping"})
        check(json.loads(r) == {"return": {}}, f"QGA guest-ping -> {r!r}")
        r = q.request({"execute": "guest-sync-delimited", "arguments": {"id": 424242 + round_}}, delimited=True)
        check(r.startswith(b"\xff") and json.loads(r[1:]) == {"return": 424242 + round_},
              f"QGA guest-sync-delimited -> {r!r}")
        r = q.request({"execute": "guest-info"})
        check(json.loads(r) == {"return": {"version": "pv-guest-1", "supported_commands": []}},
              f"QGA guest-info -> {r!r}")
        r = q.request({"execute": "guest-shutdown"})
        j = json.loads(r)
        check(j.get("error", {}).get("class") == "CommandNotFound", f"QGA unknown command -> {r!r}")
        q.close()
        time.sleep(0.5)
    # Host disconnects before reading the reply: the stale reply is delivered
    # on the next connection; guest-sync-delimited resynchronises.
    q = QGA(path)
    q.s.sendall(b'{"execute":"guest-ping"}\n')
    time.sleep(0.5)
    q.close()
    q = QGA(path)
    q.s.sendall(b"\xff" + json.dumps({"execute": "guest-sync-delimited", "arguments": {"id": 777}}).encode() + b"\n")
    seen = []
    while True:
        while b"\n" not in q.buf:
            data = q.s.recv(4096)
            if not data:
                raise Fail("QGA connection closed")
            q.buf += data
        line, q.buf = q.buf.split(b"\n", 1)
        seen.append(line)
        if b"\xff" in line:
            line = line[line.index(b"\xff") + 1:]
            if json.loads(line) == {"return": 777}:
                break
    check(True, f"QGA resync after abandoned request, lines seen: {seen}")
    r = q.request({"execute": "guest-ping"})
    check(json.loads(r) == {"return": {}}, f"QGA guest-ping after resync -> {r!r}")
    q.close()


def test_main(kernel, initrd, workdir):
    vm = VM(kernel, initrd, workdir, "main")
    try:
        i, _ = vm.wait_line(r"^pv-guest: ready$", timeout=60)
        boot = vm.lines[i][0] - vm.t0
        log(f"boot time to 'pv-guest: ready': {boot:.2f}s")
        # Heartbeats 1, 2, 3 about 2 s apart.
        hb = []
        for n in (1, 2, 3):
            j, _ = vm.wait_line(rf"^pv-guest: heartbeat {n}$", timeout=10, start=i)
            hb.append(vm.lines[j][0])
        gaps = [b - a for a, b in zip(hb, hb[1:])]
        check(all(1.5 < g < 3.0 for g in gaps), f"heartbeats 1..3, gaps {[round(g, 2) for g in gaps]}")

        qga_checks(vm)

        m = vm.mark()
        vm.send("hello")
        vm.wait_line(r"^pv-guest: unknown command$", timeout=10, start=m)
        m = vm.mark()
        vm.send("pv frobnicate 1")
        vm.wait_line(r"^pv-guest: unknown command$", timeout=10, start=m)
        log("ok: unknown commands rejected")

        m = vm.mark()
        vm.send("pv ping")
        vm.wait_line(r"^pv-guest: pong$", timeout=10, start=m)

        # pv write / verify
        m = vm.mark()
        t = time.monotonic()
        st0 = vm.blockstats()
        vm.send("pv write 1234 8")
        vm.wait_line(r"^pv-guest: write done 1234 8$", timeout=60, start=m)
        st1 = vm.blockstats()
        acks = [int(x.group(1)) for x in (re.match(r"^pv-guest: acked 1234 (\d+)$", l) for _, l in vm.lines[m:]) if x]
        check(acks == list(range(8)), f"pv write 1234 8 acked blocks {acks} in {time.monotonic() - t:.2f}s")
        dw = st1["wr_operations"] - st0["wr_operations"]
        df = st1["flush_operations"] - st0["flush_operations"]
        dbytes = st1["wr_bytes"] - st0["wr_bytes"]
        check(dw == 8 and dbytes == 8 * BLOCK and df >= 8,
              f"virtio-blk saw {dw} writes ({dbytes} bytes) and {df} flushes for 8 blocks")
        m = vm.mark()
        vm.send("pv write 77 4 10")
        vm.wait_line(r"^pv-guest: write done 77 4$", timeout=60, start=m)
        acks = [int(x.group(1)) for x in (re.match(r"^pv-guest: acked 77 (\d+)$", l) for _, l in vm.lines[m:]) if x]
        check(acks == [10, 11, 12, 13], f"pv write 77 4 10 acked blocks {acks}")
        m = vm.mark()
        vm.send("pv verify 1234 8")
        vm.wait_line(r"^pv-guest: verify ok 1234 8$", timeout=60, start=m)
        m = vm.mark()
        vm.send("pv verify 77 4 10")
        vm.wait_line(r"^pv-guest: verify ok 77 4$", timeout=60, start=m)
        m = vm.mark()
        vm.send("pv verify 77 4 9")
        vm.wait_line(r"^pv-guest: verify FAIL block 9$", timeout=60, start=m)
        log("ok: pv verify (ok and FAIL)")

        # pv writer, then pv stop
        m = vm.mark()
        vm.send("pv writer 55 3 20")
        vm.wait_line(r"^pv-guest: writer started 55 3 20$", timeout=10, start=m)
        vm.wait_line(r"^pv-guest: acked 55 22 2$", timeout=60, start=m)
        vm.send("pv stop")
        k, _ = vm.wait_line(r"^pv-guest: stopped$", timeout=10, start=m)
        time.sleep(1)
        writer_acks = {}
        order = []
        for _, l in vm.lines[m:]:
            x = re.match(r"^pv-guest: acked 55 (\d+) (\d+)$", l)
            if x:
                b, g = int(x.group(1)), int(x.group(2))
                order.append((b, g))
                writer_acks[b] = max(writer_acks.get(b, 0), g)
        exp_order = [(20 + n % 3, 1 + n // 3) for n in range(len(order))]
        check(order == exp_order, f"writer round-robin acks {order}")
        late = [l for _, l in vm.lines[k + 1:] if "acked 55" in l]
        check(len(late) <= 1, f"writer stopped (acks after 'stopped': {late})")

        # pv dirty, then pv stop
        m = vm.mark()
        idle = vm.dirty_rate()
        vm.send("pv dirty 32")
        vm.wait_line(r"^pv-guest: dirty started 32$", timeout=10, start=m)
        time.sleep(1)
        busy = vm.dirty_rate()
        vm.send("pv stop")
        vm.wait_line(r"^pv-guest: stopped$", timeout=10, start=m)
        time.sleep(1)
        after = vm.dirty_rate()
        check(busy > 4 * max(idle, 1) and busy > 4 * max(after, 1),
              f"pv dirty 32: dirty rate idle {idle} MiB/s, dirtying {busy} MiB/s, after stop {after} MiB/s")
        vm.wait_line(r"^pv-guest: heartbeat \d+$", timeout=10, start=vm.mark())
        log("ok: pv dirty / pv stop, heartbeat still running")

        # ACPI shutdown
        t = time.monotonic()
        vm.qmp_cmd("system_powerdown")
        vm.wait_event("SHUTDOWN", timeout=30)
        rc = vm.wait_exit(30)
        check(rc == 0, f"system_powerdown -> SHUTDOWN event and QEMU exit {rc} in {time.monotonic() - t:.2f}s")
        ev = [e for e in vm.events if e["event"] == "SHUTDOWN"][0]
        check(ev["data"].get("guest") is True, f"SHUTDOWN initiated by guest: {ev['data']}")

        # Host-side check of the raw disk.
        for b in range(8):
            check_block(vm, b, ("1234", b, 0))
        for b in range(10, 14):
            check_block(vm, b, ("77", b, 0))
        for b in (8, 9, 14):
            check(vm.read_block(b) == bytes(BLOCK), f"block {b} untouched (zero)")
        for b, g in sorted(writer_acks.items()):
            p = parse_block(vm.read_block(b))
            check(p is not None and p[0] == "55" and p[1] == b and p[2] >= g,
                  f"writer block {b}: on disk {p}, acked gen {g}")
        log("ok: raw disk content matches the documented block format")
        return boot
    finally:
        vm.kill()


def check_block(vm, b, want):
    data = vm.read_block(b)
    p = parse_block(data)
    check(p == want, f"disk block {b} = {p}")


def test_panic(kernel, initrd, workdir):
    vm = VM(kernel, initrd, workdir, "panic")
    try:
        vm.wait_line(r"^pv-guest: ready$", timeout=60)
        vm.send("pv panic")
        ev = vm.wait_event("GUEST_PANICKED", timeout=30)
        check(ev["data"].get("action") == "pause", f"pv panic -> GUEST_PANICKED {ev['data']}")
        st = vm.qmp_cmd("query-status")
        check(st["status"] == "guest-panicked", f"query-status {st}")
        vm.qmp_cmd("quit")
        vm.wait_exit(30)
    finally:
        vm.kill()


def test_poweroff(kernel, initrd, workdir):
    # Nobody connected to console.sock during boot: console.log must still
    # get everything; then connect and type a command.
    vm = VM(kernel, initrd, workdir, "poweroff", console=False)
    try:
        vm.wait_log(r"^pv-guest: heartbeat 1$", timeout=60)
        log("ok: console.log written without a console client")
        vm.connect_console()
        vm.wait_line(r"^pv-guest: heartbeat \d+$", timeout=10)
        vm.send("pv poweroff")
        vm.wait_event("SHUTDOWN", timeout=30)
        rc = vm.wait_exit(30)
        check(rc == 0, f"pv poweroff -> SHUTDOWN and QEMU exit {rc}")
    finally:
        vm.kill()


def test_nodisk(kernel, initrd, workdir):
    vm = VM(kernel, initrd, workdir, "nodisk", disk_mib=0)
    try:
        t = time.monotonic()
        vm.wait_line(r"^pv-guest: FATAL no /dev/vda$", timeout=60)
        ev = vm.wait_event("GUEST_PANICKED", timeout=30)
        check(True, f"no disk -> FATAL + GUEST_PANICKED {ev['data']} after {time.monotonic() - t:.1f}s")
        check(not any("pv-guest: ready" in l for _, l in vm.lines), "no ready line without disk")
    finally:
        vm.kill()
    vm = VM(kernel, initrd, workdir, "nodisk-ok", disk_mib=0, append=APPEND + " pv.nodisk=1")
    try:
        vm.wait_line(r"^pv-guest: ready$", timeout=60)
        vm.wait_line(r"^pv-guest: heartbeat 1$", timeout=10)
        m = vm.mark()
        vm.send("pv write 1 1")
        vm.wait_line(r"^pv-guest: no disk$", timeout=10, start=m)
        check(True, "pv.nodisk=1 boots to ready, pv write -> no disk")
        vm.qmp_cmd("system_powerdown")
        vm.wait_event("SHUTDOWN", timeout=30)
        vm.wait_exit(30)
    finally:
        vm.kill()


def _sigterm(signum, frame):
    raise SystemExit(f"killed by signal {signum}")


def main():
    signal.signal(signal.SIGTERM, _sigterm)
    if len(sys.argv) < 3:
        print(__doc__)
        return 2
    kernel, initrd = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
    own = len(sys.argv) < 4
    # Short base path: unix socket paths are limited to 107 bytes.
    workdir = tempfile.mkdtemp(prefix="pvsmoke.") if own else sys.argv[3]
    os.makedirs(workdir, exist_ok=True)
    try:
        boot = test_main(kernel, initrd, workdir)
        test_panic(kernel, initrd, workdir)
        test_poweroff(kernel, initrd, workdir)
        test_nodisk(kernel, initrd, workdir)
    except Exception as e:  # noqa: BLE001 - report any failure the same way
        log(f"FAIL: {type(e).__name__}: {e}")
        log(f"logs kept in {workdir}")
        return 1
    log(f"ALL OK (boot to ready: {boot:.2f}s)")
    if own:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
