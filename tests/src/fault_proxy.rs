//! A TCP proxy between a client and the API server that can stall: while stalled it forwards
//! no byte in either direction on any connection, old or new, as a hung API server or a
//! partitioned network does. Connections survive the stall and resume after it. Its upstream
//! can be moved ([`FaultProxy::retarget`]): new connections go to the new one, as a Service's
//! do when its ready endpoint changes (the leading operator replica's progress endpoint).

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A running proxy; dropping it stops accepting (open connections end with their peers).
pub struct FaultProxy {
    addr: SocketAddr,
    stalled: watch::Sender<bool>,
    upstream: watch::Sender<SocketAddr>,
    accept: JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards every connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stalled, _) = watch::channel(false);
        let (target, _) = watch::channel(upstream);
        let gate = stalled.clone();
        let current = target.subscribe();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let gate = gate.subscribe();
                let upstream = *current.borrow();
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(upstream).await {
                        forward(client, server, gate).await;
                    }
                });
            }
        });
        Ok(Self {
            addr,
            stalled,
            upstream: target,
            accept,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sends new connections to `upstream` (open ones stay where they are).
    pub fn retarget(&self, upstream: SocketAddr) {
        self.upstream.send_replace(upstream);
    }

    /// Where new connections go.
    pub fn upstream(&self) -> SocketAddr {
        *self.upstream.borrow()
    }

    /// Stops (`true`) or resumes (`false`) all forwarding.
    pub fn stall(&self, stalled: bool) {
        self.stalled.send_replace(stalled);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn forward(client: TcpStream, server: TcpStream, gate: watch::Receiver<bool>) {
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    tokio::select! {
        _ = pipe(cr, sw, gate.clone()) => {}
        _ = pipe(sr, cw, gate) => {}
    }
}

/// Copies `from` to `to`, holding every chunk while the gate says stalled.
async fn pipe<R, W>(mut from: R, mut to: W, mut gate: watch::Receiver<bool>)
where
    R: AsyncReadExt + Unpin,
    W: AsyncWriteExt + Unpin,
{
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if gate.wait_for(|stalled| !*stalled).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if gate.wait_for(|stalled| !*stalled).await.is_err()
            || to.write_all(&buf[..n]).await.is_err()
        {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn forwards_and_holds_bytes_while_stalled() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = echo.accept().await.unwrap();
            let mut b = [0u8; 1];
            while s.read_exact(&mut b).await.is_ok() {
                s.write_all(&b).await.unwrap();
            }
        });
        let proxy = FaultProxy::start(upstream).await.unwrap();
        let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
        let mut b = [0u8; 1];
        c.write_all(b"a").await.unwrap();
        c.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"a");
        proxy.stall(true);
        c.write_all(b"b").await.unwrap();
        let held = tokio::time::timeout(Duration::from_millis(300), c.read_exact(&mut b)).await;
        assert!(held.is_err(), "no byte passes a stalled proxy");
        proxy.stall(false);
        c.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"b");
    }

    /// A server that answers every connection with `byte` and closes it.
    async fn one_byte_server(byte: u8) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let _ = s.write_all(&[byte]).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn new_connections_go_to_the_new_upstream_after_a_retarget() {
        let a = one_byte_server(b'a').await;
        let b = one_byte_server(b'b').await;
        let proxy = FaultProxy::start(a).await.unwrap();
        let read = || async {
            let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
            let mut byte = [0u8; 1];
            c.read_exact(&mut byte).await.unwrap();
            byte[0]
        };
        assert_eq!(read().await, b'a');
        proxy.retarget(b);
        assert_eq!(proxy.upstream(), b);
        assert_eq!(read().await, b'b');
    }
}
