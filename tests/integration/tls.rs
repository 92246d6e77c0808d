//! Redis over TLS with AUTH: a redis-server of the test's own on a TLS port that demands a client
//! certificate and a password, certificates made by the openssl command line.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::common::OwnRedis;
use ragar::config::RedisConfig;
use ragar::history::hot::Hot;
use ragar::history::HistoryEntry;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl command line is installed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA.
fn certificates(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-subj",
            "/CN=ragar-test-ca",
        ],
    );
    for (name, ext) in [
        ("server", "subjectAltName=IP:127.0.0.1"),
        ("client", "extendedKeyUsage=clientAuth"),
    ] {
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN=ragar-test-{name}"),
            ],
        );
        std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                &format!("{name}.crt"),
                "-extfile",
                &format!("{name}.ext"),
            ],
        );
    }
}

/// A redis-server of the test's own on a TLS port only, demanding a client certificate and a
/// password.
fn tls_redis(dir: &Path) -> OwnRedis {
    let path = |f: &str| dir.join(f).to_string_lossy().into_owned();
    let extra = [
        "--tls-cert-file",
        &path("server.crt"),
        "--tls-key-file",
        &path("server.key"),
        "--tls-ca-cert-file",
        &path("ca.crt"),
        "--tls-auth-clients",
        "yes",
        "--requirepass",
        "s3cret",
    ];
    OwnRedis::start_with(true, extra.iter().map(|a| a.to_string()).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_private_ca_client_certificate_and_auth() {
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let server = tls_redis(dir.path());
    let cfg = |password: &str, client_cert: bool| RedisConfig {
        url: format!("rediss://:{password}@127.0.0.1:{}/", server.port),
        key_prefix: format!("ragar-tls-{}", std::process::id()),
        timeout: Duration::from_secs(2),
        tls_ca_file: Some(dir.path().join("ca.crt")),
        tls_cert_file: client_cert.then(|| dir.path().join("client.crt")),
        tls_key_file: client_cert.then(|| dir.path().join("client.key")),
        ..RedisConfig::default()
    };

    let hot = Hot::new(&cfg("s3cret", true)).unwrap();
    hot.ping().await.expect("TLS + client certificate + AUTH");
    let entry = HistoryEntry {
        event_id: "e1".into(),
        user_id: "u1".into(),
        item_id: "i1".into(),
        action: ragar::event::Action::Like,
        ts_ms: 5,
        embedding: vec![0.5; 4].into(),
    };
    hot.fill_window("u1", &[]).await.unwrap();
    assert_eq!(hot.append(&[&entry]).await.unwrap(), 1);
    let window = hot.window("u1").await.unwrap().expect("a complete window");
    assert_eq!(window.len(), 1);
    assert_eq!(window[0].event_id, "e1");

    // The server really demands both: no client certificate, or a wrong password, is refused.
    assert!(Hot::new(&cfg("s3cret", false))
        .unwrap()
        .ping()
        .await
        .is_err());
    assert!(Hot::new(&cfg("wrong", true)).unwrap().ping().await.is_err());
}
