//! VM state in SQLite (WAL, busy timeout, schema migrations): one row per VM.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use smolvm_protocol::ForwardInfo;

use crate::config::VmConfig;
use crate::error::{Error, Result};

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE vms (
    id             TEXT PRIMARY KEY,
    state          TEXT NOT NULL,
    config         TEXT NOT NULL,
    dir            TEXT NOT NULL,
    supervisor_pid INTEGER,
    qemu_pid       INTEGER,
    accelerator    TEXT,
    error          TEXT,
    created_at     INTEGER NOT NULL,
    started_at     INTEGER
);
"#,
    r#"
ALTER TABLE vms ADD COLUMN disk_path TEXT NOT NULL DEFAULT '';
ALTER TABLE vms ADD COLUMN api_socket TEXT NOT NULL DEFAULT '';
ALTER TABLE vms ADD COLUMN owner_pid INTEGER;
ALTER TABLE vms ADD COLUMN owner_start INTEGER;
ALTER TABLE vms ADD COLUMN ip TEXT;
ALTER TABLE vms ADD COLUMN stopped_at INTEGER;
"#,
    r#"
CREATE TABLE forwards (
    vm_id      TEXT NOT NULL,
    host_addr  TEXT NOT NULL,
    host_port  INTEGER NOT NULL,
    guest_port INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    UNIQUE (host_addr, host_port)
);
CREATE INDEX forwards_by_vm ON forwards (vm_id);
"#,
    r#"
CREATE TABLE addresses (
    ip    TEXT PRIMARY KEY,
    vm_id TEXT NOT NULL UNIQUE
);
"#,
    r#"
ALTER TABLE vms ADD COLUMN base TEXT;
"#,
];

/// The columns of a VM row, in the order [`row_to_record`] reads them.
const COLUMNS: &str = "id, state, config, dir, supervisor_pid, qemu_pid, accelerator, error, \
    created_at, started_at, disk_path, api_socket, owner_pid, owner_start, ip, stopped_at, base";

/// Lifecycle states of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// Recorded, never started (or being started).
    Created,
    /// Supervisor and QEMU are up.
    Running,
    /// Running, its vCPUs frozen (`pause`); `resume` lets it go on.
    Paused,
    /// Shut down cleanly.
    Stopped,
    /// Something died; `error` says what.
    Error,
}

impl VmState {
    /// Whether a supervisor runs the VM in this state (running or paused).
    pub fn is_live(self) -> bool {
        matches!(self, VmState::Running | VmState::Paused)
    }

    /// The state's name as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Created => "created",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopped => "stopped",
            VmState::Error => "error",
        }
    }

    fn parse(s: &str) -> VmState {
        match s {
            "created" => VmState::Created,
            "running" => VmState::Running,
            "paused" => VmState::Paused,
            "stopped" => VmState::Stopped,
            _ => VmState::Error,
        }
    }
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One VM's row.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmRecord {
    /// VM id.
    pub id: String,
    /// Recorded state (see [`crate::Runtime::list`] for the reconciled one).
    pub state: VmState,
    /// The validated config it was created with.
    pub config: VmConfig,
    /// Its private directory.
    pub dir: String,
    /// Pid of its supervisor, while running.
    pub supervisor_pid: Option<u32>,
    /// Pid of its QEMU, while running.
    pub qemu_pid: Option<u32>,
    /// Accelerator it runs on.
    pub accelerator: Option<String>,
    /// Why it is in the error state.
    pub error: Option<String>,
    /// Creation time, Unix seconds.
    pub created_at: i64,
    /// Last start time, Unix seconds.
    pub started_at: Option<i64>,
    /// The VM's root disk.
    pub disk_path: String,
    /// The VM's API socket (present while it runs).
    pub api_socket: String,
    /// The process whose death deletes the VM (ephemeral VMs), if any.
    pub owner: Option<Owner>,
    /// The guest's address, when it has a network with a host-assigned one.
    pub ip: Option<String>,
    /// Last stop time, Unix seconds.
    pub stopped_at: Option<i64>,
    /// The saved state the VM's disk builds on (`template:KEY` or `snapshot:NAME`), if any.
    pub base: Option<String>,
}

/// A process identified so that a recycled pid is not mistaken for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// Its pid.
    pub pid: u32,
    /// Its start time (clock ticks after boot, field 22 of /proc/PID/stat).
    pub start: u64,
}

