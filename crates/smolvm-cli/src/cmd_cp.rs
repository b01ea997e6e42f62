//! `smolvm cp`: copy one file between the host and a running VM (`ID:/path` names the VM side).

use std::path::Path;

use anyhow::{bail, Result};
use smolvm::files::DEFAULT_MAX_FILE_BYTES;
use smolvm::Runtime;

/// One side of a copy.
#[derive(Debug, PartialEq, Eq)]
enum Side<'a> {
    Host(&'a str),
    Guest { id: &'a str, path: &'a str },
}

/// `ID:/abs/path` is a guest path; anything else (including `./a:b`) is a host path.
fn side(arg: &str) -> Side<'_> {
    match arg.split_once(':') {
        Some((id, path)) if !id.is_empty() && !id.contains('/') && path.starts_with('/') => {
            Side::Guest { id, path }
        }
        _ => Side::Host(arg),
    }
}

/// Copies `src` to `dst`; exactly one of them is `ID:/path`.
pub fn run(src: &str, dst: &str, max_size: Option<u64>) -> Result<()> {
    let rt = Runtime::open()?;
    match (side(src), side(dst)) {
        (Side::Host(local), Side::Guest { id, path }) => {
            let to = rt.get(id)?.upload(Path::new(local), path)?;
            eprintln!("copied {local} to {id}:{to}");
        }
        (Side::Guest { id, path }, Side::Host(local)) => {
            let max = max_size.unwrap_or(DEFAULT_MAX_FILE_BYTES);
            let to = rt.get(id)?.download(path, Path::new(local), max)?;
            eprintln!("copied {id}:{path} to {}", to.display());
        }
        (Side::Guest { .. }, Side::Guest { .. }) => {
            bail!("copy between two VMs is not supported: copy to the host first")
        }
        (Side::Host(_), Side::Host(_)) => {
            bail!("one side must be a VM path, written ID:/absolute/path (e.g. vm-1234abcd:/tmp/x)")
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sides_are_told_apart() {
        assert_eq!(
            side("vm-1:/tmp/x"),
            Side::Guest {
                id: "vm-1",
                path: "/tmp/x"
            }
        );
        assert_eq!(side("./a:/b"), Side::Host("./a:/b"));
        assert_eq!(side("a:b"), Side::Host("a:b"));
        assert_eq!(side("/tmp/x"), Side::Host("/tmp/x"));
        assert_eq!(side(":/x"), Side::Host(":/x"));
    }
}
