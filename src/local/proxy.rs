//! The per-branch TCP proxy: a fixed local port whose backend is the
//! branch's current compute. Switching the backend (a restore's finalize)
//! drops the connections in flight once; new ones reach the new backend.
//! It is the local twin of the Service selector switch.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How long a new connection waits for a backend when the branch has none
/// (its compute is starting), before it is closed.
const WAIT_FOR_BACKEND: Duration = Duration::from_secs(10);

/// Where a proxy sends new connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// No compute: connections are closed at once.
    Down,
    /// A compute is being started: connections wait for it (a while).
    Starting,
    /// The compute's private address.
    Up(SocketAddr),
}

/// A listening proxy. Dropping it closes the port and every connection.
pub struct Proxy {
    port: u16,
    backend: watch::Sender<Backend>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Serves `listener` (already bound).
    pub fn serve(listener: TcpListener, backend: Backend) -> std::io::Result<Proxy> {
        let port = listener.local_addr()?.port();
        let (tx, rx) = watch::channel(backend);
        let task = tokio::spawn(accept_loop(listener, rx));
        Ok(Proxy {
            port,
            backend: tx,
            task,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The current backend.
    pub fn backend(&self) -> Backend {
        *self.backend.borrow()
    }

    /// Points new connections at `backend`; connections to another backend
    /// are dropped.
    pub fn set_backend(&self, backend: Backend) {
        self.backend.send_if_modified(|b| {
            if *b == backend {
                false
            } else {
                *b = backend;
                true
            }
        });
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, rx: watch::Receiver<Backend>) {
    loop {
        match listener.accept().await {
            Ok((client, _)) => {
                let _ = client.set_nodelay(true);
                tokio::spawn(serve_one(client, rx.clone()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "proxy accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve_one(mut client: TcpStream, mut rx: watch::Receiver<Backend>) {
    let backend = {
        let wait = rx.wait_for(|b| *b != Backend::Starting);
        match tokio::time::timeout(WAIT_FOR_BACKEND, wait).await {
            Ok(Ok(b)) => *b,
            _ => Backend::Down,
        }
    };
    let Backend::Up(addr) = backend else {
        return;
    };
    let mut server = match TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(backend = %addr, error = %e, "proxy could not reach the compute");
            return;
        }
    };
    let _ = server.set_nodelay(true);
    rx.mark_unchanged();
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        _ = async {
            loop {
                // Sender gone (branch deleted) or backend switched: drop.
                if rx.changed().await.is_err() || *rx.borrow_and_update() != Backend::Up(addr) {
                    break;
                }
            }
        } => {
            tracing::debug!(backend = %addr, "backend switched: dropping a client connection");
        }
    }
}
