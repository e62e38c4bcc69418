//! A tunnel's upstream addresses, looked up once for many dials.
//!
//! `getaddrinfo` blocks, so tokio runs each lookup on its blocking pool: a
//! hand-off to another thread and back for every upstream connection. For
//! `postern http 8080` (upstream `localhost:8080`) that was 120 µs more on
//! each new connection's p50 and a fifth fewer `Connection: close`
//! requests per second through a TCP endpoint. A name's addresses are
//! kept for a few seconds (Envoy refreshes DNS every 5 s by default) and
//! looked up again at once after a dial that reached none of them. Once
//! they are due, one dial looks the name up while the others go on with
//! the addresses it had, and a lookup that fails keeps them for another
//! period: a resolver's hiccup does not take a working upstream away.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{net::TcpStream, time::Instant};

/// How long a name's addresses are used before it is looked up again.
const RESOLVED_FOR: Duration = Duration::from_secs(5);

/// The addresses of one upstream `host:port`.
pub(crate) struct UpstreamAddrs {
    host: String,
    port: u16,
    /// An IP literal: its one address, never looked up.
    literal: Option<Arc<[SocketAddr]>>,
    /// A name's addresses, once looked up.
    cached: Mutex<Option<Looked>>,
}

/// A name's addresses and when they were looked up.
struct Looked {
    at: Instant,
    addrs: Arc<[SocketAddr]>,
    /// A dial is looking the name up again; the others use these meanwhile.
    refreshing: bool,
}

impl UpstreamAddrs {
    pub(crate) fn new(host: &str, port: u16) -> UpstreamAddrs {
        let literal = host
            .parse::<IpAddr>()
            .ok()
            .map(|ip| Arc::from([SocketAddr::new(ip, port)]));
        UpstreamAddrs {
            host: host.to_string(),
            port,
            literal,
            cached: Mutex::new(None),
        }
    }

    /// The addresses to dial, in the resolver's order.
    async fn get(&self) -> io::Result<Arc<[SocketAddr]>> {
        if let Some(addrs) = &self.literal {
            return Ok(addrs.clone());
        }
        let stale = match self.cached.lock().expect("addresses lock").as_mut() {
            Some(looked) if looked.refreshing || looked.at.elapsed() < RESOLVED_FOR => {
                return Ok(looked.addrs.clone());
            }
            Some(looked) => {
                looked.refreshing = true;
                Some(looked.addrs.clone())
            }
            None => None,
        };
        let found = lookup(&self.host, self.port).await;
        let addrs = match (found, stale) {
            (Ok(addrs), _) => addrs,
            (Err(_), Some(stale)) => stale,
            (Err(e), None) => return Err(e),
        };
        *self.cached.lock().expect("addresses lock") = Some(Looked {
            at: Instant::now(),
            addrs: addrs.clone(),
            refreshing: false,
        });
        Ok(addrs)
    }

    /// Connects to the first address that answers, as
    /// `TcpStream::connect` does; the error is the last address's. A dial
    /// that reached none of them drops the name's addresses, so that the
    /// next dial looks them up again.
    pub(crate) async fn connect(&self) -> io::Result<TcpStream> {
        let addrs = self.get().await?;
        let mut last = None;
        for addr in addrs.iter() {
            match TcpStream::connect(addr).await {
                Ok(tcp) => return Ok(tcp),
                Err(e) => last = Some(e),
            }
        }
        self.forget();
        Err(last.expect("at least one address"))
    }

    /// Drops the name's addresses (a dial that timed out reached none).
    pub(crate) fn forget(&self) {
        *self.cached.lock().expect("addresses lock") = None;
    }
}

