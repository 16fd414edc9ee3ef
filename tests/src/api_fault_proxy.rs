//! An HTTP proxy between a client (the operator) and the API server that injects the API
//! server's own failures: error replies (409 Conflict, 5xx) to the next requests that match,
//! and stalls (no request answered, no byte of an open watch forwarded, until resumed).
//!
//! The client speaks plain HTTP to it (a kubeconfig from [`ApiFaultProxy::write_kubeconfig`],
//! no credentials); it forwards each request with the cluster admin's [`kube::Client`] (TLS,
//! client certificate), streaming responses through, so watches work as they do direct. A
//! TCP-level proxy ([`crate::FaultProxy`]) cannot do this part: the API server's TLS hides
//! which request is which.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::HarnessError;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// Which requests an injected reply answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Injection {
    /// The HTTP status to answer with (409, 500, 503, ...), as a `Status` object.
    pub status: u16,
    /// Only requests that change something (POST, PUT, PATCH, DELETE).
    pub writes_only: bool,
    /// Only requests whose path contains this (e.g. `/pretrainjobs/`).
    pub path_contains: String,
    /// How many matching requests get it.
    pub count: usize,
}

/// One injected reply: the request it answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Injected {
    pub status: u16,
    pub method: String,
    pub path: String,
}

#[derive(Default)]
struct Faults {
    pending: VecDeque<Injection>,
    served: Vec<Injected>,
    forwarded: u64,
}

struct State {
    client: kube::Client,
    faults: Mutex<Faults>,
    stalled: watch::Sender<bool>,
}

/// A running proxy; dropping it stops accepting.
pub struct ApiFaultProxy {
    addr: SocketAddr,
    state: Arc<State>,
    accept: JoinHandle<()>,
}

