//! The public edge under hostile clients: huge headers, slowloris (on the
//! public, admin and metrics listeners), request smuggling, HTTP/2 rapid
//! reset, oversize and stalled ClientHellos, too many connections, and too
//! few file descriptors.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use postern_tests::{API_KEY, HttpUpstream, HttpsClient, TestEdge, curl, eventually};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Sends raw bytes to the plain HTTP listener and reads until the edge
/// closes (or `secs` pass).
async fn raw_http(edge: &TestEdge, request: &[u8], secs: u64) -> String {
    let mut conn = TcpStream::connect(edge.addrs.http.unwrap()).await.unwrap();
    conn.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(secs), conn.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

async fn http_edge_with_upstream(extra: &str) -> (TestEdge, HttpUpstream, postern_agent::Agent) {
    let edge = TestEdge::start_with(extra).await;
    let upstream = HttpUpstream::start().await;
    let tunnel = format!(
        "  web:\n    proto: http\n    addr: {}\n    domain: app.example.test\n",
        upstream.port()
    );
    let (agent, _) = edge.agent(&tunnel).await;
    (edge, upstream, agent)
}

#[tokio::test]
async fn huge_or_too_many_headers_get_431() {
    let (edge, upstream, _agent) = http_edge_with_upstream("").await;
    let big = format!(
        "GET /big HTTP/1.1\r\nHost: app.example.test\r\nX-Big: {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    let out = raw_http(&edge, big.as_bytes(), 5).await;
    assert!(
        out.starts_with("HTTP/1.1 431"),
        "{}",
        &out[..out.len().min(200)]
    );
    let many: String = (0..150).map(|i| format!("X-H{i}: v\r\n")).collect();
    let out = raw_http(
        &edge,
        format!("GET /many HTTP/1.1\r\nHost: app.example.test\r\n{many}\r\n").as_bytes(),
        5,
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");
    assert!(
        upstream.requests().is_empty(),
        "nothing oversized reached the upstream"
    );
    let ok = raw_http(
        &edge,
        b"GET /fine HTTP/1.1\r\nHost: app.example.test\r\nConnection: close\r\n\r\n",
        5,
    )
    .await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
}

#[tokio::test]
async fn a_configured_header_count_limit_is_the_one_enforced() {
    let (edge, upstream, _agent) = http_edge_with_upstream("[limits]\nmax_headers = 10\n").await;
    let request = |n: usize| {
        let extra: String = (0..n).map(|i| format!("X-H{i}: v\r\n")).collect();
        format!("GET /n{n} HTTP/1.1\r\nHost: app.example.test\r\n{extra}Connection: close\r\n\r\n")
    };
    // 2 + 12 headers: over the limit of 10, under hyper's default of 100.
    let out = raw_http(&edge, request(12).as_bytes(), 5).await;
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");
    let out = raw_http(&edge, request(6).as_bytes(), 5).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let paths: Vec<String> = upstream.requests().iter().map(|r| r.path.clone()).collect();
    assert_eq!(
        paths,
        ["/n6"],
        "only the request within the limit reached the upstream"
    );
}

#[tokio::test]
async fn slowloris_is_cut_off_at_the_header_read_timeout() {
    let (edge, _upstream, _agent) =
        http_edge_with_upstream("[limits]\nheader_read_timeout = \"1s\"\n").await;
    let mut conn = TcpStream::connect(edge.addrs.http.unwrap()).await.unwrap();
    conn.write_all(b"GET / HTTP/1.1\r\nHost: app.example.test\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    // One header byte every 200 ms: never a complete head.
    let dripping = async {
        loop {
            if conn.write_all(b"X").await.is_err() {
                break;
            }
            let mut byte = [0u8; 1];
            match tokio::time::timeout(Duration::from_millis(200), conn.read(&mut byte)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), dripping)
        .await
        .expect("the edge cuts the slow client off");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "not before the timeout: {took:?}"
    );
    // Everyone else is served meanwhile and after.
    let ok = raw_http(
        &edge,
        b"GET /ok HTTP/1.1\r\nHost: app.example.test\r\nConnection: close\r\n\r\n",
        5,
    )
    .await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
}

/// Opens a connection to `addr` and sends half a request head, then nothing.
async fn half_a_request_head(addr: SocketAddr) -> TcpStream {
    let mut conn = TcpStream::connect(addr).await.unwrap();
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept:")
        .await
        .unwrap();
    conn
}

/// Waits (10 s at most) for the edge to close `conn`; how long it took.
async fn closed_by_the_edge(mut conn: TcpStream, opened: Instant, what: &str) -> Duration {
    let mut sink = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut sink))
        .await
        .unwrap_or_else(|_| panic!("the {what} listener keeps a slow client's connection open"))
        .unwrap_or_default();
    assert!(
        sink.is_empty(),
        "{what}: nothing is answered to half a head"
    );
    opened.elapsed()
}

/// A normal request to the admin API and one to `/metrics` succeed.
async fn both_answer(edge: &TestEdge) {
    let (status, _) = edge
        .api("GET", "/certificate_authorities", None, API_KEY)
        .await;
    assert_eq!(status, 200);
    assert!(
        edge.metrics_text()
            .await
            .contains("postern_open_connections")
    );
}

#[tokio::test]
async fn admin_and_metrics_listeners_cut_a_slow_client_at_the_header_read_timeout() {
    let edge = TestEdge::start_with("[limits]\nheader_read_timeout = \"1s\"\n").await;
    let (admin, metrics) = (edge.addrs.admin.unwrap(), edge.addrs.metrics.unwrap());
    let opened = Instant::now();
    let slow_admin = half_a_request_head(admin).await;
    let slow_metrics = half_a_request_head(metrics).await;
    // Both listeners answer everyone else while the slow clients wait.
    both_answer(&edge).await;
    for (conn, what) in [(slow_admin, "admin"), (slow_metrics, "metrics")] {
        let took = closed_by_the_edge(conn, opened, what).await;
        assert!(
            took >= Duration::from_millis(900),
            "{what}: not before the timeout: {took:?}"
        );
    }
    // And after.
    both_answer(&edge).await;
}

#[tokio::test]
async fn request_smuggling_variants_are_refused_and_never_forwarded() {
    let (edge, upstream, _agent) = http_edge_with_upstream("").await;
    let second = "GET /smuggled HTTP/1.1\r\nHost: app.example.test\r\n\r\n";
    // CL+TE: hyper lets Transfer-Encoding win, drops Content-Length and
    // closes the connection after the response, so nothing pipelined behind
    // it is ever read; the request itself goes upstream re-framed.
    let cl_te = format!(
        "POST /first HTTP/1.1\r\nHost: app.example.test\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{second}"
    );
    let out = raw_http(&edge, cl_te.as_bytes(), 5).await;
    assert_eq!(
        out.matches("HTTP/1.1 ").count(),
        1,
        "CL+TE: one answer, then the connection closes: {out}"
    );
    if let Some(first) = upstream.requests().into_iter().find(|r| r.path == "/first") {
        assert!(
            !first.headers.contains_key("content-length"),
            "CL+TE forwarded with both headers"
        );
    }
    let variants = [
        (
            "two CLs",
            format!(
                "POST /refused HTTP/1.1\r\nHost: app.example.test\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello{second}"
            ),
        ),
        (
            "obs-fold",
            format!(
                "GET /refused HTTP/1.1\r\nHost: app.example.test\r\nX-Folded: a\r\n b\r\n\r\n{second}"
            ),
        ),
        (
            "xchunked",
            format!(
                "POST /refused HTTP/1.1\r\nHost: app.example.test\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n{second}"
            ),
        ),
        (
            "space before colon",
            format!(
                "POST /refused HTTP/1.1\r\nHost: app.example.test\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n{second}"
            ),
        ),
        // The head is valid and is forwarded before the body is read; the
        // bad chunk then aborts it (see below).
        (
            "bad chunk size",
            format!(
                "POST /bad-chunk HTTP/1.1\r\nHost: app.example.test\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffffff\r\n\r\n{second}"
            ),
        ),
        (
            "two Hosts",
            format!(
                "GET /refused HTTP/1.1\r\nHost: app.example.test\r\nHost: evil.example.test\r\n\r\n{second}"
            ),
        ),
        ("no Host", format!("GET /refused HTTP/1.1\r\n\r\n{second}")),
    ];
    for (what, request) in variants {
        let out = raw_http(&edge, request.as_bytes(), 5).await;
        assert!(out.starts_with("HTTP/1.1 400"), "{what}: {out}");
        assert_eq!(
            out.matches("HTTP/1.1 ").count(),
            1,
            "{what}: one answer, then the connection closes: {out}"
        );
    }
    let seen: Vec<String> = upstream.requests().into_iter().map(|r| r.path).collect();
    assert!(
        !seen.iter().any(|p| p == "/smuggled"),
        "a smuggled request reached the upstream: {seen:?}"
    );
    assert!(
        !seen.iter().any(|p| p == "/refused"),
        "a refused request reached the upstream: {seen:?}"
    );
    // Bodies stream: a request whose head is valid goes upstream at once,
    // and a malformed body aborts it there (the upstream never gets a
    // complete request, and nothing pipelined behind it).
}

#[tokio::test]
async fn http2_rapid_reset_is_answered_with_goaway() {
    let (edge, upstream, _agent) = http_edge_with_upstream("").await;
    let tls = HttpsClient::new(edge.addrs.https, &edge.ca_pem())
        .with_alpn(&[b"h2"])
        .connect("app.example.test")
        .await
        .unwrap();
    let (mut client, connection) = h2::client::handshake(tls).await.unwrap();
    let conn_task = tokio::spawn(connection);
    // A burst of streams opened and reset at once, then stop and listen.
    let mut sent = 0;
    for _ in 0..25 {
        let request = http::Request::get("https://app.example.test/reset")
            .body(())
            .unwrap();
        let Ok(ready) = client.clone().ready().await else {
            break;
        };
        client = ready;
        let Ok((_, mut stream)) = client.send_request(request, true) else {
            break;
        };
        stream.send_reset(h2::Reason::CANCEL);
        sent += 1;
    }
    let ended = tokio::time::timeout(Duration::from_secs(10), conn_task)
        .await
        .expect("the edge ends the connection")
        .unwrap();
    let err = ended.expect_err("the connection ends with an error");
    // The edge sends GOAWAY(ENHANCE_YOUR_CALM) and closes; a client still
    // writing may see the close before it reads the GOAWAY.
    let goaway = err.is_go_away() && err.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM);
    assert!(goaway || err.is_io(), "{err:?}");
    let forwarded = upstream.requests().len();
    println!("{sent} reset streams sent, {forwarded} reached the upstream");
    assert!(
        forwarded < sent / 10,
        "{forwarded} of {sent} reset requests reached the upstream"
    );
}

/// A TLS record header announcing a handshake of `len` bytes.
fn hello_header(len: usize) -> Vec<u8> {
    let record = len.min(16 * 1024);
    let mut out = vec![0x16, 0x03, 0x01, (record >> 8) as u8, record as u8];
    out.extend_from_slice(&[0x01, (len >> 16) as u8, (len >> 8) as u8, len as u8]);
    out
}

#[tokio::test]
async fn oversize_and_stalled_client_hellos_are_closed_and_counted() {
    let edge = TestEdge::start_with("[limits]\nclient_hello_timeout = \"1s\"\n").await;
    // 70 KiB of ClientHello, split over records: closed at the size cap.
    let mut big = TcpStream::connect(edge.addrs.https).await.unwrap();
    let mut bytes = hello_header(70 * 1024);
    while bytes.len() < 72 * 1024 {
        bytes.extend_from_slice(&[0x16, 0x03, 0x01, 0x40, 0x00]);
        bytes.extend_from_slice(&[0u8; 16 * 1024]);
    }
    let _ = big.write_all(&bytes).await;
    let mut sink = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), big.read_to_end(&mut sink))
        .await
        .expect("closed at the cap")
        .ok();
    assert_eq!(edge.stat("tls_bad_client_hello"), 1);

    // A hello that never completes: closed at the peek timeout.
    let mut slow = TcpStream::connect(edge.addrs.https).await.unwrap();
    slow.write_all(&hello_header(300)[..7]).await.unwrap();
    let started = Instant::now();
    let mut sink = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut sink))
        .await
        .expect("closed at the peek timeout")
        .ok();
    assert!(started.elapsed() >= Duration::from_millis(900));
    eventually(5, "the timeout is counted", || async {
        edge.stat("tls_client_hello_timeout") == 1
    })
    .await;
}

