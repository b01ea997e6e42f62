//! End-to-end image build: downloads the kernel, runs mmdebstrap and mkfs.ext4.
//!
//! Takes about a minute and needs root and the Debian mirror, so a plain `cargo test` skips it
//! (`#[ignore]`); scripts/test runs it, before the tests that run offline:
//! `cargo test -p smolvm-image --test full_build -- --ignored`. `SMOLVM_IMAGE_TEST_AGENT`
//! picks the agent binary to install (default: `/bin/true`, enough to check the pipeline;
//! the image will not boot with it).

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Instant;

use smolvm_image::{BuildOptions, ImageError};

#[test]
#[ignore = "needs root and the Debian mirror (about a minute): scripts/test runs it; by hand, \
            cargo test -p smolvm-image --test full_build -- --ignored"]
fn full_build_then_up_to_date_then_remove() {
    let agent = std::env::var_os("SMOLVM_IMAGE_TEST_AGENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/bin/true"));
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    let mut opts = BuildOptions::new(&agent);
    opts.name = "test".into();
    opts.images_dir = images.clone();
    opts.progress = true;

    let start = Instant::now();
    let image = smolvm_image::build(&opts).unwrap();
    eprintln!("full build: {:.1}s", start.elapsed().as_secs_f64());
    for step in &image.manifest.build_steps {
        eprintln!("  {:<45} {:>6.2}s", step.step, step.seconds);
    }
    eprintln!(
        "kernel {} {} (release {}), modules: {:?}",
        image.manifest.kernel.package,
        image.manifest.kernel.version,
        image.manifest.kernel.release,
        image.manifest.modules
    );

    // vmlinux is an x86-64 ELF.
    let vmlinux = std::fs::read(&image.kernel).unwrap();
    assert!(vmlinux.starts_with(b"\x7fELF\x02"));
    // The initramfs holds /init and the module list.
    let initrd = std::fs::read(&image.initrd).unwrap();
    let text = String::from_utf8_lossy(&initrd);
    assert!(initrd.starts_with(b"070701"));
    assert!(text.contains("init\0"));
    assert!(text.contains("smolvm/modules.list\0"));
    assert!(text.contains("TRAILER!!!\0"));
    assert_eq!(initrd.len() % 4, 0);
    for module in ["virtio_blk.ko", "virtio_console.ko", "virtio_net.ko"] {
        assert!(
            image.manifest.modules.iter().any(|m| m == module),
            "{module}"
        );
    }
    // The root filesystem is ext4, read-only, of the requested size.
    let meta = std::fs::metadata(&image.rootfs).unwrap();
    assert_eq!(meta.len(), opts.rootfs_size_mib << 20);
    assert_eq!(meta.permissions().mode() & 0o777, 0o444);
    image.verify().unwrap();

    // Same inputs: the existing image comes back without a rebuild.
    let start = Instant::now();
    let again = smolvm_image::build(&opts).unwrap();
    let noop = start.elapsed().as_secs_f64();
    eprintln!("up-to-date check: {noop:.2}s");
    assert_eq!(again.manifest.created, image.manifest.created, "rebuilt");

    let names: Vec<String> = smolvm_image::list(&images)
        .unwrap()
        .into_iter()
        .map(|i| i.name)
        .collect();
    assert_eq!(names, ["test"]);
    smolvm_image::remove(&images, "test").unwrap();
    assert!(matches!(
        smolvm_image::open(&images, "test"),
        Err(ImageError::NotFound { .. })
    ));
}
