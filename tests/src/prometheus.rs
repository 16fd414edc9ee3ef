//! A real Prometheus (Debian's `prometheus`) for the e2e tests: started on a free 127.0.0.1
//! port with a config and rule files in a directory of its own, queried over its HTTP API,
//! and stopped (its data removed) when dropped.
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{HarnessError, find_binary};

#[derive(Debug)]
pub struct Prometheus {
    child: Child,
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
}

fn err(message: impl Into<String>) -> HarnessError {
    HarnessError::Prometheus(message.into())
}

impl Prometheus {
    /// Starts `prometheus` with `config` (YAML; `rule_files` may name the `rules` files,
    /// written next to it under their names) and waits until it is ready.
    pub fn start(config: &str, rules: &[(&str, String)]) -> Result<Self, HarnessError> {
        let bin = find_binary("prometheus")?;
        let dir = tempfile::Builder::new()
            .prefix("e2e-prometheus-")
            .tempdir()
            .map_err(HarnessError::io("a temporary directory"))?;
        let config_file = dir.path().join("prometheus.yml");
        std::fs::write(&config_file, config).map_err(HarnessError::io(&config_file))?;
        for (name, text) in rules {
            let file = dir.path().join(name);
            std::fs::write(&file, text).map_err(HarnessError::io(&file))?;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(HarnessError::io("a free port"))?
            .port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let log = dir.path().join("prometheus.log");
        let log_file = std::fs::File::create(&log).map_err(HarnessError::io(&log))?;
        let child = Command::new(&bin)
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(HarnessError::io(&bin))?;
        let prometheus = Self { child, addr, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = prometheus.get("/-/ready") {
                return Ok(prometheus);
            }
            if Instant::now() > deadline {
                return Err(err(format!(
                    "not ready after 30 s; its log:\n{}",
                    prometheus.log()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Prometheus's own log (stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// GET `path` (with its query string), HTTP/1.0 so the body is neither chunked nor kept
    /// alive: status code and body.
    fn get(&self, path: &str) -> Result<(u16, String), HarnessError> {
        let io = HarnessError::io(PathBuf::from(format!("http://{}{path}", self.addr)));
        let fetch = || -> std::io::Result<Vec<u8>> {
            let mut s = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            write!(s, "GET {path} HTTP/1.0\r\nHost: {}\r\n\r\n", self.addr)?;
            let mut raw = Vec::new();
            s.read_to_end(&mut raw)?;
            Ok(raw)
        };
        let raw = String::from_utf8_lossy(&fetch().map_err(io)?).into_owned();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| err(format!("no HTTP status in {head:?}")))?;
        Ok((code, body.to_string()))
    }

    /// The `data` of a successful API response.
    fn api(&self, path: &str) -> Result<Value, HarnessError> {
        let (code, body) = self.get(path)?;
        let json: Value = serde_json::from_str(&body)
            .map_err(|e| err(format!("{path}: HTTP {code}, not JSON ({e}): {body}")))?;
        if json["status"] != "success" {
            return Err(err(format!("{path}: HTTP {code}: {body}")));
        }
        Ok(json["data"].clone())
    }

    /// The series of a range query (`/api/v1/query_range`), each with its `values`.
    pub fn query_range(
        &self,
        expr: &str,
        start: f64,
        end: f64,
        step: f64,
    ) -> Result<Vec<Value>, HarnessError> {
        let path = format!(
            "/api/v1/query_range?query={}&start={start:.3}&end={end:.3}&step={step}",
            url_encode(expr)
        );
        let data = self.api(&path)?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }

    /// The series of an instant query at the current time.
    pub fn query(&self, expr: &str) -> Result<Vec<Value>, HarnessError> {
        let data = self.api(&format!("/api/v1/query?query={}", url_encode(expr)))?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }

    /// Active alerts (pending and firing) with their labels, state and `activeAt`.
    pub fn alerts(&self) -> Result<Vec<Value>, HarnessError> {
        let data = self.api("/api/v1/alerts")?;
        Ok(data["alerts"].as_array().cloned().unwrap_or_default())
    }

    /// Scrape targets: `activeTargets` with their labels, `health` and `lastError`.
    pub fn targets(&self) -> Result<Vec<Value>, HarnessError> {
        let data = self.api("/api/v1/targets?state=active")?;
        Ok(data["activeTargets"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percent-encoding of a query parameter (everything but RFC 3986's unreserved characters).
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::url_encode;

    #[test]
    fn queries_are_percent_encoded() {
        assert_eq!(
            url_encode(r#"rate(a{b=~"c.*"}[5m]) / 2"#),
            "rate%28a%7Bb%3D~%22c.%2A%22%7D%5B5m%5D%29%20%2F%202"
        );
    }
}
