//! The guest's persistent environment: variables the host sets with `Env` requests, seen by
//! every later command (the agent's base environment < these < a request's own `env`).
//!
//! It lives in two files under the server's state root (`/` in a guest), both replaced
//! atomically (temporary file in the same directory, fsync, rename, fsync of the directory)
//! with mode 0600, since values may be secrets:
//!
//! - [`ENV_FILE`] (`etc/smolvm/env`): what the agent reads at start, `NAME=VALUE\0` repeated.
//!   It is parsed with the same bounds as a request; bad entries are skipped with a warning.
//! - [`PROFILE_FILE`] (`etc/profile.d/smolvm_env.sh`): `export NAME='value'` lines, so login
//!   shells in the guest see the same variables. Values are single-quoted (`'` written as
//!   `'\''`), so any value (newlines, quotes, `$`, backticks) reads back exactly under `sh`.
//!
//! The profile file is written first and the agent's file last: a failure leaves the agent's
//! view (and its answer, an error) unchanged, and the profile file is put back. When the
//! environment becomes empty both files are removed.
//!
//! Limits, checked before anything changes: names match `[A-Za-z_][A-Za-z0-9_]*` and have at
//! most [`MAX_NAME`] bytes; values hold no NUL and `NAME=VALUE` fits the kernel's limit for one
//! variable ([`MAX_ENTRY`]); at most [`MAX_VARS`] variables and [`MAX_TOTAL`] bytes in all, so
//! the whole environment fits in one protocol frame and leaves room for a command's own
//! arguments and variables within the kernel's limit for `execve`.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use smolvm_protocol::EnvUpdate;

use crate::error::{AgentError, Result};

/// The agent's copy, relative to the state root.
pub const ENV_FILE: &str = "etc/smolvm/env";
/// The copy for login shells, relative to the state root.
pub const PROFILE_FILE: &str = "etc/profile.d/smolvm_env.sh";
/// Longest variable name, in bytes.
pub const MAX_NAME: usize = 256;
/// Longest `NAME=VALUE` plus its terminating NUL, in bytes: the kernel's `MAX_ARG_STRLEN`
/// (a longer variable makes every `execve` fail with E2BIG).
pub const MAX_ENTRY: usize = 128 * 1024;
/// Most variables.
pub const MAX_VARS: usize = 1024;
/// Largest environment, counting `NAME=VALUE` plus one byte per variable (the size of
/// [`ENV_FILE`]): fits in one protocol frame (1 MiB) with room to spare, and leaves more than
/// 1 MiB of the kernel's usual 2 MiB `execve` limit to a command's arguments and own variables.
pub const MAX_TOTAL: usize = 768 * 1024;

/// Header of the profile file.
const PROFILE_HEADER: &str = "\
# The VM's persistent environment, written by smolvm-agent from the host's Env requests.
# Do not edit: the next change replaces this file.
";

/// Names longer than this are shortened in error messages and logs.
const SHOWN_NAME: usize = 64;

/// Variables by name.
pub type Vars = BTreeMap<String, String>;

/// The persistent environment of a server: in memory for every exec, on disk for the next
/// start and for login shells. Updates are serialized; reads never wait for one.
#[derive(Debug)]
pub struct EnvStore {
    env_file: PathBuf,
    profile_file: PathBuf,
    current: Mutex<Arc<Vars>>,
    update: tokio::sync::Mutex<()>,
}

impl EnvStore {
    /// Reads the environment saved under `root` (empty when there is none, or it cannot be
    /// read: that is logged, the agent still starts).
    pub fn load(root: &Path) -> Self {
        let env_file = root.join(ENV_FILE);
        let vars = match read_env_file(&env_file) {
            Ok(Some(bytes)) => parse(&bytes, &env_file),
            Ok(None) => Vars::new(),
            Err(e) => {
                tracing::warn!("{e}; starting with an empty persistent environment");
                Vars::new()
            }
        };
        if !vars.is_empty() {
            tracing::info!(
                "loaded {} persistent environment variables from {}",
                vars.len(),
                env_file.display()
            );
        }
        Self {
            env_file,
            profile_file: root.join(PROFILE_FILE),
            current: Mutex::new(Arc::new(vars)),
            update: tokio::sync::Mutex::new(()),
        }
    }

