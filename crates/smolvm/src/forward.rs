//! Port forwards (`expose_local`): a TCP port on the host reaches a port on the guest's
//! loopback through the agent channel, so they work in every network mode, `none`
//! included. The VM's supervisor serves and records them
//! ([`crate::supervisor::forward`]); they outlive the client that made them, come back
//! each time the VM starts, and go when removed or when the VM is deleted.

use std::collections::BTreeMap;
use std::net::IpAddr;

pub use smolvm_protocol::ForwardInfo;

use crate::error::{Error, Result};
use crate::vm::{Runtime, Vm};

fn check_port(field: &'static str, port: u16) -> Result<()> {
    if port == 0 {
        return Err(Error::InvalidConfig {
            field,
            value: "0".into(),
            allowed: "a TCP port from 1 to 65535".into(),
        });
    }
    Ok(())
}

impl Vm {
    /// Forwards a host port to `guest_port` on the guest's loopback and returns the forward.
    /// `host_port` `None` (or 0) picks a free port (the result says which); `bind` is the
    /// host address to listen on, 127.0.0.1 unless given. The VM must be running.
    ///
    /// Exposing the same host port to the same guest port again returns the existing
    /// forward; a host port in use fails with [`Error::Forward`] naming it.
    pub fn expose_local(
        &self,
        guest_port: u16,
        host_port: Option<u16>,
        bind: Option<IpAddr>,
    ) -> Result<ForwardInfo> {
        check_port("guest_port", guest_port)?;
        self.require_running()?;
        self.client().expose(
            guest_port,
            host_port.filter(|&p| p != 0),
            bind.map(|a| a.to_string()),
        )
    }

    /// Removes the VM's forwards on `host_port` (every host address); connections through
    /// them are closed. Works whether or not the VM runs.
    pub fn unexpose(&self, host_port: u16) -> Result<()> {
        check_port("host_port", host_port)?;
        self.info()?;
        if crate::supervisor::is_running(self.dir()) {
            return self.client().unexpose(host_port);
        }
        let removed = self
            .rt
            .with_store(|s| s.remove_forwards(self.id(), host_port))?;
        if removed == 0 {
            return Err(Error::forward(
                crate::error::ErrorKind::NotFound,
                format!(
                    "VM {} has no forward on host port {host_port} (see `smolvm port {}`)",
                    self.id(),
                    self.id()
                ),
            ));
        }
        Ok(())
    }

    /// The VM's recorded forwards, by host port (whether or not the VM runs).
    pub fn forwards(&self) -> Result<Vec<ForwardInfo>> {
        self.rt.with_store(|s| {
            if s.get(self.id())?.is_none() {
                return Err(Error::VmNotFound(self.id().to_string()));
            }
            s.forwards(self.id())
        })
    }

    /// The forwards the VM's supervisor serves now (empty when the VM is not running). A
    /// recorded forward missing here could not be re-established at start (its host port
    /// was taken); the supervisor's log says why.
    pub fn active_forwards(&self) -> Result<Vec<ForwardInfo>> {
        if !crate::supervisor::is_running(self.dir()) {
            return Ok(Vec::new());
        }
        self.client().forwards()
    }
}

impl Runtime {
    /// Every recorded forward, by VM id.
    pub(crate) fn forwards_by_vm(&self) -> Result<BTreeMap<String, Vec<ForwardInfo>>> {
        let mut by_vm: BTreeMap<String, Vec<ForwardInfo>> = BTreeMap::new();
        for (id, f) in self.with_store(|s| s.all_forwards())? {
            by_vm.entry(id).or_default().push(f);
        }
        Ok(by_vm)
    }
}