impl ApiFaultProxy {
    /// Listens on a free loopback port; forwards every request with `client`.
    pub async fn start(client: kube::Client) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stalled, _) = watch::channel(false);
        let state = Arc::new(State {
            client,
            faults: Mutex::default(),
            stalled,
        });
        let shared = Arc::clone(&state);
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = Arc::clone(&shared);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let state = Arc::clone(&state);
                        async move { Ok::<_, Infallible>(handle(&state, req).await) }
                    });
                    // Errors here are the client going away (a killed operator): nothing to do.
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Self {
            addr,
            state,
            accept,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Writes a kubeconfig that reaches the API server through this proxy.
    pub fn write_kubeconfig(&self, path: &Path) -> Result<(), HarnessError> {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fault-proxy\n  cluster:\n    server: http://{}\n\
             users:\n- name: via-proxy\n  user: {{}}\ncontexts:\n- name: fault-proxy\n  context:\n    cluster: fault-proxy\n    user: via-proxy\n\
             current-context: fault-proxy\n",
            self.addr
        );
        std::fs::write(path, text).map_err(HarnessError::io(path))
    }

    /// Queues `injection`: the next `count` matching requests get its error reply.
    pub fn inject(&self, injection: Injection) {
        self.lock().pending.push_back(injection);
    }

    /// Replies injected so far, oldest first.
    pub fn injected(&self) -> Vec<Injected> {
        self.lock().served.clone()
    }

    /// Injections not yet used up.
    pub fn pending(&self) -> usize {
        self.lock().pending.iter().map(|i| i.count).sum()
    }

    /// Requests forwarded to the API server so far.
    pub fn forwarded(&self) -> u64 {
        self.lock().forwarded
    }

    /// Stops (`true`) or resumes (`false`) answering requests and forwarding response bytes.
    pub fn stall(&self, stalled: bool) {
        self.state.stalled.send_replace(stalled);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Faults> {
        self.state.faults.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for ApiFaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn handle(state: &State, req: Request<Incoming>) -> Response<ProxyBody> {
    let mut gate = state.stalled.subscribe();
    if gate.wait_for(|s| !*s).await.is_err() {
        return reply(503, "the fault proxy is shutting down");
    }
    let path = req.uri().path().to_string();
    if let Some(status) = take_injection(state, req.method(), &path) {
        return reply(status, "injected by the e2e API fault proxy");
    }
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return reply(400, &format!("reading the request body: {e}")),
    };
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or_else(|| path.clone(), |p| p.as_str().to_string());
    let mut builder = http::Request::builder()
        .method(parts.method)
        .uri(path_and_query);
    for (name, value) in &parts.headers {
        if !matches!(
            name.as_str(),
            "host" | "connection" | "content-length" | "transfer-encoding"
        ) {
            builder = builder.header(name, value);
        }
    }
    let request = match builder.body(kube::client::Body::from(body.to_vec())) {
        Ok(r) => r,
        Err(e) => return reply(400, &format!("rebuilding the request: {e}")),
    };
    state
        .faults
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .forwarded += 1;
    let response = match state.client.send(request).await {
        Ok(r) => r,
        Err(e) => return reply(502, &format!("forwarding to the API server: {e}")),
    };
    let (mut parts, body) = response.into_parts();
    parts.headers.remove("transfer-encoding");
    parts.headers.remove("connection");
    // Each chunk waits while stalled: an open watch goes silent, as with a hung API server.
    let frames = body.into_data_stream().then(move |chunk| {
        let mut gate = gate.clone();
        async move {
            let _ = gate.wait_for(|s| !*s).await;
            chunk.map(Frame::data).map_err(|e| Box::new(e) as BoxError)
        }
    });
    Response::from_parts(parts, BodyExt::boxed_unsync(StreamBody::new(frames)))
}

/// The status of the first pending injection `method path` matches, used up by one.
fn take_injection(state: &State, method: &Method, path: &str) -> Option<u16> {
    let write = matches!(
        *method,
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    );
    let mut faults = state.faults.lock().unwrap_or_else(|e| e.into_inner());
    let i = faults
        .pending
        .iter()
        .position(|i| (write || !i.writes_only) && path.contains(&i.path_contains))?;
    let status = faults.pending[i].status;
    faults.pending[i].count -= 1;
    if faults.pending[i].count == 0 {
        faults.pending.remove(i);
    }
    faults.served.push(Injected {
        status,
        method: method.to_string(),
        path: path.to_string(),
    });
    Some(status)
}

/// An API server `Status` reply with `code`.
fn reply(code: u16, message: &str) -> Response<ProxyBody> {
    let reason = match code {
        409 => "Conflict",
        429 => "TooManyRequests",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "InternalError",
    };
    let body = serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    });
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = Response::new(BodyExt::boxed_unsync(
        Full::new(Bytes::from(body.to_string())).map_err(|e: Infallible| match e {}),
    ));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> State {
        let config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
        State {
            client: kube::Client::try_from(config).unwrap(),
            faults: Mutex::default(),
            stalled: watch::channel(false).0,
        }
    }

    #[tokio::test]
    async fn injections_answer_only_matching_requests_and_are_used_up() {
        let s = state();
        s.faults.lock().unwrap().pending.push_back(Injection {
            status: 409,
            writes_only: true,
            path_contains: "/pretrainjobs/".into(),
            count: 2,
        });
        let status = "/apis/dinoflow.dev/v1alpha1/namespaces/n/pretrainjobs/j/status";
        assert_eq!(take_injection(&s, &Method::GET, status), None, "a read");
        assert_eq!(
            take_injection(&s, &Method::PATCH, "/api/v1/namespaces/n/pods/p"),
            None,
            "another path"
        );
        assert_eq!(take_injection(&s, &Method::PATCH, status), Some(409));
        assert_eq!(take_injection(&s, &Method::PUT, status), Some(409));
        assert_eq!(take_injection(&s, &Method::PATCH, status), None, "used up");
        let served = s.faults.lock().unwrap().served.clone();
        assert_eq!(served.len(), 2);
        assert_eq!((served[1].status, served[1].method.as_str()), (409, "PUT"));
    }

    #[tokio::test]
    async fn an_injected_reply_is_a_status_object_kube_reads_as_the_api_error() {
        let body = reply(409, "x").into_body().collect().await.unwrap();
        let status: kube::core::Status = serde_json::from_slice(&body.to_bytes()).unwrap();
        assert_eq!((status.code, status.reason.as_str()), (409, "Conflict"));
    }
}