    /// The environment now (cheap: shares the map).
    pub fn snapshot(&self) -> Arc<Vars> {
        Arc::clone(&self.current.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Applies `update` (clear, then unset, then set) and saves the result; returns the whole
    /// environment after it, sorted by name. Invalid input or a failure to save changes
    /// nothing. An empty update just reads the environment.
    pub async fn update(&self, update: &EnvUpdate) -> Result<Vec<(String, String)>> {
        let _serialized = self.update.lock().await;
        let old = self.snapshot();
        let new = apply(&old, update)?;
        if new != *old {
            let new = Arc::new(new);
            let (env_file, profile_file) = (self.env_file.clone(), self.profile_file.clone());
            let (saved_old, saved_new) = (Arc::clone(&old), Arc::clone(&new));
            tokio::task::spawn_blocking(move || {
                save(&env_file, &profile_file, &saved_old, &saved_new)
            })
            .await
            .map_err(|e| AgentError::io("save the environment", io::Error::other(e)))??;
            tracing::debug!("persistent environment now has {} variables", new.len());
            *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Arc::clone(&new);
            return Ok(to_list(&new));
        }
        Ok(to_list(&old))
    }
}

fn to_list(vars: &Vars) -> Vec<(String, String)> {
    vars.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// A name as shown in messages: long ones are cut (they may be up to a frame long).
fn shown(name: &str) -> String {
    if name.len() <= SHOWN_NAME {
        return name.to_owned();
    }
    let mut end = SHOWN_NAME;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &name[..end], name.len())
}

/// Checks a variable name: `[A-Za-z_][A-Za-z0-9_]*`, at most [`MAX_NAME`] bytes.
pub fn check_name(name: &str) -> Result<()> {
    let mut bytes = name.bytes();
    let first_ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_');
    let rest_ok = bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if first_ok && rest_ok && name.len() <= MAX_NAME {
        Ok(())
    } else {
        Err(AgentError::EnvNameNotAllowed {
            name: shown(name),
            max: MAX_NAME,
        })
    }
}

/// Checks a value of a (valid) name: no NUL, and `NAME=VALUE\0` within [`MAX_ENTRY`].
pub fn check_value(name: &str, value: &str) -> Result<()> {
    if value.contains('\0') {
        return Err(AgentError::NulInEnvValue {
            name: name.to_owned(),
        });
    }
    let max = MAX_ENTRY.saturating_sub(name.len() + 2);
    if value.len() > max {
        return Err(AgentError::EnvValueTooLong {
            name: name.to_owned(),
            len: value.len(),
            max,
        });
    }
    Ok(())
}

/// Bytes a variable counts against [`MAX_TOTAL`].
fn cost(name: &str, value: &str) -> usize {
    name.len() + value.len() + 2
}

/// The environment after `update`, or why it is refused.
pub fn apply(current: &Vars, update: &EnvUpdate) -> Result<Vars> {
    for name in &update.unset {
        check_name(name)?;
    }
    for (name, value) in &update.set {
        check_name(name)?;
        check_value(name, value)?;
    }
    let mut vars = if update.clear {
        Vars::new()
    } else {
        current.clone()
    };
    for name in &update.unset {
        vars.remove(name);
    }
    for (name, value) in &update.set {
        vars.insert(name.clone(), value.clone());
    }
    if vars.len() > MAX_VARS {
        return Err(AgentError::EnvTooManyVariables {
            count: vars.len(),
            max: MAX_VARS,
        });
    }
    let size: usize = vars.iter().map(|(k, v)| cost(k, v)).sum();
    if size > MAX_TOTAL {
        return Err(AgentError::EnvTooLarge {
            size,
            max: MAX_TOTAL,
        });
    }
    Ok(vars)
}

/// The agent's file: `NAME=VALUE\0` per variable.
pub fn render_env(vars: &Vars) -> Vec<u8> {
    let mut out = Vec::with_capacity(vars.iter().map(|(k, v)| cost(k, v)).sum());
    for (name, value) in vars {
        out.extend_from_slice(name.as_bytes());
        out.push(b'=');
        out.extend_from_slice(value.as_bytes());
        out.push(0);
    }
    out
}

/// `value` in POSIX single quotes: everything is literal inside them except `'` itself,
/// which is written as `'\''` (end the quotes, an escaped quote, reopen them).
pub fn sh_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

/// The login shells' file: `export NAME='value'` per variable.
pub fn render_profile(vars: &Vars) -> String {
    let mut out = String::from(PROFILE_HEADER);
    for (name, value) in vars {
        out.push_str("export ");
        out.push_str(name);
        out.push('=');
        out.push_str(&sh_quote(value));
        out.push('\n');
    }
    out
}

/// Parses the agent's file, skipping (and logging) entries that break the rules, and
/// stopping at the limits on count and size. `path` is for the log only.
pub fn parse(bytes: &[u8], path: &Path) -> Vars {
    let mut vars = Vars::new();
    let mut size = 0;
    let mut pieces: Vec<&[u8]> = bytes.split(|&b| b == 0).collect();
    // The piece after the last NUL: empty in a well-formed file.
    if pieces.pop().is_some_and(|tail| !tail.is_empty()) {
        tracing::warn!("{}: ignoring an unterminated last entry", path.display());
    }
    for (index, piece) in pieces.into_iter().enumerate() {
        let skip = |why: &str| {
            tracing::warn!("{}: skipping entry {index}: {why}", path.display());
        };
        let Ok(text) = std::str::from_utf8(piece) else {
            skip("not UTF-8");
            continue;
        };
        let Some((name, value)) = text.split_once('=') else {
            skip("no `=`");
            continue;
        };
        if let Err(e) = check_name(name).and_then(|()| check_value(name, value)) {
            skip(&e.to_string());
            continue;
        }
        let replaced = vars.get(name).map_or(0, |old: &String| cost(name, old));
        if replaced == 0 && vars.len() >= MAX_VARS {
            skip(&format!("more than {MAX_VARS} variables"));
            continue;
        }
        if size - replaced + cost(name, value) > MAX_TOTAL {
            skip(&format!("more than {MAX_TOTAL} bytes in all"));
            continue;
        }
        size = size - replaced + cost(name, value);
        vars.insert(name.to_owned(), value.to_owned());
    }
    vars
}

/// Reads the agent's file, at most [`MAX_TOTAL`] bytes of it; `None` when it does not exist.
fn read_env_file(path: &Path) -> Result<Option<Vec<u8>>> {
    let what = || format!("read the persistent environment from {}", path.display());
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(AgentError::io(what(), e)),
    };
    let meta = file.metadata().map_err(|e| AgentError::io(what(), e))?;
    if !meta.is_file() {
        return Err(AgentError::io(
            what(),
            io::Error::other("not a regular file"),
        ));
    }
    let mut bytes = Vec::new();
    file.take(MAX_TOTAL as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| AgentError::io(what(), e))?;
    if bytes.len() > MAX_TOTAL {
        tracing::warn!(
            "{} is larger than {MAX_TOTAL} bytes; reading only the start of it",
            path.display()
        );
        bytes.truncate(MAX_TOTAL);
    }
    Ok(Some(bytes))
}

/// Saves `new` to both files (`old` is what they held, to put the profile file back when the
/// agent's file cannot be written).
fn save(env_file: &Path, profile_file: &Path, old: &Vars, new: &Vars) -> Result<()> {
    let contents = |vars: &Vars| {
        (!vars.is_empty()).then(|| (render_env(vars), render_profile(vars).into_bytes()))
    };
    let (new_env, new_profile) = contents(new).unzip();
    replace(profile_file, new_profile.as_deref())?;
    if let Err(e) = replace(env_file, new_env.as_deref()) {
        let (_, old_profile) = contents(old).unzip();
        if let Err(undo) = replace(profile_file, old_profile.as_deref()) {
            tracing::warn!("cannot put {} back: {undo}", profile_file.display());
        }
        return Err(e);
    }
    Ok(())
}

/// Durably replaces the file at `path` with `contents` (mode 0600), or removes it (`None`).
pub fn replace(path: &Path, contents: Option<&[u8]>) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let Some(contents) = contents else {
        return match fs::remove_file(path) {
            Ok(()) => sync_dir(dir),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(AgentError::io(format!("remove {}", path.display()), e)),
        };
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(|e| AgentError::io(format!("create {}", dir.display()), e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let write = || -> io::Result<()> {
        // A temporary file left by a crash is stale: this is the only writer.
        match fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    };
    if let Err(e) = write() {
        let _ = fs::remove_file(&tmp);
        return Err(AgentError::io(format!("write {}", path.display()), e));
    }
    sync_dir(dir)
}

/// Makes a rename or removal in `dir` durable.
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| AgentError::io(format!("sync {}", dir.display()), e))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use smolvm_protocol::{encode, GuestMessage, MAX_FRAME_LEN};

    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vars {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn set(pairs: &[(&str, &str)]) -> EnvUpdate {
        EnvUpdate {
            set: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..EnvUpdate::default()
        }
    }

    /// Values that break naive quoting.
    const NASTY: [&str; 12] = [
        "",
        "plain",
        "it's",
        "'",
        "''\\''",
        "line one\nline two\n",
        "$HOME $(echo no) `echo no` ${PATH}",
        "\"double\" \\back\\slash\\",
        "tab\there; semicolon & amp | pipe > gt",
        "ünïcödé ✓ 日本語",
        "-n",
        "*?[a-z] ~root #hash !bang",
    ];

    #[test]
    fn names_follow_the_portable_rule() {
        for good in ["A", "_", "a1", "_9_Z", &"N".repeat(MAX_NAME)] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "1A",
            "A-B",
            "A=B",
            "A B",
            "A\0",
            "Ä",
            "A.B",
            &"N".repeat(MAX_NAME + 1),
        ] {
            assert!(
                matches!(check_name(bad), Err(AgentError::EnvNameNotAllowed { .. })),
                "{bad:?}"
            );
        }
        let long = "x".repeat(100_000);
        let msg = check_name(&format!("-{long}")).unwrap_err().to_string();
        assert!(msg.len() < 300, "long names are cut in messages: {msg}");
        assert!(msg.contains("at most 256 bytes"), "{msg}");
    }

    #[test]
    fn values_fit_the_kernel_limit_for_one_variable() {
        let name = "NAME";
        let max = MAX_ENTRY - name.len() - 2;
        assert!(check_value(name, &"v".repeat(max)).is_ok());
        let err = check_value(name, &"v".repeat(max + 1)).unwrap_err();
        assert!(matches!(err, AgentError::EnvValueTooLong { .. }), "{err}");
        assert!(matches!(
            check_value(name, "a\0b"),
            Err(AgentError::NulInEnvValue { .. })
        ));
    }

    #[test]
    fn updates_apply_clear_then_unset_then_set() {
        let current = vars(&[("A", "1"), ("B", "2"), ("C", "3")]);
        let update = EnvUpdate {
            clear: false,
            unset: vec!["A".into(), "MISSING".into()],
            set: vec![("B".into(), "two".into()), ("D".into(), "4".into())],
        };
        assert_eq!(
            apply(&current, &update).unwrap(),
            vars(&[("B", "two"), ("C", "3"), ("D", "4")])
        );
        let update = EnvUpdate {
            clear: true,
            unset: vec!["Z".into()],
            set: vec![("Z".into(), "set after unset".into())],
        };
        assert_eq!(
            apply(&current, &update).unwrap(),
            vars(&[("Z", "set after unset")])
        );
        // Later duplicates win.
        assert_eq!(
            apply(&Vars::new(), &set(&[("X", "1"), ("X", "2")])).unwrap(),
            vars(&[("X", "2")])
        );
    }

    #[test]
    fn limits_on_count_and_size() {
        let many: Vec<(String, String)> = (0..=MAX_VARS)
            .map(|i| (format!("V{i}"), String::new()))
            .collect();
        let update = EnvUpdate {
            set: many[..MAX_VARS].to_vec(),
            ..EnvUpdate::default()
        };
        let full = apply(&Vars::new(), &update).unwrap();
        let update = EnvUpdate {
            set: many[MAX_VARS..].to_vec(),
            ..EnvUpdate::default()
        };
        assert!(matches!(
            apply(&full, &update),
            Err(AgentError::EnvTooManyVariables { count: 1025, .. })
        ));

        let big = "x".repeat(100_000);
        let update = EnvUpdate {
            set: (0..8).map(|i| (format!("B{i}"), big.clone())).collect(),
            ..EnvUpdate::default()
        };
        assert!(matches!(
            apply(&Vars::new(), &update),
            Err(AgentError::EnvTooLarge { .. })
        ));
    }

    #[test]
    fn the_largest_environment_fits_in_one_reply_frame() {
        // Few big variables, up to the total.
        let mut env = Vars::new();
        let mut size = 0;
        while size < MAX_TOTAL {
            let name = format!("N{}", env.len());
            let Some(room) = (MAX_TOTAL - size).checked_sub(name.len() + 2) else {
                break;
            };
            let value = "x".repeat(room.min(MAX_ENTRY - name.len() - 2));
            size += cost(&name, &value);
            env.insert(name, value);
        }
        let update = EnvUpdate {
            set: to_list(&env),
            ..EnvUpdate::default()
        };
        assert_eq!(apply(&Vars::new(), &update).unwrap(), env);
        let reply = encode(&GuestMessage::Env(to_list(&env))).unwrap();
        assert!(reply.len() < MAX_FRAME_LEN, "{}", reply.len());
        // Many small variables: per-entry overhead.
        let env: Vars = (0..MAX_VARS)
            .map(|i| (format!("{i:0>256}").replace('0', "N"), "v".repeat(400)))
            .collect();
        assert!(env.iter().map(|(k, v)| cost(k, v)).sum::<usize>() <= MAX_TOTAL);
        let reply = encode(&GuestMessage::Env(to_list(&env))).unwrap();
        assert!(reply.len() < MAX_FRAME_LEN, "{}", reply.len());
    }

    #[test]
    fn env_file_round_trips_and_bad_entries_are_skipped() {
        let env: Vars = NASTY
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("V{i}"), v.to_string()))
            .collect();
        let bytes = render_env(&env);
        assert_eq!(parse(&bytes, Path::new("t")), env);

