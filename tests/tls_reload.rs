//! Certificates are reloaded when a Secret mount swaps its `..data` symlink.

use std::os::unix::fs::symlink;

use kube_migrate::{certs, tls::CertReloader};

fn issue(dir: &std::path::Path) {
    let request = certs::Request {
        days: 1,
        ..Default::default()
    };
    certs::issue(dir, &request).unwrap();
}

#[test]
fn a_secret_style_symlink_swap_is_picked_up_and_garbage_is_ignored() {
    kube_migrate::tls::install_crypto_provider();
    let mount = tempfile::tempdir().unwrap();
    let (v1, v2) = (mount.path().join("..2026_v1"), mount.path().join("..2026_v2"));
    issue(&v1);
    issue(&v2);
    // Kubelet layout: tls.crt -> ..data/webhook.crt, ..data -> ..<timestamp>
    symlink(&v1, mount.path().join("..data")).unwrap();
    symlink(mount.path().join("..data/webhook.crt"), mount.path().join("tls.crt")).unwrap();
    symlink(mount.path().join("..data/webhook.key"), mount.path().join("tls.key")).unwrap();

    let reloader = CertReloader::new(mount.path().join("tls.crt"), mount.path().join("tls.key")).unwrap();
    let first = reloader.current();
    assert!(!reloader.reload().unwrap(), "unchanged content: no reload");

    let tmp = mount.path().join("..data_tmp");
    symlink(&v2, &tmp).unwrap();
    std::fs::rename(&tmp, mount.path().join("..data")).unwrap(); // atomic swap, as the kubelet does
    assert!(reloader.reload().unwrap());
    let second = reloader.current();
    assert_ne!(first.cert[0], second.cert[0]);

    std::fs::write(v2.join("webhook.crt"), "not a certificate").unwrap();
    assert!(reloader.reload().is_err());
    assert_eq!(
        reloader.current().cert[0],
        second.cert[0],
        "a broken update keeps the previous pair"
    );
}
