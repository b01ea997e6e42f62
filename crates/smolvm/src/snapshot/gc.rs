//! What `smolvm gc` does for saved states: half-written snapshots and templates whose
//! writer died, fork states no VM uses any more, templates of images since rebuilt, and the
//! least recently used templates past [`template::KEEP_PER_IMAGE`] per image.

use std::path::Path;

use super::{template, Kind, Saved};
use crate::gc::GcReport;
use crate::vm::Runtime;

/// Age after which a fork state no VM uses is garbage.
const FORK_GRACE_SECS: i64 = 600;

/// The pid in a work directory's name (`.b-PID-TAG`, `.NAME.tmp-PID`, `.NAME.rm-PID`).
fn writer_pid(name: &str) -> Option<u32> {
    if let Some(rest) = name.strip_prefix(".b-") {
        return rest.split('-').next()?.parse().ok();
    }
    let (_, tail) = name
        .rsplit_once(".tmp-")
        .or_else(|| name.rsplit_once(".rm-"))?;
    tail.parse().ok()
}

/// Removes work directories in `dir` whose writer process is gone.
fn sweep_work_dirs(dir: &Path, report: &mut GcReport) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.starts_with('.').then(|| writer_pid(&name)).flatten() else {
            continue;
        };
        if crate::util::pid_alive(pid) {
            continue;
        }
        let path = e.path();
        report.killed_processes += crate::cleanup::kill_vm_processes(&path);
        if std::fs::remove_dir_all(&path).is_ok() {
            report.removed_dirs.push(path);
        }
    }
}

impl Runtime {
    /// The saved-state part of [`Runtime::gc`].
    pub(crate) fn gc_saved(&self, report: &mut GcReport) {
        let snapshots = super::snapshots_dir(self.paths());
        sweep_work_dirs(&snapshots, report);
        let now = crate::util::now_unix();
        for s in super::list(self.paths()).unwrap_or_default() {
            // A fresh one may be a fork in progress whose VMs are being made.
            if s.meta.kind == Kind::Fork && now - s.meta.created_at > FORK_GRACE_SECS {
                let base = crate::store::Base::snapshot(&s.meta.name);
                let unused = self
                    .store()
                    .vms_on_base(&base)
                    .is_ok_and(|users| users.is_empty());
                if unused && super::remove_dir(&s.dir).is_ok() {
                    report
                        .removed_saved_states
                        .push(format!("fork state {}", s.meta.name));
                }
            }
        }
        let images_dir = &self.paths().images_dir;
        let Ok(images) = smolvm_image::list(images_dir) else {
            return;
        };
        for image in images {
            let dir = template::templates_dir(images_dir, &image.name);
            sweep_work_dirs(&dir, report);
            let Ok(stamp) = super::image_stamp(&[&image.kernel, &image.initrd, &image.rootfs])
            else {
                continue;
            };
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in rd.flatten() {
                let path = e.path();
                let name = e.file_name().to_string_lossy().into_owned();
                // The lock of a template that is gone (unless a builder holds it).
                if let Some(key) = name.strip_suffix(".lock") {
                    if !dir.join(key).exists() {
                        template::remove_lock(&dir, key);
                    }
                    continue;
                }
                if !path.is_dir() || name.starts_with('.') {
                    continue;
                }
                // Made from files the image no longer has (rebuilt in place), or unreadable.
                let stale = Saved::open(&path).map_or(true, |t| t.meta.image_stamp != stamp);
                if stale && super::remove_dir(&path).is_ok() {
                    report.removed_saved_states.push(format!(
                        "template {}/{}",
                        image.name,
                        e.file_name().to_string_lossy()
                    ));
                }
            }
            report
                .removed_saved_states
                .extend(self.trim_templates(&image.name));
        }
    }

    /// Removes the least recently used templates of `image` past
    /// [`template::KEEP_PER_IMAGE`] (see [`template::evictable`]); says which.
    pub(crate) fn trim_templates(&self, image: &str) -> Vec<String> {
        let dir = template::templates_dir(&self.paths().images_dir, image);
        template::evictable(&dir, template::KEEP_PER_IMAGE, template::EVICT_GRACE)
            .into_iter()
            .filter(|path| super::remove_dir(path).is_ok())
            .map(|path| {
                let key = path.file_name().unwrap_or_default().to_string_lossy();
                template::remove_lock(&dir, &key);
                tracing::info!(%image, %key, "removed a template not used lately");
                format!("template {image}/{key}")
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::writer_pid;

    #[test]
    fn work_directories_name_their_writer() {
        assert_eq!(writer_pid(".b-123-abcd0123"), Some(123));
        assert_eq!(writer_pid(".snap.tmp-77"), Some(77));
        assert_eq!(writer_pid(".2c-512m-net-ab.rm-9"), Some(9));
        assert_eq!(writer_pid(".b-x"), None);
        assert_eq!(writer_pid(".name.tmp-"), None);
    }
}