        let mut bytes = b"GOOD=1\0bad-name=2\0no equals\0\xff\xfe=3\0=4\0LAST=x=y\0".to_vec();
        bytes.extend_from_slice(b"CUT=unterminated");
        assert_eq!(
            parse(&bytes, Path::new("t")),
            vars(&[("GOOD", "1"), ("LAST", "x=y")])
        );
        assert_eq!(parse(b"", Path::new("t")), Vars::new());
        // Count limit when reading.
        let many: Vec<u8> = (0..MAX_VARS + 10)
            .flat_map(|i| format!("V{i}=\0").into_bytes())
            .collect();
        assert_eq!(parse(&many, Path::new("t")).len(), MAX_VARS);
    }

    #[test]
    fn profile_file_reproduces_every_value_under_sh() {
        let dir = tempfile::tempdir().unwrap();
        let env: Vars = NASTY
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("NASTY_{i}"), v.to_string()))
            .chain([("LONG".to_string(), "'\n$`\\".repeat(20_000))])
            .collect();
        let file = dir.path().join("env.sh");
        fs::write(&file, render_profile(&env)).unwrap();
        for (name, value) in &env {
            let out = std::process::Command::new("/bin/sh")
                .arg("-c")
                .arg(format!(". \"$1\"; printf %s \"${name}\""))
                .arg("sh")
                .arg(&file)
                .env_clear()
                .output()
                .unwrap();
            assert!(out.status.success(), "{name}: {out:?}");
            assert_eq!(
                String::from_utf8(out.stdout).unwrap(),
                *value,
                "{name} after sourcing"
            );
            assert_eq!(out.stderr, b"");
        }
    }

    #[tokio::test]
    async fn store_persists_atomically_and_reloads() {
        let root = tempfile::tempdir().unwrap();
        let store = EnvStore::load(root.path());
        assert!(store.snapshot().is_empty());
        let reply = store
            .update(&set(&[("B", "2"), ("A", "it's\n1")]))
            .await
            .unwrap();
        assert_eq!(
            reply,
            [("A".into(), "it's\n1".into()), ("B".into(), "2".into())]
        );
        for file in [ENV_FILE, PROFILE_FILE] {
            let meta = fs::metadata(root.path().join(file)).unwrap();
            assert_eq!(meta.mode() & 0o777, 0o600, "{file}");
        }
        let leftovers: Vec<_> = fs::read_dir(root.path().join("etc/smolvm"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, ["env"]);
        assert_eq!(
            *EnvStore::load(root.path()).snapshot(),
            vars(&[("A", "it's\n1"), ("B", "2")])
        );

        // Refused input changes nothing.
        let bad = EnvUpdate {
            clear: true,
            unset: vec![],
            set: vec![("OK".into(), "1".into()), ("NOT OK".into(), "2".into())],
        };
        assert!(store.update(&bad).await.is_err());
        assert_eq!(store.snapshot().len(), 2);

        // Empty: both files go.
        let clear = EnvUpdate {
            clear: true,
            ..EnvUpdate::default()
        };
        assert_eq!(store.update(&clear).await.unwrap(), []);
        assert!(!root.path().join(ENV_FILE).exists());
        assert!(!root.path().join(PROFILE_FILE).exists());
        assert!(EnvStore::load(root.path()).snapshot().is_empty());
    }

    #[tokio::test]
    async fn a_failed_save_changes_nothing() {
        let root = tempfile::tempdir().unwrap();
        let store = EnvStore::load(root.path());
        store.update(&set(&[("A", "1")])).await.unwrap();
        // Make the agent's file unwritable: its directory becomes a file.
        let dir = root.path().join("etc/smolvm");
        fs::remove_dir_all(&dir).unwrap();
        fs::write(&dir, b"in the way").unwrap();
        let err = store.update(&set(&[("A", "2")])).await.unwrap_err();
        assert!(err.to_string().contains("etc/smolvm"), "{err}");
        assert_eq!(*store.snapshot(), vars(&[("A", "1")]));
        let profile = fs::read_to_string(root.path().join(PROFILE_FILE)).unwrap();
        assert!(
            profile.contains("export A='1'"),
            "profile put back: {profile}"
        );
    }
}
