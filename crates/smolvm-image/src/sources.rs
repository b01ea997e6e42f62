//! Which Debian mirror the root filesystem is built from, taken from the host's apt
//! configuration so a host behind a local mirror or proxy keeps using it.

use std::path::Path;

/// The mirror used when the host's apt configuration names none for the suite.
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

/// The apt sources given to `mmdebstrap`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sources {
    /// The main archive, e.g. `http://deb.debian.org/debian`.
    pub mirror: String,
    /// One-line `deb URI SUITE main` entries: the suite, and its `-updates` and
    /// `-security` suites where the host has them.
    pub lines: Vec<String>,
}

/// One `deb` source: a URI and the suites it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    uri: String,
    suites: Vec<String>,
}

/// Reads the host's apt sources and picks the entries for `suite`.
pub fn from_host(suite: &str) -> Sources {
    let mut entries = Vec::new();
    let etc = Path::new("/etc/apt");
    if let Ok(text) = std::fs::read_to_string(etc.join("sources.list")) {
        entries.extend(parse_one_line(&text));
    }
    if let Ok(dir) = std::fs::read_dir(etc.join("sources.list.d")) {
        let mut files: Vec<_> = dir.flatten().map(|e| e.path()).collect();
        files.sort();
        for file in files {
            let Ok(text) = std::fs::read_to_string(&file) else {
                continue;
            };
            match file.extension().and_then(|e| e.to_str()) {
                Some("list") => entries.extend(parse_one_line(&text)),
                Some("sources") => entries.extend(parse_deb822(&text)),
                _ => {}
            }
        }
    }
    let sources = select(&entries, suite);
    tracing::debug!(?sources, "apt sources for the root filesystem");
    sources
}

/// Picks the main archive for `suite` and its `-updates` and `-security` companions.
fn select(entries: &[Entry], suite: &str) -> Sources {
    let uri_for = |wanted: &str| {
        entries
            .iter()
            .find(|e| e.suites.iter().any(|s| s == wanted))
            .map(|e| e.uri.clone())
    };
    let mirror = uri_for(suite).unwrap_or_else(|| DEFAULT_MIRROR.to_string());
    let mut lines = vec![format!("deb {mirror} {suite} main")];
    for companion in ["updates", "security"] {
        let companion = format!("{suite}-{companion}");
        if let Some(uri) = uri_for(&companion) {
            lines.push(format!("deb {uri} {companion} main"));
        }
    }
    Sources { mirror, lines }
}

/// Keeps network URIs only: `mmdebstrap` runs apt inside the new root, where `file:` and
/// `cdrom:` sources of the host do not exist.
fn usable_uri(uri: &str) -> Option<String> {
    (uri.starts_with("http://") || uri.starts_with("https://"))
        .then(|| uri.trim_end_matches('/').to_string())
}

/// Parses `sources.list` one-line entries: `deb [options] URI SUITE COMPONENTS...`.
fn parse_one_line(text: &str) -> Vec<Entry> {
    text.lines()
        .filter_map(|line| {
            let line = line.split('#').next().unwrap_or("").trim();
            let rest = line.strip_prefix("deb ")?.trim_start();
            let rest = match rest.strip_prefix('[') {
                Some(options) => options.split_once(']')?.1,
                None => rest,
            };
            let mut words = rest.split_whitespace();
            let uri = usable_uri(words.next()?)?;
            let suite = words.next()?.to_string();
            Some(Entry {
                uri,
                suites: vec![suite],
            })
        })
        .collect()
}

/// Parses deb822 `.sources` files: paragraphs with `Types:`, `URIs:` and `Suites:`.
fn parse_deb822(text: &str) -> Vec<Entry> {
    let mut entries = Vec::new();
    for paragraph in text.split("\n\n") {
        let mut types = Vec::new();
        let mut uris = Vec::new();
        let mut suites = Vec::new();
        let mut enabled = true;
        for line in paragraph.lines() {
            if line.trim_start().starts_with('#') {
                continue;
            }
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let words = || value.split_whitespace().map(str::to_string);
            match key.trim().to_ascii_lowercase().as_str() {
                "types" => types.extend(words()),
                "uris" => uris.extend(words()),
                "suites" => suites.extend(words()),
                "enabled" => enabled = !value.trim().eq_ignore_ascii_case("no"),
                _ => {}
            }
        }
        if !enabled || !types.iter().any(|t| t == "deb") {
            continue;
        }
        entries.extend(uris.iter().filter_map(|u| usable_uri(u)).map(|uri| Entry {
            uri,
            suites: suites.clone(),
        }));
    }
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEB822: &str = "Types: deb\nURIs: http://deb.debian.org/debian\n\
        Suites: bookworm-backports\nComponents: main\n\n\
        Types: deb\n# http://snapshot.debian.org/archive/debian/20250520T000000Z\n\
        URIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\n\
        Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n\
        Types: deb deb-src\nURIs: http://security.example/debian-security\n\
        Suites: bookworm-security\nComponents: main\n\n\
        Types: deb\nURIs: file:/srv/local\nSuites: bookworm\nComponents: main\n";

    #[test]
    fn deb822_sources_give_mirror_updates_and_security() {
        let sources = select(&parse_deb822(DEB822), "bookworm");
        assert_eq!(sources.mirror, "http://mirror.example/debian");
        assert_eq!(
            sources.lines,
            [
                "deb http://mirror.example/debian bookworm main",
                "deb http://mirror.example/debian bookworm-updates main",
                "deb http://security.example/debian-security bookworm-security main",
            ]
        );
    }

    #[test]
    fn one_line_sources_are_parsed() {
        let text = "# comment\ndeb-src http://src.example/debian bookworm main\n\
                    deb [arch=amd64 signed-by=/k.gpg] http://m.example/debian bookworm main contrib\n\
                    deb cdrom:[Debian]/ bookworm main\n";
        let entries = parse_one_line(text);
        assert_eq!(
            entries,
            [Entry {
                uri: "http://m.example/debian".into(),
                suites: vec!["bookworm".into()]
            }]
        );
    }

    #[test]
    fn other_distributions_fall_back_to_the_default_mirror() {
        let entries = parse_one_line("deb http://archive.ubuntu.com/ubuntu noble main\n");
        let sources = select(&entries, "bookworm");
        assert_eq!(sources.mirror, DEFAULT_MIRROR);
        assert_eq!(
            sources.lines,
            [format!("deb {DEFAULT_MIRROR} bookworm main")]
        );
    }

    #[test]
    fn disabled_deb822_paragraphs_are_ignored() {
        let text = "Enabled: no\nTypes: deb\nURIs: http://x.example/debian\nSuites: bookworm\n";
        assert!(parse_deb822(text).is_empty());
    }
}
