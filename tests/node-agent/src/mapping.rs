//! Path mapping: the agent runs containers as plain host processes (no mount namespace, no
//! chroot), so every in-container mount path is rewritten to the host directory that backs it,
//! wherever the container would see that path: command, args, env values and the files
//! projected from ConfigMaps and Secrets (the operator's trainer config names its output
//! directory there). Paths under no mount are left as they are, i.e. the host's own.

use std::path::{Path, PathBuf};

/// In-container mount paths and the host directories behind them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PathMap {
    /// Longest mount path first, so `/data/cache` wins over `/data`.
    mounts: Vec<(String, PathBuf)>,
}

impl PathMap {
    /// `mounts`: (mount path in the container, host directory). A mount at `/` is ignored:
    /// it would rewrite every absolute path, and the host root is what it stands for here.
    pub fn new(mounts: impl IntoIterator<Item = (String, PathBuf)>) -> Self {
        let mut mounts: Vec<(String, PathBuf)> = mounts
            .into_iter()
            .map(|(path, host)| (path.trim_end_matches('/').to_owned(), host))
            .filter(|(path, _)| path.starts_with('/'))
            .collect();
        mounts.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        Self { mounts }
    }

    /// The host path of `container_path` (absolute), or None when no mount covers it.
    pub fn host_path(&self, container_path: &str) -> Option<PathBuf> {
        self.mounts.iter().find_map(|(mount, host)| {
            let rest = container_path.strip_prefix(mount.as_str())?;
            if rest.is_empty() {
                Some(host.clone())
            } else {
                rest.strip_prefix('/').map(|rest| host.join(rest))
            }
        })
    }

    /// `text` with every mount path that appears as a whole path (or a path's leading
    /// components) replaced by its host directory, in one left-to-right pass so a replacement
    /// is never rewritten again. A path starts at the beginning of the text or after a
    /// character that cannot be part of one (space, quote, `=`, `:`, `,`, brackets) and the
    /// mount path must end at `/` or such a character: `/data` maps in `--out=/data/x` and
    /// `dir: /data`, not in `/database` or `/srv/data`.
    pub fn map_text(&self, text: &str) -> String {
        if self.mounts.is_empty() {
            return text.to_owned();
        }
        let mut out = String::with_capacity(text.len());
        let mut i = 0;
        let mut prev: Option<char> = None;
        while i < text.len() {
            let rest = &text[i..];
            if prev.is_none_or(starts_path) {
                let hit = self.mounts.iter().find(|(mount, _)| {
                    rest.starts_with(mount.as_str())
                        && rest[mount.len()..]
                            .chars()
                            .next()
                            .is_none_or(|c| c == '/' || !is_name_char(c))
                });
                if let Some((mount, host)) = hit {
                    out.push_str(&host.to_string_lossy());
                    i += mount.len();
                    prev = mount.chars().next_back();
                    continue;
                }
            }
            let c = rest.chars().next().expect("i is below the length");
            out.push(c);
            i += c.len_utf8();
            prev = Some(c);
        }
        out
    }

    /// (mount path, host directory) pairs, longest mount path first.
    pub fn mounts(&self) -> impl Iterator<Item = (&str, &Path)> {
        self.mounts.iter().map(|(m, h)| (m.as_str(), h.as_path()))
    }
}

/// Characters of a file name (a path continues through them).
fn is_name_char(c: char) -> bool {
    c.is_alphanumeric() || matches!(c, '-' | '_' | '.' | '~' | '+' | '@' | '%')
}

/// Whether a path may start right after `c`.
fn starts_path(c: char) -> bool {
    c != '/' && !is_name_char(c)
}

/// Whether `value` is a cluster DNS name (`<name>.<service>.<namespace>.svc`, optionally
/// `.cluster.local`): every pod of the local node runs on this host, so such a name (the
/// operator's MASTER_ADDR) stands for 127.0.0.1.
pub fn is_cluster_dns_name(value: &str) -> bool {
    let name = value.strip_suffix('.').unwrap_or(value);
    let name = name.strip_suffix(".cluster.local").unwrap_or(name);
    name.strip_suffix(".svc").is_some_and(|head| {
        !head.is_empty()
            && head
                .split('.')
                .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> PathMap {
        PathMap::new([
            (
                "/etc/dinoflow".to_string(),
                PathBuf::from("/agent/p/config"),
            ),
            ("/data/".to_string(), PathBuf::from("/agent/pvc/data")),
            ("/data/cache".to_string(), PathBuf::from("/agent/p/cache")),
            ("/".to_string(), PathBuf::from("/nowhere")),
        ])
    }

    #[test]
    fn a_path_under_a_mount_maps_to_the_host_directory_longest_mount_first() {
        let m = map();
        assert_eq!(
            m.host_path("/etc/dinoflow/config.yaml"),
            Some("/agent/p/config/config.yaml".into())
        );
        assert_eq!(m.host_path("/data"), Some("/agent/pvc/data".into()));
        assert_eq!(
            m.host_path("/data/cache/x"),
            Some("/agent/p/cache/x".into())
        );
        assert_eq!(m.host_path("/database"), None);
        assert_eq!(m.host_path("/usr/share/x"), None, "a mount at / is ignored");
    }

    #[test]
    fn mount_paths_are_rewritten_in_args_env_values_and_config_text() {
        let m = map();
        assert_eq!(
            m.map_text("/etc/dinoflow/config.yaml"),
            "/agent/p/config/config.yaml"
        );
        assert_eq!(m.map_text("--out=/data/run"), "--out=/agent/pvc/data/run");
        assert_eq!(
            m.map_text("output:\n  dir: /data/run\ncache: '/data/cache'\nlist: [/data,/x]"),
            "output:\n  dir: /agent/pvc/data/run\ncache: '/agent/p/cache'\nlist: [/agent/pvc/data,/x]"
        );
        assert_eq!(
            m.map_text("PATH=/bin:/data/bin"),
            "PATH=/bin:/agent/pvc/data/bin"
        );
    }

    #[test]
    fn look_alike_paths_are_left_alone() {
        let m = map();
        for text in [
            "/database",
            "/srv/data",
            "/data.bak",
            "x/data",
            "http://h/data",
            "/etc/dinoflow2",
        ] {
            assert_eq!(m.map_text(text), text);
        }
    }

    #[test]
    fn a_replacement_is_not_rewritten_again() {
        let m = PathMap::new([
            ("/a".to_string(), PathBuf::from("/b/a")),
            ("/b".to_string(), PathBuf::from("/c")),
        ]);
        assert_eq!(m.map_text("/a/x /b/y"), "/b/a/x /c/y");
    }

    #[test]
    fn service_dns_names_are_recognised() {
        assert!(is_cluster_dns_name("job-a0-0.job.ns.svc"));
        assert!(is_cluster_dns_name("job-a0-0.job.ns.svc.cluster.local"));
        assert!(!is_cluster_dns_name("127.0.0.1"));
        assert!(!is_cluster_dns_name("example.com"));
        assert!(!is_cluster_dns_name(".svc"));
        assert!(!is_cluster_dns_name("http://op.ns.svc:9090"));
    }
}