#[tokio::test]
async fn past_the_connection_cap_new_connections_are_shed_and_old_ones_keep_working() {
    let (edge, _upstream, _agent) =
        http_edge_with_upstream("[limits]\nmax_connections = 20\n").await;
    let http = edge.addrs.http.unwrap();
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(TcpStream::connect(http).await.unwrap());
    }
    eventually(5, "all 20 are accepted", || async {
        let out = raw_http(
            &edge,
            b"GET / HTTP/1.1\r\nHost: app.example.test\r\n\r\n",
            2,
        )
        .await;
        out.starts_with("HTTP/1.1 503")
    })
    .await;
    let out = raw_http(
        &edge,
        b"GET / HTTP/1.1\r\nHost: app.example.test\r\n\r\n",
        2,
    )
    .await;
    assert!(
        out.contains("ERR_POSTERN_9003") && out.contains("Retry-After"),
        "{out}"
    );
    assert!(edge.stat("shed_connections") >= 1);
    // A connection accepted before the cap still works.
    let conn = &mut held[0];
    conn.write_all(b"GET /still HTTP/1.1\r\nHost: app.example.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    conn.read_to_end(&mut out).await.unwrap();
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"));
    held.clear();
    eventually(5, "capacity comes back", || async {
        let out = raw_http(
            &edge,
            b"GET / HTTP/1.1\r\nHost: app.example.test\r\nConnection: close\r\n\r\n",
            2,
        )
        .await;
        out.starts_with("HTTP/1.1 200")
    })
    .await;
}

#[tokio::test]
async fn out_of_file_descriptors_the_edge_keeps_serving_and_recovers() {
    let mut edge = TestEdge::start_process_with_fd_limit(64).await;
    let http = edge.addrs.http.unwrap();
    let mut held = Vec::new();
    for _ in 0..150 {
        if let Ok(Ok(c)) =
            tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(http)).await
        {
            held.push(c);
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        edge.process().child.try_wait().unwrap().is_none(),
        "the edge is still running"
    );
    drop(held);
    eventually(15, "the edge serves again", || async {
        let out = curl(&[
            "-m",
            "2",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            "Host: nobody.example.test",
            &format!("http://{http}/"),
        ])
        .await;
        String::from_utf8_lossy(&out.stdout) == "404"
    })
    .await;
    assert!(
        edge.process().child.try_wait().unwrap().is_none(),
        "still running after the storm"
    );
}
