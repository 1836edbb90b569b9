//! openraft's storage conformance suite against the redb log store and state
//! machine.

use openraft::testing::{StoreBuilder, Suite};
use pairvisor_unitdb::storage::{LogStore, StateMachine};
use pairvisor_unitdb::{StorageError, TypeConfig};
use tempfile::TempDir;

struct RedbBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for RedbBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = LogStore::open(&dir.path().join("log.redb")).expect("log store");
        let (events, _) = tokio::sync::broadcast::channel(16);
        let sm = StateMachine::open(&dir.path().join("state.redb"), events).expect("state machine");
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    Suite::test_all(RedbBuilder).expect("storage suite");
}