impl Owner {
    /// This process.
    pub fn current() -> Option<Owner> {
        Owner::of(std::process::id())
    }

    /// The process `pid`, if it exists.
    pub fn of(pid: u32) -> Option<Owner> {
        crate::util::process_start_ticks(pid).map(|start| Owner { pid, start })
    }

    /// Whether this very process still runs.
    pub fn alive(&self) -> bool {
        crate::util::pid_alive(self.pid)
            && crate::util::process_start_ticks(self.pid) == Some(self.start)
    }
}

/// A handle on the state database.
pub struct Store {
    conn: Connection,
}

fn db_err(context: &str) -> impl FnOnce(rusqlite::Error) -> Error + '_ {
    move |source| Error::Store {
        context: context.to_string(),
        source,
    }
}

impl Store {
    /// Opens (creating and migrating as needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Store> {
        let conn = Connection::open(path).map_err(db_err("opening the database"))?;
        conn.busy_timeout(Duration::from_secs(10))
            .map_err(db_err("setting busy timeout"))?;
        enable_wal(&conn)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(db_err("setting synchronous"))?;
        let mut store = Store { conn };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&mut self) -> Result<()> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(db_err("starting migration"))?;
        let version: usize = tx
            .pragma_query_value(None, "user_version", |r| r.get::<_, i64>(0))
            .map_err(db_err("reading schema version"))? as usize;
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
            tx.execute_batch(sql).map_err(db_err("migrating schema"))?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)
                .map_err(db_err("recording schema version"))?;
        }
        tx.commit().map_err(db_err("committing migration"))
    }

    /// Inserts a new VM; fails with [`Error::VmExists`] if the id is taken.
    pub fn insert(&self, rec: &VmRecord) -> Result<()> {
        let config = serde_json::to_string(&rec.config.redacted()).unwrap_or_default();
        let res = self.conn.execute(
            "INSERT INTO vms (id, state, config, dir, created_at, disk_path, api_socket, owner_pid, owner_start) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                rec.id,
                rec.state.as_str(),
                config,
                rec.dir,
                rec.created_at,
                rec.disk_path,
                rec.api_socket,
                rec.owner.map(|o| o.pid),
                rec.owner.map(|o| o.start as i64)
            ],
        );
        match res {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(Error::VmExists(rec.id.clone()))
            }
            Err(e) => Err(db_err("recording the VM")(e)),
        }
    }

    /// Reads one VM.
    pub fn get(&self, id: &str) -> Result<Option<VmRecord>> {
        self.conn
            .query_row(
                &format!("SELECT {COLUMNS} FROM vms WHERE id = ?1"),
                params![id],
                row_to_record,
            )
            .optional()
            .map_err(db_err("reading the VM"))
    }

    /// Reads every VM, oldest first.
    pub fn list(&self) -> Result<Vec<VmRecord>> {
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT {COLUMNS} FROM vms ORDER BY created_at, id"
            ))
            .map_err(db_err("listing VMs"))?;
        let rows = stmt
            .query_map([], row_to_record)
            .map_err(db_err("listing VMs"))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(db_err("listing VMs"))
    }

    /// Marks a VM running with its processes.
    pub fn set_running(
        &self,
        id: &str,
        supervisor_pid: u32,
        qemu_pid: u32,
        accel: &str,
    ) -> Result<()> {
        self.conn
            .execute(
                "UPDATE vms SET state='running', supervisor_pid=?2, qemu_pid=?3, accelerator=?4, error=NULL, started_at=?5 WHERE id=?1",
                params![id, supervisor_pid, qemu_pid, accel, crate::util::now_unix()],
            )
            .map_err(db_err("recording the VM as running"))?;
        Ok(())
    }

    /// Sets a VM's state (clearing its pids unless running) and error text.
    pub fn set_state(&self, id: &str, state: VmState, error: Option<&str>) -> Result<()> {
        let sql = if state.is_live() {
            "UPDATE vms SET state=?2, error=?3 WHERE id=?1"
        } else {
            "UPDATE vms SET state=?2, error=?3, supervisor_pid=NULL, qemu_pid=NULL, stopped_at=?4 WHERE id=?1"
        };
        let now = crate::util::now_unix();
        let res = if state.is_live() {
            self.conn.execute(sql, params![id, state.as_str(), error])
        } else {
            self.conn
                .execute(sql, params![id, state.as_str(), error, now])
        };
        res.map_err(db_err("updating the VM's state"))?;
        Ok(())
    }

    /// Marks a VM whose supervisor died as `error`, only if it is still recorded as running
    /// under that supervisor. Returns whether it changed the row.
    pub fn mark_lost(&self, id: &str, supervisor_pid: Option<u32>, why: &str) -> Result<bool> {
        let n = self
            .conn
            .execute(
                "UPDATE vms SET state='error', error=?3, supervisor_pid=NULL, qemu_pid=NULL, stopped_at=?4 \
                 WHERE id=?1 AND state IN ('running', 'paused') AND supervisor_pid IS ?2",
                params![id, supervisor_pid, why, crate::util::now_unix()],
            )
            .map_err(db_err("recording the VM's supervisor as gone"))?;
        Ok(n > 0)
    }

    /// Records the VM's root disk.
    pub fn set_disk(&self, id: &str, disk_path: &str) -> Result<()> {
        self.conn
            .execute(
                "UPDATE vms SET disk_path=?2 WHERE id=?1",
                params![id, disk_path],
            )
            .map_err(db_err("recording the VM's disk"))?;
        Ok(())
    }

    /// Records (or, with `None`, clears) the saved state the VM's disk builds on.
    pub fn set_base(&self, id: &str, base: Option<&str>) -> Result<()> {
        self.conn
            .execute("UPDATE vms SET base=?2 WHERE id=?1", params![id, base])
            .map_err(db_err("recording the VM's base"))?;
        Ok(())
    }

    /// Ids of the VMs whose disks build on `base` (see [`VmRecord::base`]).
    pub fn vms_on_base(&self, base: &str) -> Result<Vec<String>> {
        let mut stmt = self
            .conn
            .prepare("SELECT id FROM vms WHERE base=?1 ORDER BY id")
            .map_err(db_err("listing VMs by base"))?;
        let ids = stmt
            .query_map(params![base], |r| r.get::<_, String>(0))
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(db_err("listing VMs by base"))?;
        Ok(ids)
    }

    /// Records (or, with `None`, clears) the guest's address shown by `ls`, `inspect` and the
    /// SDK's `get_ip()`.
    pub fn set_ip(&self, id: &str, ip: Option<&str>) -> Result<()> {
        self.conn
            .execute("UPDATE vms SET ip=?2 WHERE id=?1", params![id, ip])
            .map_err(db_err("recording the VM's address"))?;
        Ok(())
    }

    /// Records (or clears) the process whose death deletes the VM. Returns false when the
    /// row is gone.
    pub fn set_owner(&self, id: &str, owner: Option<Owner>) -> Result<bool> {
        let n = self
            .conn
            .execute(
                "UPDATE vms SET owner_pid=?2, owner_start=?3 WHERE id=?1",
                params![id, owner.map(|o| o.pid), owner.map(|o| o.start as i64)],
            )
            .map_err(db_err("recording the VM's owner"))?;
        Ok(n > 0)
    }

    /// Removes a VM's row, its port forwards and its address (free for reuse).
    pub fn delete(&self, id: &str) -> Result<()> {
        let tx = self
            .conn
            .unchecked_transaction()
            .map_err(db_err("removing the VM"))?;
        tx.execute("DELETE FROM forwards WHERE vm_id=?1", params![id])
            .map_err(db_err("removing the VM's port forwards"))?;
        tx.execute("DELETE FROM addresses WHERE vm_id=?1", params![id])
            .map_err(db_err("releasing the VM's address"))?;
        tx.execute("DELETE FROM vms WHERE id=?1", params![id])
            .map_err(db_err("removing the VM"))?;
        tx.commit().map_err(db_err("removing the VM"))
    }

    /// Allocates the lowest free `nat` address to `vm_id` (the same one again if it has
    /// one) and records it in its row too. One immediate transaction: concurrent
    /// allocations, from threads or processes, never get the same address.
    pub fn allocate_address(&self, vm_id: &str) -> Result<Ipv4Addr> {
        use crate::network::alloc;
        let tx = rusqlite::Transaction::new_unchecked(
            &self.conn,
            rusqlite::TransactionBehavior::Immediate,
        )
        .map_err(db_err("allocating an address"))?;
        if let Some(ip) = address_in(&tx, vm_id)? {
            return Ok(ip);
        }
        let mut used: Vec<u32> = {
            let mut stmt = tx
                .prepare("SELECT ip FROM addresses")
                .map_err(db_err("reading addresses"))?;
            let rows = stmt
                .query_map([], |r| r.get::<_, String>(0))
                .map_err(db_err("reading addresses"))?;
            rows.filter_map(|r| r.ok())
                .filter_map(|s| s.parse::<Ipv4Addr>().ok())
                .filter_map(alloc::offset_of)
                .collect()
        };
        used.sort_unstable();
        let off = alloc::lowest_free(&used).ok_or_else(|| {
            Error::Network(format!(
                "the address pool {} is full ({} VMs hold an address); delete some VMs",
                alloc::POOL_CIDR,
                used.len()
            ))
        })?;
        let ip = alloc::addr_at(off);
        tx.execute(
            "INSERT INTO addresses (ip, vm_id) VALUES (?1, ?2)",
            params![ip.to_string(), vm_id],
        )
        .map_err(db_err("recording the address"))?;
        tx.execute(
            "UPDATE vms SET ip=?2 WHERE id=?1",
            params![vm_id, ip.to_string()],
        )
        .map_err(db_err("recording the address"))?;
        tx.commit().map_err(db_err("allocating an address"))?;
        Ok(ip)
    }

    /// The `nat` address allocated to `vm_id`, if any.
    pub fn address_of(&self, vm_id: &str) -> Result<Option<Ipv4Addr>> {
        address_in(&self.conn, vm_id)
    }

    /// Every allocated address with its VM's id, by address.
    pub fn addresses(&self) -> Result<Vec<(Ipv4Addr, String)>> {
        let mut stmt = self
            .conn
            .prepare("SELECT ip, vm_id FROM addresses")
            .map_err(db_err("reading addresses"))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(db_err("reading addresses"))?;
        let mut v: Vec<(Ipv4Addr, String)> = rows
            .filter_map(|r| r.ok())
            .filter_map(|(ip, id)| ip.parse().ok().map(|ip| (ip, id)))
            .collect();
        v.sort();
        Ok(v)
    }

    /// Releases `vm_id`'s address; returns whether it had one.
    pub fn release_address(&self, vm_id: &str) -> Result<bool> {
        let n = self
            .conn
            .execute("DELETE FROM addresses WHERE vm_id=?1", params![vm_id])
            .map_err(db_err("releasing the address"))?;
        Ok(n > 0)
    }

    /// Removes addresses whose VM no longer exists; returns them.
    pub fn remove_orphan_addresses(&self) -> Result<Vec<(Ipv4Addr, String)>> {
        let orphans: Vec<(Ipv4Addr, String)> = {
            let mut stmt = self
                .conn
                .prepare("SELECT ip, vm_id FROM addresses WHERE vm_id NOT IN (SELECT id FROM vms)")
                .map_err(db_err("reading addresses"))?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
                .map_err(db_err("reading addresses"))?;
            rows.filter_map(|r| r.ok())
                .filter_map(|(ip, id)| ip.parse().ok().map(|ip| (ip, id)))
                .collect()
        };
        self.conn
            .execute(
                "DELETE FROM addresses WHERE vm_id NOT IN (SELECT id FROM vms)",
                params![],
            )
            .map_err(db_err("removing orphan addresses"))?;
        Ok(orphans)
    }

    /// Records a port forward of the VM `vm_id`. Fails with [`Error::Forward`], naming the
    /// holder, when a forward on the same host address and port is already recorded.
    pub fn add_forward(&self, vm_id: &str, f: &ForwardInfo) -> Result<()> {
        let res = self.conn.execute(
            "INSERT INTO forwards (vm_id, host_addr, host_port, guest_port, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                vm_id,
                f.host_addr,
                f.host_port,
                f.guest_port,
                crate::util::now_unix()
            ],
        );
        match res {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                let holder: Option<String> = self
                    .conn
                    .query_row(
                        "SELECT vm_id FROM forwards WHERE host_addr=?1 AND host_port=?2",
                        params![f.host_addr, f.host_port],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(db_err("reading port forwards"))?;
                let holder = holder.unwrap_or_else(|| "another VM".into());
                Err(Error::forward(
                    crate::error::ErrorKind::Busy,
                    format!(
                        "host port {}:{} is already recorded as a forward of VM {holder} \
                     (remove it with `smolvm port {holder} --rm {}`, or choose another host port)",
                        f.host_addr, f.host_port, f.host_port
                    ),
                ))
            }
            Err(e) => Err(db_err("recording the port forward")(e)),
        }
    }

    /// Removes the VM's forwards on `host_port` (on any host address); returns how many.
    pub fn remove_forwards(&self, vm_id: &str, host_port: u16) -> Result<usize> {
        self.conn
            .execute(
                "DELETE FROM forwards WHERE vm_id=?1 AND host_port=?2",
                params![vm_id, host_port],
            )
            .map_err(db_err("removing the port forward"))
    }

    /// The VM's recorded port forwards, by host port.
    pub fn forwards(&self, vm_id: &str) -> Result<Vec<ForwardInfo>> {
        Ok(self
            .query_forwards("WHERE vm_id=?1", params![vm_id])?
            .into_iter()
            .map(|(_, f)| f)
            .collect())
    }

    /// Every recorded port forward with its VM's id, by VM and host port.
    pub fn all_forwards(&self) -> Result<Vec<(String, ForwardInfo)>> {
        self.query_forwards("", params![])
    }

    /// Removes forwards whose VM no longer exists (left by a crash between deleting a VM's
    /// row and its forwards, or by an older smolvm); returns them.
    pub fn remove_orphan_forwards(&self) -> Result<Vec<(String, ForwardInfo)>> {
        let orphans = self.query_forwards("WHERE vm_id NOT IN (SELECT id FROM vms)", params![])?;
        self.conn
            .execute(
                "DELETE FROM forwards WHERE vm_id NOT IN (SELECT id FROM vms)",
                params![],
            )
            .map_err(db_err("removing orphan port forwards"))?;
        Ok(orphans)
    }

    fn query_forwards(
        &self,
        filter: &str,
        args: impl rusqlite::Params,
    ) -> Result<Vec<(String, ForwardInfo)>> {
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT vm_id, host_addr, host_port, guest_port FROM forwards {filter} \
                 ORDER BY vm_id, host_port, host_addr"
            ))
            .map_err(db_err("reading port forwards"))?;
        let rows = stmt
            .query_map(args, |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    ForwardInfo {
                        host_addr: r.get(1)?,
                        host_port: r.get(2)?,
                        guest_port: r.get(3)?,
                    },
                ))
            })
            .map_err(db_err("reading port forwards"))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(db_err("reading port forwards"))
    }
}

