//! A TCP relay standing for the network or a load balancer between a
//! client and a server: it forwards each connection to its target (which a
//! test may move), counts the connections it carries and can cut one. A
//! connection ends as soon as either side ends it, so that a relay in
//! front of a frozen client still shows the server closing.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use tokio::{
    net::{TcpListener, TcpStream},
    task::{AbortHandle, JoinHandle},
};

/// The connections carried now, by id, oldest first.
type Carried = Arc<Mutex<Vec<(u64, AbortHandle)>>>;

pub struct TcpRelay {
    pub addr: SocketAddr,
    target: Arc<Mutex<SocketAddr>>,
    carried: Carried,
    task: JoinHandle<()>,
}

impl TcpRelay {
    pub async fn start(target: SocketAddr) -> TcpRelay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let target = Arc::new(Mutex::new(target));
        let carried: Carried = Arc::default();
        let (to, list) = (target.clone(), carried.clone());
        let task = tokio::spawn(async move {
            let mut next = 0u64;
            while let Ok((inbound, _)) = listener.accept().await {
                let dest = *to.lock().unwrap();
                let (id, done) = (next, list.clone());
                next += 1;
                // Registered before the copy starts, so a cut can find it.
                let mut carried = list.lock().unwrap();
                let copy = tokio::spawn(async move {
                    if let Ok(outbound) = TcpStream::connect(dest).await {
                        let (mut in_read, mut in_write) = inbound.into_split();
                        let (mut out_read, mut out_write) = outbound.into_split();
                        tokio::select! {
                            _ = tokio::io::copy(&mut in_read, &mut out_write) => {}
                            _ = tokio::io::copy(&mut out_read, &mut in_write) => {}
                        }
                    }
                    done.lock().unwrap().retain(|(i, _)| *i != id);
                });
                carried.push((id, copy.abort_handle()));
            }
        });
        TcpRelay {
            addr,
            target,
            carried,
            task,
        }
    }

    /// Where new connections go from now on.
    pub fn retarget(&self, to: SocketAddr) {
        *self.target.lock().unwrap() = to;
    }

    /// How many connections the relay carries now.
    pub fn carried(&self) -> usize {
        self.carried.lock().unwrap().len()
    }

    /// Cuts the `n`-th connection carried now (0: the oldest): both of its
    /// sockets close at once.
    pub fn cut(&self, n: usize) {
        let mut carried = self.carried.lock().unwrap();
        let (_, copy) = carried.remove(n);
        copy.abort();
    }
}

impl Drop for TcpRelay {
    fn drop(&mut self) {
        self.task.abort();
        for (_, copy) in self.carried.lock().unwrap().drain(..) {
            copy.abort();
        }
    }
}
