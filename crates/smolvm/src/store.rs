//! VM state in SQLite (WAL, busy timeout, schema migrations): one row per VM.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use smolvm_protocol::ForwardInfo;

use crate::config::VmConfig;
use crate::error::{Error, Result};
use crate::hypervisor::Accelerator;

/// One step of the schema: SQL, or code for what SQL cannot say.
enum Migration {
    Sql(&'static str),
    Code(fn(&rusqlite::Transaction<'_>) -> Result<()>),
}

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[Migration] = &[
    Migration::Sql(
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
    ),
    Migration::Sql(
        r#"
ALTER TABLE vms ADD COLUMN disk_path TEXT NOT NULL DEFAULT '';
ALTER TABLE vms ADD COLUMN api_socket TEXT NOT NULL DEFAULT '';
ALTER TABLE vms ADD COLUMN owner_pid INTEGER;
ALTER TABLE vms ADD COLUMN owner_start INTEGER;
ALTER TABLE vms ADD COLUMN ip TEXT;
ALTER TABLE vms ADD COLUMN stopped_at INTEGER;
"#,
    ),
    Migration::Sql(
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
    ),
    Migration::Sql(
        r#"
CREATE TABLE addresses (
    ip    TEXT PRIMARY KEY,
    vm_id TEXT NOT NULL UNIQUE
);
"#,
    ),
    Migration::Sql(
        r#"
ALTER TABLE vms ADD COLUMN base TEXT;
"#,
    ),
    Migration::Code(base_to_json),
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

    /// Every state, in the order of its life.
    pub const ALL: [VmState; 5] = [
        VmState::Created,
        VmState::Running,
        VmState::Paused,
        VmState::Stopped,
        VmState::Error,
    ];

    /// The state stored as `s`, if it is one.
    pub fn parse(s: &str) -> Option<VmState> {
        VmState::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The saved state a VM's disk builds on (stored as JSON in the `base` column).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Base {
    /// An image's template: `IMAGE/templates/KEY` (see [`crate::snapshot::template`]).
    Template {
        /// The image.
        image: String,
        /// The template's key.
        key: String,
    },
    /// A named snapshot, or the state a fork was made from.
    Snapshot {
        /// Its name.
        name: String,
    },
}

impl Base {
    /// The snapshot `name`.
    pub fn snapshot(name: &str) -> Base {
        Base::Snapshot {
            name: name.to_string(),
        }
    }

    /// The template `key` of `image`.
    pub fn template(image: &str, key: &str) -> Base {
        Base::Template {
            image: image.to_string(),
            key: key.to_string(),
        }
    }

    fn to_json(&self) -> String {
        // A plain enum of strings always serializes.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Shown as `template:IMAGE/KEY` or `snapshot:NAME` (what `--timings`, `inspect` and the
/// SDK's start timings print); never parsed back.
impl std::fmt::Display for Base {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Base::Template { image, key } => write!(f, "template:{image}/{key}"),
            Base::Snapshot { name } => write!(f, "snapshot:{name}"),
        }
    }
}

/// One VM's row.
#[derive(Debug, Clone, Serialize)]
pub struct VmRecord {
    /// VM id.
    pub id: String,
    /// Recorded state (see [`crate::Runtime::list`] for the reconciled one).
    pub state: VmState,
    /// The validated config it was created with.
    pub config: VmConfig,
    /// Its private directory.
    pub dir: PathBuf,
    /// Pid of its supervisor, while running.
    pub supervisor_pid: Option<u32>,
    /// Pid of its QEMU, while running.
    pub qemu_pid: Option<u32>,
    /// Accelerator it runs on (since its first start).
    pub accelerator: Option<Accelerator>,
    /// Why it is in the error state.
    pub error: Option<String>,
    /// Creation time, Unix seconds.
    pub created_at: i64,
    /// Last start time, Unix seconds.
    pub started_at: Option<i64>,
    /// The VM's root disk (empty until `create` has made it).
    pub disk_path: PathBuf,
    /// The VM's API socket (present while it runs).
    pub api_socket: PathBuf,
    /// The process whose death deletes the VM (ephemeral VMs), if any.
    pub owner: Option<Owner>,
    /// The guest's address, when it has a network with a host-assigned one.
    pub ip: Option<Ipv4Addr>,
    /// Last stop time, Unix seconds.
    pub stopped_at: Option<i64>,
    /// The saved state the VM's disk builds on, if any (shown as text, see [`Base`]).
    #[serde(serialize_with = "base_as_text")]
    pub base: Option<Base>,
}

fn base_as_text<S: serde::Serializer>(
    b: &Option<Base>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    match b {
        Some(b) => s.collect_str(b),
        None => s.serialize_none(),
    }
}

impl VmRecord {
    /// A VM as `create` first records it: state `created`, no disk yet, its API socket in
    /// `dir`, made now.
    pub fn new(id: &str, config: VmConfig, dir: &Path, owner: Option<Owner>) -> VmRecord {
        VmRecord {
            id: id.to_string(),
            state: VmState::Created,
            config,
            dir: dir.to_path_buf(),
            supervisor_pid: None,
            qemu_pid: None,
            accelerator: None,
            error: None,
            created_at: crate::util::now_unix(),
            started_at: None,
            disk_path: PathBuf::new(),
            api_socket: dir.join(crate::supervisor::files::API_SOCK),
            owner,
            ip: None,
            stopped_at: None,
            base: None,
        }
    }
}

/// A row that does not read as a VM record (see [`Error::CorruptRecord`]): what is known of
/// it, enough to remove it.
#[derive(Debug, Clone)]
pub struct CorruptRow {
    /// The VM's id.
    pub id: String,
    /// Its directory, as recorded.
    pub dir: PathBuf,
    /// What does not read.
    pub what: String,
}

impl CorruptRow {
    /// The error naming the VM.
    pub fn error(&self) -> Error {
        Error::CorruptRecord {
            id: self.id.clone(),
            what: self.what.clone(),
        }
    }
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
        for (i, step) in MIGRATIONS.iter().enumerate().skip(version) {
            match step {
                Migration::Sql(sql) => tx.execute_batch(sql).map_err(db_err("migrating schema"))?,
                Migration::Code(f) => f(&tx)?,
            }
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
                path_text(&rec.dir),
                rec.created_at,
                path_text(&rec.disk_path),
                path_text(&rec.api_socket),
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

    /// Reads one VM; a row that does not read is [`Error::CorruptRecord`] naming it.
    pub fn get(&self, id: &str) -> Result<Option<VmRecord>> {
        let row = self
            .conn
            .query_row(
                &format!("SELECT {COLUMNS} FROM vms WHERE id = ?1"),
                params![id],
                RawRow::read,
            )
            .optional()
            .map_err(db_err("reading the VM"))?;
        match row {
            None => Ok(None),
            Some(raw) => raw.parse().map(Some).map_err(|c| c.error()),
        }
    }

    /// The directory recorded for `id`, if it has a row (readable or not).
    pub fn locate(&self, id: &str) -> Result<Option<PathBuf>> {
        let dir: Option<String> = self
            .conn
            .query_row("SELECT dir FROM vms WHERE id = ?1", params![id], |r| {
                r.get(0)
            })
            .optional()
            .map_err(db_err("reading the VM"))?;
        Ok(dir.map(PathBuf::from))
    }

    /// Reads every VM, oldest first: the records, and apart the rows that do not read.
    pub fn list(&self) -> Result<(Vec<VmRecord>, Vec<CorruptRow>)> {
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT {COLUMNS} FROM vms ORDER BY created_at, id"
            ))
            .map_err(db_err("listing VMs"))?;
        let rows = stmt
            .query_map([], RawRow::read)
            .map_err(db_err("listing VMs"))?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(db_err("listing VMs"))?;
        let (mut good, mut bad) = (Vec::new(), Vec::new());
        for raw in rows {
            match raw.parse() {
                Ok(rec) => good.push(rec),
                Err(c) => bad.push(c),
            }
        }
        Ok((good, bad))
    }

    /// Marks a VM running with its processes.
    pub fn set_running(
        &self,
        id: &str,
        supervisor_pid: u32,
        qemu_pid: u32,
        accel: Accelerator,
    ) -> Result<()> {
        self.conn
            .execute(
                "UPDATE vms SET state='running', supervisor_pid=?2, qemu_pid=?3, accelerator=?4, error=NULL, started_at=?5 WHERE id=?1",
                params![id, supervisor_pid, qemu_pid, accel.as_str(), crate::util::now_unix()],
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
    pub fn set_disk(&self, id: &str, disk_path: &Path) -> Result<()> {
        self.conn
            .execute(
                "UPDATE vms SET disk_path=?2 WHERE id=?1",
                params![id, path_text(disk_path)],
            )
            .map_err(db_err("recording the VM's disk"))?;
        Ok(())
    }

    /// Records (or, with `None`, clears) the saved state the VM's disk builds on.
    pub fn set_base(&self, id: &str, base: Option<&Base>) -> Result<()> {
        self.conn
            .execute(
                "UPDATE vms SET base=?2 WHERE id=?1",
                params![id, base.map(Base::to_json)],
            )
            .map_err(db_err("recording the VM's base"))?;
        Ok(())
    }

    /// Ids of the VMs whose disks build on `base` (see [`VmRecord::base`]).
    pub fn vms_on_base(&self, base: &Base) -> Result<Vec<String>> {
        let mut stmt = self
            .conn
            .prepare("SELECT id FROM vms WHERE base=?1 ORDER BY id")
            .map_err(db_err("listing VMs by base"))?;
        let ids = stmt
            .query_map(params![base.to_json()], |r| r.get::<_, String>(0))
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(db_err("listing VMs by base"))?;
        Ok(ids)
    }

    /// Records (or, with `None`, clears) the guest's address shown by `ls`, `inspect` and the
    /// SDK's `get_ip()`.
    pub fn set_ip(&self, id: &str, ip: Option<Ipv4Addr>) -> Result<()> {
        self.conn
            .execute(
                "UPDATE vms SET ip=?2 WHERE id=?1",
                params![id, ip.map(|ip| ip.to_string())],
            )
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

    /// Runs `sql` on the database, for tests that plant what no code path writes (a
    /// corrupt row).
    #[cfg(test)]
    pub(crate) fn execute_for_test(&self, sql: &str, id: &str) {
        self.conn.execute(sql, params![id]).unwrap();
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

/// A path as stored (paths smolvm makes are UTF-8: they are built from the state
/// directory, ids and fixed names).
fn path_text(p: &Path) -> String {
    p.display().to_string()
}

/// A VM row as stored, before its columns are read as types.
struct RawRow {
    id: String,
    state: String,
    config: String,
    dir: String,
    supervisor_pid: Option<u32>,
    qemu_pid: Option<u32>,
    accelerator: Option<String>,
    error: Option<String>,
    created_at: i64,
    started_at: Option<i64>,
    disk_path: String,
    api_socket: String,
    owner_pid: Option<u32>,
    owner_start: Option<i64>,
    ip: Option<String>,
    stopped_at: Option<i64>,
    base: Option<String>,
}

impl RawRow {
    /// Reads the [`COLUMNS`] of a row.
    fn read(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawRow> {
        Ok(RawRow {
            id: r.get(0)?,
            state: r.get(1)?,
            config: r.get(2)?,
            dir: r.get(3)?,
            supervisor_pid: r.get(4)?,
            qemu_pid: r.get(5)?,
            accelerator: r.get(6)?,
            error: r.get(7)?,
            created_at: r.get(8)?,
            started_at: r.get(9)?,
            disk_path: r.get(10)?,
            api_socket: r.get(11)?,
            owner_pid: r.get(12)?,
            owner_start: r.get(13)?,
            ip: r.get(14)?,
            stopped_at: r.get(15)?,
            base: r.get(16)?,
        })
    }

    /// The record, or what of it does not read.
    fn parse(self) -> std::result::Result<VmRecord, CorruptRow> {
        let corrupt = |what: String| CorruptRow {
            id: self.id.clone(),
            dir: PathBuf::from(&self.dir),
            what,
        };
        let state = VmState::parse(&self.state).ok_or_else(|| {
            corrupt(format!(
                "its state {:?} is not one of {}",
                self.state,
                VmState::ALL.map(VmState::as_str).join(", ")
            ))
        })?;
        let config: VmConfig = serde_json::from_str(&self.config)
            .map_err(|e| corrupt(format!("its config does not parse: {e}")))?;
        let accelerator = match &self.accelerator {
            None => None,
            Some(a) => Some(
                Accelerator::ALL
                    .into_iter()
                    .find(|k| k.as_str() == a)
                    .ok_or_else(|| {
                        corrupt(format!("its accelerator {a:?} is not kvm, tcg or none"))
                    })?,
            ),
        };
        let ip = match &self.ip {
            None => None,
            Some(ip) => Some(
                ip.parse::<Ipv4Addr>()
                    .map_err(|_| corrupt(format!("its address {ip:?} is not an IPv4 address")))?,
            ),
        };
        let base = match &self.base {
            None => None,
            Some(b) => Some(
                serde_json::from_str::<Base>(b)
                    .map_err(|e| corrupt(format!("its base {b:?} does not parse: {e}")))?,
            ),
        };
        Ok(VmRecord {
            id: self.id,
            state,
            config,
            dir: PathBuf::from(self.dir),
            supervisor_pid: self.supervisor_pid,
            qemu_pid: self.qemu_pid,
            accelerator,
            error: self.error,
            created_at: self.created_at,
            started_at: self.started_at,
            disk_path: PathBuf::from(self.disk_path),
            api_socket: PathBuf::from(self.api_socket),
            owner: match (self.owner_pid, self.owner_start) {
                (Some(pid), Some(start)) => Some(Owner {
                    pid,
                    start: start as u64,
                }),
                _ => None,
            },
            ip,
            stopped_at: self.stopped_at,
            base,
        })
    }
}

/// Migration 6: the `base` column held `template:IMAGE/KEY` or `snapshot:NAME`; it holds
/// a [`Base`] as JSON from now on. A value of neither form is left as it is (the row then
/// reads as corrupt, naming it).
fn base_to_json(tx: &rusqlite::Transaction<'_>) -> Result<()> {
    let old: Vec<(String, String)> = {
        let mut stmt = tx
            .prepare("SELECT id, base FROM vms WHERE base IS NOT NULL")
            .map_err(db_err("reading VM bases"))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(db_err("reading VM bases"))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(db_err("reading VM bases"))?
    };
    for (id, text) in old {
        let base = if let Some(name) = text.strip_prefix("snapshot:") {
            Base::snapshot(name)
        } else if let Some((image, key)) = text
            .strip_prefix("template:")
            .and_then(|t| t.split_once('/'))
        {
            Base::template(image, key)
        } else {
            tracing::warn!(%id, base = %text, "a VM's base is of no known form; left as it is");
            continue;
        };
        tx.execute(
            "UPDATE vms SET base=?2 WHERE id=?1",
            params![id, base.to_json()],
        )
        .map_err(db_err("migrating VM bases"))?;
    }
    Ok(())
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
            created_at: 1,
            disk_path: "/nonexistent/disk.qcow2".into(),
            ..VmRecord::new(id, VmConfig::default(), Path::new("/nonexistent"), None)
        }
    }

    /// Applies the first `n` migrations to a new database at `path`.
    fn schema_of_generation(path: &Path, n: usize) -> Connection {
        let mut conn = Connection::open(path).unwrap();
        let tx = conn.transaction().unwrap();
        for step in &MIGRATIONS[..n] {
            match step {
                Migration::Sql(sql) => tx.execute_batch(sql).unwrap(),
                Migration::Code(f) => f(&tx).unwrap(),
            }
        }
        tx.commit().unwrap();
        conn.pragma_update(None, "user_version", n as i64).unwrap();
        conn
    }

    #[test]
    fn insert_get_update_delete() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db")).unwrap();
        s.insert(&rec("a")).unwrap();
        assert!(matches!(s.insert(&rec("a")), Err(Error::VmExists(_))));
        s.set_running("a", 10, 11, Accelerator::Tcg).unwrap();
        let r = s.get("a").unwrap().unwrap();
        assert_eq!(r.state, VmState::Running);
        assert_eq!(r.qemu_pid, Some(11));
        assert_eq!(r.accelerator, Some(Accelerator::Tcg));
        assert_eq!(r.api_socket, Path::new("/nonexistent/api.sock"));
        s.set_state("a", VmState::Error, Some("boom")).unwrap();
        let r = s.get("a").unwrap().unwrap();
        assert_eq!(
            (r.state, r.error.as_deref(), r.qemu_pid),
            (VmState::Error, Some("boom"), None)
        );
        assert_eq!(s.list().unwrap().0.len(), 1);
        let ip: Ipv4Addr = "10.0.2.15".parse().unwrap();
        s.set_ip("a", Some(ip)).unwrap();
        assert_eq!(s.get("a").unwrap().unwrap().ip, Some(ip));
        let base = Base::template("default", "1c-256m-nonet-abc");
        s.set_base("a", Some(&base)).unwrap();
        assert_eq!(s.get("a").unwrap().unwrap().base, Some(base.clone()));
        // What `ls --json` and `inspect` show is as it was: text, not the stored JSON.
        let shown = serde_json::to_value(s.get("a").unwrap().unwrap()).unwrap();
        assert_eq!(shown["base"], "template:default/1c-256m-nonet-abc");
        assert_eq!(shown["accelerator"], "tcg");
        assert_eq!(shown["ip"], "10.0.2.15");
        assert_eq!(shown["dir"], "/nonexistent");
        assert_eq!(s.vms_on_base(&base).unwrap(), ["a"]);
        assert!(s.vms_on_base(&Base::snapshot("x")).unwrap().is_empty());
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
            let conn = schema_of_generation(&path, 2);
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

    /// A database of generation 5 recorded bases as `template:IMAGE/KEY` and
    /// `snapshot:NAME`; migration 6 makes them typed, and the VMs on a base are found again.
    #[test]
    fn migration_6_types_the_bases_of_an_old_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let conn = schema_of_generation(&path, 5);
            for (id, base) in [
                ("t", Some("template:default/1c-256m-nonet-0123abcd")),
                ("s", Some("snapshot:keep")),
                ("n", None),
                ("odd", Some("floppy:disk")),
            ] {
                conn.execute(
                    "INSERT INTO vms (id, state, config, dir, created_at, base) \
                     VALUES (?1, 'stopped', '{}', '/x', 1, ?2)",
                    params![id, base],
                )
                .unwrap();
            }
        }
        let s = Store::open(&path).unwrap();
        let base = |id: &str| s.get(id).unwrap().unwrap().base;
        assert_eq!(
            base("t"),
            Some(Base::template("default", "1c-256m-nonet-0123abcd"))
        );
        assert_eq!(base("s"), Some(Base::snapshot("keep")));
        assert_eq!(base("n"), None);
        assert_eq!(s.vms_on_base(&Base::snapshot("keep")).unwrap(), ["s"]);
        // Shown as it always was.
        assert_eq!(
            base("t").unwrap().to_string(),
            "template:default/1c-256m-nonet-0123abcd"
        );
        // A value of no known form is not guessed at: the row reads as corrupt, naming it.
        let e = s.get("odd").unwrap_err();
        assert!(
            matches!(&e, Error::CorruptRecord { id, what } if id == "odd" && what.contains("floppy:disk")),
            "{e}"
        );
    }

    /// A row whose config, state or another column does not read is an error naming the VM,
    /// never a record of defaults; listing gives the others and the broken ones apart.
    #[test]
    fn a_corrupt_row_is_an_error_naming_the_vm_and_the_others_still_list() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db")).unwrap();
        for id in ["good", "cfg", "state", "accel", "ip"] {
            s.insert(&rec(id)).unwrap();
        }
        for (id, sql) in [
            (
                "cfg",
                "UPDATE vms SET config='{\"vcpu_count\": \"many\"' WHERE id=?1",
            ),
            ("state", "UPDATE vms SET state='exploded' WHERE id=?1"),
            ("accel", "UPDATE vms SET accelerator='hvf' WHERE id=?1"),
            ("ip", "UPDATE vms SET ip='not-an-ip' WHERE id=?1"),
        ] {
            s.conn.execute(sql, params![id]).unwrap();
        }
        for (id, needle) in [
            ("cfg", "config"),
            ("state", "exploded"),
            ("accel", "hvf"),
            ("ip", "not-an-ip"),
        ] {
            let e = s.get(id).unwrap_err();
            let text = e.to_string();
            assert!(
                matches!(&e, Error::CorruptRecord { id: got, .. } if got == id),
                "{text}"
            );
            assert!(text.contains(needle), "{text}");
            assert!(text.contains(&format!("smolvm rm {id}")), "{text}");
        }
        let (good, bad) = s.list().unwrap();
        assert_eq!(
            good.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["good"]
        );
        let mut names: Vec<_> = bad.iter().map(|c| c.id.as_str()).collect();
        names.sort();
        assert_eq!(names, ["accel", "cfg", "ip", "state"]);
        assert!(bad.iter().all(|c| c.dir == Path::new("/nonexistent")));
        // Its directory is still found, and the row can be removed.
        assert_eq!(
            s.locate("cfg").unwrap(),
            Some(PathBuf::from("/nonexistent"))
        );
        s.delete("cfg").unwrap();
        assert_eq!(s.locate("cfg").unwrap(), None);
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
            s.get("vm-299").unwrap().unwrap().ip,
            Some(Ipv4Addr::new(172, 16, 1, 45))
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
            assert_eq!(Store::open(&path).unwrap().list().unwrap().0.len(), 8);
        }
    }
}
