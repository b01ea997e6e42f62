//! The supervisor's view of the state database. SQLite calls block (up to its busy timeout
//! while `gc` or a client writes), so they run on the blocking pool, never on the thread
//! that relays the VM's requests.

use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::store::{Store, VmRecord, VmState};

/// The VM's row, written and read off the event loop.
#[derive(Clone)]
pub(super) struct Record {
    store: Arc<Mutex<Store>>,
    id: String,
}

impl Record {
    pub(super) fn open(db: &std::path::Path, id: &str) -> Result<Record> {
        Ok(Record {
            store: Arc::new(Mutex::new(Store::open(db)?)),
            id: id.to_string(),
        })
    }

    /// Runs `f` on the store (and the VM's id) in the blocking pool.
    pub(super) async fn call<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Store, &str) -> Result<T> + Send + 'static,
    {
        let store = self.store.clone();
        let id = self.id.clone();
        tokio::task::spawn_blocking(move || {
            let s = store.lock().unwrap_or_else(|p| p.into_inner());
            f(&s, &id)
        })
        .await
        .map_err(|e| Error::Io {
            context: "a state database call of the supervisor".into(),
            source: std::io::Error::other(e.to_string()),
        })?
    }

    pub(super) async fn set_running(
        &self,
        supervisor_pid: u32,
        vmm_pid: u32,
        accel: crate::hypervisor::Accelerator,
    ) -> Result<()> {
        self.call(move |s, id| s.set_running(id, supervisor_pid, vmm_pid, accel))
            .await
    }

    pub(super) async fn set_state(&self, state: VmState, error: Option<String>) -> Result<()> {
        self.call(move |s, id| s.set_state(id, state, error.as_deref()))
            .await
    }

    pub(super) async fn get(&self) -> Result<Option<VmRecord>> {
        self.call(|s, id| s.get(id)).await
    }

    /// Deletes the VM (its files and row) after its owner died.
    pub(super) async fn remove_vm(
        &self,
        state_dir: std::path::PathBuf,
        rec: VmRecord,
    ) -> Result<()> {
        self.call(move |s, _| crate::cleanup::remove_vm(&state_dir, s, &rec).map(|_| ()))
            .await
    }
}
