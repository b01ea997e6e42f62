//! Persistent guest environment variables. They live in the guest (the agent keeps them in
//! /etc/profile.d/smolvm_env.sh and applies them to every command), never in the state
//! database. Changes made while a VM is not running wait in its directory (mode 0600) and
//! are applied at its next boot, before any command runs.

use std::collections::BTreeMap;
use std::path::Path;

use smolvm_protocol::EnvUpdate;

use crate::error::{io_err, Result};
use crate::supervisor::files;

/// Folds `next` into `pending` so that applying the result equals applying both in order.
pub(crate) fn merge(pending: &mut EnvUpdate, next: EnvUpdate) {
    if next.clear {
        *pending = EnvUpdate {
            clear: true,
            ..Default::default()
        };
    }
    for name in next.unset {
        pending.set.retain(|(k, _)| k != &name);
        if !pending.unset.contains(&name) {
            pending.unset.push(name);
        }
    }
    for (k, v) in next.set {
        pending.unset.retain(|n| n != &k);
        pending.set.retain(|(n, _)| n != &k);
        pending.set.push((k, v));
    }
}

/// The update waiting in `vm_dir`, if any.
pub(crate) fn read_pending(vm_dir: &Path) -> Option<EnvUpdate> {
    let data = std::fs::read(vm_dir.join(files::PENDING_ENV)).ok()?;
    serde_json::from_slice(&data).ok()
}

/// Adds `update` to what waits in `vm_dir` for the next boot.
pub(crate) fn add_pending(vm_dir: &Path, update: EnvUpdate) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut pending = read_pending(vm_dir).unwrap_or_default();
    merge(&mut pending, update);
    let path = vm_dir.join(files::PENDING_ENV);
    let tmp = vm_dir.join(format!("{}.tmp", files::PENDING_ENV));
    let json = serde_json::to_vec(&pending).unwrap_or_default();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err(format!("writing {}", tmp.display())))?;
    f.write_all(&json)
        .and_then(|_| f.sync_all())
        .map_err(io_err(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, &path).map_err(io_err(format!("writing {}", path.display())))
}

/// The update for setting `vars`, replacing every other variable unless `merge`.
pub(crate) fn set_update(vars: &BTreeMap<String, String>, merge: bool) -> EnvUpdate {
    EnvUpdate {
        clear: !merge,
        unset: vec![],
        set: vars.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(pairs: &[(&str, &str)]) -> EnvUpdate {
        EnvUpdate {
            set: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn merging_matches_applying_in_order() {
        let mut p = set(&[("A", "1"), ("B", "2")]);
        merge(
            &mut p,
            EnvUpdate {
                unset: vec!["A".into()],
                ..Default::default()
            },
        );
        merge(&mut p, set(&[("B", "3")]));
        assert_eq!(p.set, vec![("B".to_string(), "3".to_string())]);
        assert_eq!(p.unset, vec!["A".to_string()]);
        merge(&mut p, set(&[("A", "4")]));
        assert!(p.unset.is_empty());
        merge(
            &mut p,
            EnvUpdate {
                clear: true,
                ..Default::default()
            },
        );
        assert!(p.clear && p.set.is_empty());
    }

    #[test]
    fn pending_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        add_pending(dir.path(), set(&[("K", "secret")])).unwrap();
        add_pending(dir.path(), set(&[("L", "x")])).unwrap();
        let mode = std::fs::metadata(dir.path().join(files::PENDING_ENV))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(read_pending(dir.path()).unwrap().set.len(), 2);
    }
}