/// `host`'s addresses, from the system's resolver.
async fn lookup(host: &str, port: u16) -> io::Result<Arc<[SocketAddr]>> {
    let addrs: Arc<[SocketAddr]> = tokio::net::lookup_host((host, port)).await?.collect();
    if addrs.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{host} has no address"),
        ));
    }
    Ok(addrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_literal_is_its_address_and_is_never_looked_up() {
        for (host, want) in [("127.0.0.1", "127.0.0.1:80"), ("::1", "[::1]:80")] {
            let addrs = UpstreamAddrs::new(host, 80);
            let got = addrs.get().await.unwrap();
            assert_eq!(&*got, &[want.parse::<SocketAddr>().unwrap()]);
            assert!(addrs.cached.lock().unwrap().is_none(), "{host}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_names_addresses_are_kept_until_they_expire_or_are_forgotten() {
        let addrs = UpstreamAddrs::new("localhost", 9);
        let first = addrs.get().await.unwrap();
        assert!(first.iter().all(|a| a.ip().is_loopback() && a.port() == 9));
        let again = addrs.get().await.unwrap();
        assert!(Arc::ptr_eq(&first, &again), "the same lookup, kept");
        tokio::time::advance(RESOLVED_FOR).await;
        let expired = addrs.get().await.unwrap();
        assert!(
            !Arc::ptr_eq(&first, &expired),
            "looked up again once expired"
        );
        addrs.forget();
        let forgotten = addrs.get().await.unwrap();
        assert!(
            !Arc::ptr_eq(&expired, &forgotten),
            "looked up again once forgotten"
        );
    }

    /// `addrs` as if looked up `ago`, and whether a dial is refreshing them.
    fn looked(addrs: &UpstreamAddrs, ago: Duration, refreshing: bool) -> Arc<[SocketAddr]> {
        let old: Arc<[SocketAddr]> = Arc::from(["192.0.2.1:9".parse::<SocketAddr>().unwrap()]);
        *addrs.cached.lock().unwrap() = Some(Looked {
            at: Instant::now() - ago,
            addrs: old.clone(),
            refreshing,
        });
        old
    }

    #[tokio::test]
    async fn while_one_dial_looks_a_name_up_again_the_others_use_its_old_addresses() {
        let addrs = UpstreamAddrs::new("localhost", 9);
        let old = looked(&addrs, RESOLVED_FOR * 2, true);
        assert!(Arc::ptr_eq(&addrs.get().await.unwrap(), &old));
        looked(&addrs, RESOLVED_FOR * 2, false);
        let new = addrs.get().await.unwrap();
        assert!(
            !Arc::ptr_eq(&new, &old),
            "the dial that found them due looks up"
        );
        assert!(new.iter().all(|a| a.ip().is_loopback()));
    }

    #[tokio::test]
    async fn a_lookup_that_fails_keeps_the_old_addresses_and_none_is_an_error() {
        // Refused by the resolver itself: a host name has no spaces.
        let addrs = UpstreamAddrs::new("no such host", 9);
        assert!(addrs.get().await.is_err(), "nothing to fall back on");
        let old = looked(&addrs, RESOLVED_FOR * 2, false);
        assert!(Arc::ptr_eq(&addrs.get().await.unwrap(), &old));
        let kept = addrs.cached.lock().unwrap();
        let kept = kept.as_ref().unwrap();
        assert!(!kept.refreshing);
        assert!(kept.at.elapsed() < RESOLVED_FOR, "kept for another period");
    }

    #[tokio::test]
    async fn a_dial_that_reaches_no_address_fails_and_forgets_them() {
        // A port nothing listens on: bound, then closed.
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let addrs = UpstreamAddrs::new("localhost", port);
        // Refused on 127.0.0.1; on ::1 refused too, or unreachable where
        // IPv6 is off.
        assert!(addrs.connect().await.is_err());
        assert!(addrs.cached.lock().unwrap().is_none());
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .unwrap();
        let open = UpstreamAddrs::new("localhost", listener.local_addr().unwrap().port());
        let tcp = open.connect().await.unwrap();
        assert_eq!(
            tcp.peer_addr().unwrap(),
            listener.local_addr().unwrap(),
            "localhost reaches the listener on 127.0.0.1 (after ::1, if it resolves first)"
        );
        assert!(open.cached.lock().unwrap().is_some());
    }
}
