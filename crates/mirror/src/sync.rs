//! Group commit: many writers share one `fdatasync`.
//!
//! A writer first completes its `pwrite`, then takes a ticket with
//! [`GroupSync::note_write`] and waits with [`GroupSync::wait_durable`].
//! One waiter at a time becomes the leader: it reads the highest ticket
//! issued so far, calls `fdatasync`, and declares every ticket up to that
//! one durable. Writes whose tickets were issued after the leader started
//! wait for the next round. So an in-flight batch of N writes costs about
//! two `fdatasync` calls instead of N.

use std::fs::File;
use std::io;
use std::sync::{Condvar, Mutex};

#[derive(Debug, Default)]
struct State {
    issued: u64,
    durable: u64,
    running: bool,
    /// Set after a failed fdatasync: the page cache can no longer be trusted.
    failed: Option<String>,
}

/// Shares `fdatasync` calls on one file among concurrent writers.
#[derive(Debug)]
pub struct GroupSync {
    file: File,
    state: Mutex<State>,
    cv: Condvar,
}

impl GroupSync {
    /// Group commit for `file` (a duplicate handle of the written file).
    pub fn new(file: File) -> Self {
        GroupSync {
            file,
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that a write completed; returns its ticket.
    pub fn note_write(&self) -> u64 {
        let mut st = self.lock();
        st.issued += 1;
        st.issued
    }

    /// True if the write with `ticket` is durable (without waiting).
    pub fn is_durable(&self, ticket: u64) -> bool {
        let st = self.lock();
        st.failed.is_none() && st.durable >= ticket
    }

    /// The highest ticket issued so far.
    pub fn issued(&self) -> u64 {
        self.lock().issued
    }

    /// Blocks until the write with `ticket` (and every earlier one) is
    /// durable.
    pub fn wait_durable(&self, ticket: u64) -> io::Result<()> {
        let mut st = self.lock();
        loop {
            if let Some(msg) = &st.failed {
                return Err(io::Error::other(format!(
                    "an earlier fdatasync failed: {msg}"
                )));
            }
            if st.durable >= ticket {
                return Ok(());
            }
            if !st.running {
                st.running = true;
                let target = st.issued;
                drop(st);
                let res = self.file.sync_data();
                st = self.lock();
                st.running = false;
                match res {
                    Ok(()) => st.durable = st.durable.max(target),
                    Err(e) => st.failed = Some(e.to_string()),
                }
                self.cv.notify_all();
            } else {
                st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
            }
        }
    }

    /// Makes every write completed before this call durable.
    pub fn sync(&self) -> io::Result<()> {
        let t = self.note_write();
        self.wait_durable(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn concurrent_writers_all_become_durable() {
        let f = tempfile::tempfile().unwrap();
        let gs = Arc::new(GroupSync::new(f));
        let handles: Vec<_> = (0..16)
            .map(|_| {
                let gs = gs.clone();
                std::thread::spawn(move || {
                    for _ in 0..20 {
                        gs.sync().unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let st = gs.lock();
        assert_eq!(st.issued, 320);
        assert_eq!(st.durable, 320);
    }
}