/// Switches the database to WAL (a persistent setting). Changing the journal mode needs an
/// exclusive lock and SQLite does not wait for it through the busy handler, so when several
/// processes open a fresh database at once we retry for a while ourselves.
fn enable_wal(conn: &Connection) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mode =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get::<_, String>(0));
        match mode {
            Ok(m) if m.eq_ignore_ascii_case("wal") => return Ok(()),
            Ok(m) => {
                return Err(Error::Store {
                    context: format!("enabling WAL (the database stayed in {m} mode)"),
                    source: rusqlite::Error::InvalidQuery,
                })
            }
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(db_err("enabling WAL")(e)),
        }
    }
}

fn row_to_record(r: &rusqlite::Row<'_>) -> rusqlite::Result<VmRecord> {
    let config: String = r.get(2)?;
    let state: String = r.get(1)?;
    Ok(VmRecord {
        id: r.get(0)?,
        state: VmState::parse(&state),
        config: serde_json::from_str(&config).unwrap_or_default(),
        dir: r.get(3)?,
        supervisor_pid: r.get(4)?,
        qemu_pid: r.get(5)?,
        accelerator: r.get(6)?,
        error: r.get(7)?,
        created_at: r.get(8)?,
        started_at: r.get(9)?,
        disk_path: r.get(10)?,
        api_socket: r.get(11)?,
        owner: match (r.get::<_, Option<u32>>(12)?, r.get::<_, Option<i64>>(13)?) {
            (Some(pid), Some(start)) => Some(Owner {
                pid,
                start: start as u64,
            }),
            _ => None,
        },
        ip: r.get(14)?,
        stopped_at: r.get(15)?,
        base: r.get(16)?,
    })
}

