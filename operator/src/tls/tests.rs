use super::*;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/data/tls")
        .join(name)
}

fn files(cert: &str, key: &str, ca: &str) -> TlsFiles {
    TlsFiles {
        cert: fixture(cert),
        key: fixture(key),
        ca: fixture(ca),
    }
}

fn err(files: &TlsFiles, endpoint: &str) -> String {
    ServerTls::load(files, endpoint).unwrap_err().to_string()
}

#[test]
fn the_fixtures_load_for_every_name_the_certificate_covers() {
    let good = files("server.crt", "server.key", "ca.crt");
    for endpoint in [
        "https://localhost:9090",
        "https://127.0.0.1:1",
        "https://dinoflow-operator.dinoflow-system.svc:9090",
    ] {
        let tls = ServerTls::load(&good, endpoint).unwrap();
        assert!(tls.ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(server(Some(&tls)).is_ok());
    }
    assert!(
        !format!(
            "{:?}",
            ServerTls::load(&good, "https://localhost:1").unwrap()
        )
        .contains("PRIVATE")
    );
}

#[test]
fn a_missing_file_is_named_with_its_flag() {
    let e = err(
        &files("absent.crt", "server.key", "ca.crt"),
        "https://localhost:1",
    );
    assert!(
        e.contains("--progress-tls-cert-file") && e.contains("absent.crt"),
        "{e}"
    );
    let e = err(
        &files("server.crt", "absent.key", "ca.crt"),
        "https://localhost:1",
    );
    assert!(
        e.contains("--progress-tls-key-file") && e.contains("absent.key"),
        "{e}"
    );
    let e = err(
        &files("server.crt", "server.key", "absent.crt"),
        "https://localhost:1",
    );
    assert!(
        e.contains("--progress-tls-ca-file") && e.contains("absent.crt"),
        "{e}"
    );
}

#[test]
fn swapped_or_garbled_files_are_refused_naming_the_file() {
    // A key where the certificate belongs.
    let e = err(
        &files("server.key", "server.key", "ca.crt"),
        "https://localhost:1",
    );
    assert!(
        e.contains("--progress-tls-cert-file") && e.contains("BEGIN CERTIFICATE"),
        "{e}"
    );
    // A certificate where the key belongs.
    let e = err(
        &files("server.crt", "server.crt", "ca.crt"),
        "https://localhost:1",
    );
    assert!(
        e.contains("--progress-tls-key-file") && e.contains("private key"),
        "{e}"
    );
    let dir = tempfile::tempdir().unwrap();
    let garbled = dir.path().join("garbled.crt");
    std::fs::write(
        &garbled,
        "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let mut f = files("server.crt", "server.key", "ca.crt");
    f.ca = garbled;
    let e = err(&f, "https://localhost:1");
    assert!(
        e.contains("--progress-tls-ca-file") && e.contains("garbled.crt"),
        "{e}"
    );
}

#[test]
fn a_key_of_another_certificate_is_refused() {
    let e = err(
        &files("server.crt", "other.key", "ca.crt"),
        "https://localhost:1",
    );
    assert!(
        e.contains("does not go with") && e.contains("other.key"),
        "{e}"
    );
}

#[test]
fn a_ca_that_did_not_sign_the_certificate_is_refused_at_start_up() {
    let e = err(
        &files("server.crt", "server.key", "other-ca.crt"),
        "https://localhost:1",
    );
    assert!(
        e.contains("does not verify against") && e.contains("other-ca.crt"),
        "{e}"
    );
}

#[test]
fn the_certificate_must_cover_the_host_trainers_dial() {
    let good = files("server.crt", "server.key", "ca.crt");
    let e = err(&good, "https://dinoflow-operator.elsewhere.svc:9090");
    assert!(
        e.contains("dinoflow-operator.elsewhere.svc") && e.contains("DINOFLOW_PROGRESS_ENDPOINT"),
        "{e}"
    );
    let e = err(&good, "http://localhost:9090");
    assert!(
        e.contains("https://") && e.contains("--progress-plaintext"),
        "{e}"
    );
}
