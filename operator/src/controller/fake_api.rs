//! A minimal fake API server for unit tests of what a reconcile sends and in which waves:
//! it records each request (verb, path, body), answers creates by echoing the object and a
//! status patch with the job it is given, and holds every answer until `hold_for` requests
//! are in flight at once (or five seconds have passed), so a test sees which writes went out
//! together: the most in flight at once is recorded.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// One request the fake API server received.
#[derive(Clone, Debug)]
pub struct Request {
    pub verb: String,
    pub path: String,
    pub body: serde_json::Value,
}

#[derive(Default)]
struct State {
    requests: Vec<Request>,
    in_flight: usize,
    most_in_flight: usize,
    hold_for: usize,
}

/// The fake API server (listening until dropped with the test's runtime).
#[derive(Clone)]
pub struct FakeApi {
    pub url: String,
    state: Arc<Mutex<State>>,
    arrived: Arc<Notify>,
    job: Arc<serde_json::Value>,
}

impl FakeApi {
    /// Starts it; a status patch is answered with `job`.
    pub async fn start(job: serde_json::Value) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let api = Self {
            url,
            state: Arc::default(),
            arrived: Arc::default(),
            job: Arc::new(job),
        };
        let server = api.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                tokio::spawn(server.clone().serve(socket));
            }
        });
        api
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a new wave: forgets the requests so far, and holds answers until `n` requests
    /// are in flight together.
    pub fn expect_wave(&self, n: usize) {
        let mut s = self.state();
        s.requests.clear();
        s.most_in_flight = 0;
        s.hold_for = n;
    }

    /// The requests since the last [`Self::expect_wave`], events left out (they go out in
    /// the background), and the most that were in flight at once.
    pub fn requests(&self) -> (Vec<Request>, usize) {
        let s = self.state();
        let requests = (s.requests.iter())
            .filter(|r| !r.path.contains("/events"))
            .cloned()
            .collect();
        (requests, s.most_in_flight)
    }

    async fn serve(self, mut socket: TcpStream) {
        let mut buf = Vec::new();
        loop {
            // One request: headers, then Content-Length bytes of body (kube sends no chunks).
            let head_end = loop {
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                let mut chunk = [0u8; 8192];
                match socket.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            };
            let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
            let length = (head.lines())
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            while buf.len() < head_end + length {
                let mut chunk = [0u8; 8192];
                match socket.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let body: serde_json::Value =
                serde_json::from_slice(&buf[head_end..head_end + length]).unwrap_or_default();
            buf.drain(..head_end + length);
            let mut parts = head.split_whitespace();
            let verb = parts.next().unwrap_or_default().to_string();
            let path = parts.next().unwrap_or_default().to_string();
            let (code, answer) = self.answer(&verb, &path, &body);
            self.hold(Request { verb, path, body }).await;
            let answer = answer.to_string();
            let response = format!(
                "HTTP/1.1 {code} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{answer}",
                answer.len()
            );
            if socket.write_all(response.as_bytes()).await.is_err() {
                return;
            }
        }
    }

    fn answer(&self, verb: &str, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
        match verb {
            "POST" => (201, body.clone()),
            "PATCH" if path.contains("/status") => (200, (*self.job).clone()),
            _ => (
                404,
                serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                    "reason": "NotFound", "code": 404, "message": format!("{verb} {path}")}),
            ),
        }
    }

    /// Records the request and holds its answer until the wave is complete (or five seconds).
    async fn hold(&self, request: Request) {
        let counted = !request.path.contains("/events");
        {
            let mut s = self.state();
            s.requests.push(request);
            if counted {
                s.in_flight += 1;
                s.most_in_flight = s.most_in_flight.max(s.in_flight);
            }
        }
        self.arrived.notify_waiters();
        if counted {
            let wait = async {
                loop {
                    let notified = self.arrived.notified();
                    {
                        let s = self.state();
                        if s.most_in_flight >= s.hold_for {
                            return;
                        }
                    }
                    notified.await;
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(5), wait).await;
            self.state().in_flight -= 1;
        }
    }
}