/// The address recorded for `vm_id` on `conn` (a connection or an open transaction).
fn address_in(conn: &rusqlite::Connection, vm_id: &str) -> Result<Option<Ipv4Addr>> {
    let ip: Option<String> = conn
        .query_row(
            "SELECT ip FROM addresses WHERE vm_id=?1",
            params![vm_id],
            |r| r.get(0),
        )
        .optional()
        .map_err(db_err("reading addresses"))?;
    Ok(ip.and_then(|s| s.parse().ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str) -> VmRecord {
        VmRecord {
            id: id.into(),
            state: VmState::Created,
            config: VmConfig::default(),
            dir: "/nonexistent".into(),
            supervisor_pid: None,
            qemu_pid: None,
            accelerator: None,
            error: None,
            created_at: 1,
            started_at: None,
            disk_path: "/nonexistent/disk.qcow2".into(),
            api_socket: "/nonexistent/api.sock".into(),
            owner: None,
            ip: None,
            stopped_at: None,
            base: None,
        }
    }

    #[test]
    fn insert_get_update_delete() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db")).unwrap();
        s.insert(&rec("a")).unwrap();
        assert!(matches!(s.insert(&rec("a")), Err(Error::VmExists(_))));
        s.set_running("a", 10, 11, "tcg").unwrap();
        let r = s.get("a").unwrap().unwrap();
        assert_eq!(r.state, VmState::Running);
        assert_eq!(r.qemu_pid, Some(11));
        s.set_state("a", VmState::Error, Some("boom")).unwrap();
        let r = s.get("a").unwrap().unwrap();
        assert_eq!(
            (r.state, r.error.as_deref(), r.qemu_pid),
            (VmState::Error, Some("boom"), None)
        );
        assert_eq!(s.list().unwrap().len(), 1);
        s.set_ip("a", Some("10.0.2.15")).unwrap();
        assert_eq!(
            s.get("a").unwrap().unwrap().ip.as_deref(),
            Some("10.0.2.15")
        );
        s.set_ip("a", None).unwrap();
        assert_eq!(s.get("a").unwrap().unwrap().ip, None);
        s.delete("a").unwrap();
        assert!(s.get("a").unwrap().is_none());
        // Reopening keeps the schema version and does not re-run migrations.
        drop(s);
        Store::open(&dir.path().join("db")).unwrap();
    }

    fn fwd(addr: &str, host_port: u16, guest_port: u16) -> ForwardInfo {
        ForwardInfo {
            host_addr: addr.into(),
            host_port,
            guest_port,
        }
    }

    #[test]
    fn forwards_are_unique_per_address_and_port_and_go_with_their_vm() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db")).unwrap();
        s.insert(&rec("a")).unwrap();
        s.insert(&rec("b")).unwrap();
        s.add_forward("a", &fwd("127.0.0.1", 8080, 80)).unwrap();
        s.add_forward("a", &fwd("::1", 8080, 80)).unwrap();
        s.add_forward("a", &fwd("127.0.0.1", 8443, 443)).unwrap();
        // Taken by a: refused, naming the holder.
        let err = s.add_forward("b", &fwd("127.0.0.1", 8080, 81)).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Forward {
                    kind: crate::error::ErrorKind::Busy,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("VM a"), "{err}");
        s.add_forward("b", &fwd("127.0.0.1", 9000, 90)).unwrap();
        assert_eq!(
            s.forwards("a").unwrap(),
            vec![
                fwd("127.0.0.1", 8080, 80),
                fwd("::1", 8080, 80),
                fwd("127.0.0.1", 8443, 443)
            ]
        );
        assert_eq!(s.all_forwards().unwrap().len(), 4);
        // Removing by host port takes every address of that port, of that VM only.
        assert_eq!(s.remove_forwards("b", 8080).unwrap(), 0);
        assert_eq!(s.remove_forwards("a", 8080).unwrap(), 2);
        assert_eq!(s.forwards("a").unwrap(), vec![fwd("127.0.0.1", 8443, 443)]);
        // Deleting a VM deletes its forwards.
        s.delete("a").unwrap();
        assert!(s.forwards("a").unwrap().is_empty());
        assert_eq!(s.forwards("b").unwrap(), vec![fwd("127.0.0.1", 9000, 90)]);
        // Rows of a VM that is gone (e.g. removed by an older smolvm) are found by gc.
        s.conn
            .execute("DELETE FROM vms WHERE id='b'", params![])
            .unwrap();
        let orphans = s.remove_orphan_forwards().unwrap();
        assert_eq!(orphans, vec![("b".to_string(), fwd("127.0.0.1", 9000, 90))]);
        assert!(s.all_forwards().unwrap().is_empty());
    }

    /// A database made by generation 2 of the schema migrates to 3 with its rows intact.
    #[test]
    fn migration_3_adds_forwards_to_an_existing_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let conn = Connection::open(&path).unwrap();
            for sql in &MIGRATIONS[..2] {
                conn.execute_batch(sql).unwrap();
            }
            conn.pragma_update(None, "user_version", 2i64).unwrap();
            conn.execute(
                "INSERT INTO vms (id, state, config, dir, created_at) VALUES ('old', 'stopped', '{}', '/x', 1)",
                params![],
            )
            .unwrap();
        }
        let s = Store::open(&path).unwrap();
        let version: i64 = s
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version as usize, MIGRATIONS.len());
        assert_eq!(s.get("old").unwrap().unwrap().state, VmState::Stopped);
        s.add_forward("old", &fwd("127.0.0.1", 1234, 22)).unwrap();
        assert_eq!(s.forwards("old").unwrap().len(), 1);
    }

    #[test]
    fn addresses_are_lowest_free_never_shared_and_reused() {
        use crate::network::alloc::addr_at;
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db")).unwrap();
        let mut got = std::collections::BTreeSet::new();
        for i in 0..300 {
            let id = format!("vm-{i}");
            s.insert(&rec(&id)).unwrap();
            let ip = s.allocate_address(&id).unwrap();
            assert!(got.insert(ip), "{ip} given twice");
            // Asking again gives the VM its own address, not a new one.
            assert_eq!(s.allocate_address(&id).unwrap(), ip);
        }
        // Past the first /24, and recorded in the row.
        assert_eq!(s.address_of("vm-299").unwrap(), Some(addr_at(301)));
        assert_eq!(
            s.get("vm-299").unwrap().unwrap().ip.as_deref(),
            Some("172.16.1.45")
        );
        // Freed addresses are reused, lowest first.
        s.delete("vm-10").unwrap();
        s.delete("vm-5").unwrap();
        assert!(s.release_address("vm-250").unwrap());
        s.insert(&rec("n1")).unwrap();
        s.insert(&rec("n2")).unwrap();
        s.insert(&rec("n3")).unwrap();
        assert_eq!(s.allocate_address("n1").unwrap(), addr_at(7));
        assert_eq!(s.allocate_address("n2").unwrap(), addr_at(12));
        assert_eq!(s.allocate_address("n3").unwrap(), addr_at(252));
        let all = s.addresses().unwrap();
        let distinct: std::collections::BTreeSet<_> = all.iter().map(|(ip, _)| *ip).collect();
        assert_eq!(distinct.len(), all.len());
        assert_eq!(all.len(), 300);
        // An address row whose VM is gone is found by gc.
        s.conn
            .execute("DELETE FROM vms WHERE id='vm-1'", params![])
            .unwrap();
        let orphans = s.remove_orphan_addresses().unwrap();
        assert_eq!(orphans, vec![(addr_at(3), "vm-1".to_string())]);
    }

    #[test]
    fn concurrent_allocations_are_distinct() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        Store::open(&path).unwrap();
        let handles: Vec<_> = (0..8)
            .map(|t| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let s = Store::open(&path).unwrap();
                    (0..25)
                        .map(|i| {
                            let id = format!("vm-{t}-{i}");
                            s.insert(&rec(&id)).unwrap();
                            s.allocate_address(&id).unwrap()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all = Vec::new();
        for h in handles {
            all.extend(h.join().unwrap());
        }
        let distinct: std::collections::BTreeSet<_> = all.iter().collect();
        assert_eq!(distinct.len(), 200);
    }

    #[test]
    fn concurrent_opens_of_a_fresh_database_never_see_locked() {
        for round in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(format!("db{round}"));
            let handles: Vec<_> = (0..8)
                .map(|i| {
                    let path = path.clone();
                    std::thread::spawn(move || {
                        let s = Store::open(&path).unwrap();
                        s.insert(&rec(&format!("vm-{i}"))).unwrap();
                    })
                })
                .collect();
            for h in handles {
                h.join().unwrap();
            }
            assert_eq!(Store::open(&path).unwrap().list().unwrap().len(), 8);
        }
    }
}
