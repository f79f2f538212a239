//! Test images written as OCI image layouts, built by hand so tests do not
//! depend on the code under test to make their fixtures.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::Digest as _;

/// One blob as a descriptor would name it.
#[derive(Clone, Debug)]
pub struct Blob {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    pub bytes: Vec<u8>,
}

impl Blob {
    pub fn new(media_type: &str, bytes: Vec<u8>) -> Self {
        Self {
            media_type: media_type.to_owned(),
            digest: sha256(&bytes),
            size: bytes.len() as u64,
            bytes,
        }
    }

    pub fn descriptor(&self) -> serde_json::Value {
        serde_json::json!({"mediaType": self.media_type, "digest": self.digest, "size": self.size})
    }

    pub fn hex(&self) -> &str {
        self.digest.trim_start_matches("sha256:")
    }
}

pub fn sha256(bytes: &[u8]) -> String {
    let digest = sha2::Sha256::digest(bytes);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// Deterministic pseudo-random bytes (xorshift), so fixtures differ by seed
/// but never between runs.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A gzip-compressed tar layer holding one file; returns (layer, diff_id).
pub fn gzip_layer(name: &str, contents: &[u8]) -> (Blob, String) {
    let mut tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(contents.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_cksum();
    tar.append_data(&mut header, name, contents)
        .expect("tar in memory");
    let tar = tar.into_inner().expect("tar in memory");
    let diff_id = sha256(&tar);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).expect("gzip in memory");
    (
        Blob::new(
            "application/vnd.oci.image.layer.v1.tar+gzip",
            gz.finish().expect("gzip in memory"),
        ),
        diff_id,
    )
}

/// An image: config, layers and the manifest that names them.
#[derive(Clone, Debug)]
pub struct Image {
    pub config: Blob,
    pub layers: Vec<Blob>,
    pub manifest: Blob,
}

impl Image {
    /// An amd64 linux image with `layer_sizes.len()` layers of random files.
    pub fn random(seed: u64, layer_sizes: &[usize]) -> Self {
        let mut layers = Vec::new();
        let mut diff_ids = Vec::new();
        for (i, size) in layer_sizes.iter().enumerate() {
            let (layer, diff_id) = gzip_layer(
                &format!("file{i}"),
                &random_bytes(seed * 1000 + i as u64, *size),
            );
            layers.push(layer);
            diff_ids.push(diff_id);
        }
        Self::from_layers(seed, layers, diff_ids, "amd64")
    }

    pub fn from_layers(seed: u64, layers: Vec<Blob>, diff_ids: Vec<String>, arch: &str) -> Self {
        let config = serde_json::json!({
            "architecture": arch,
            "os": "linux",
            "config": {"Env": [format!("SEED={seed}")]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        let config = Blob::new(
            "application/vnd.oci.image.config.v1+json",
            serde_json::to_vec(&config).unwrap(),
        );
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config.descriptor(),
            "layers": layers.iter().map(Blob::descriptor).collect::<Vec<_>>(),
        });
        let manifest = Blob::new(
            "application/vnd.oci.image.manifest.v1+json",
            serde_json::to_vec(&manifest).unwrap(),
        );
        Self {
            config,
            layers,
            manifest,
        }
    }

    pub fn blobs(&self) -> impl Iterator<Item = &Blob> {
        std::iter::once(&self.config).chain(self.layers.iter())
    }
}

/// A multi-platform index over several images.
pub fn index_of(images: &[(&Image, &str)]) -> Blob {
    let manifests: Vec<serde_json::Value> = images
        .iter()
        .map(|(image, arch)| {
            let mut d = image.manifest.descriptor();
            d["platform"] = serde_json::json!({"architecture": arch, "os": "linux"});
            d
        })
        .collect();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests,
    });
    Blob::new(
        "application/vnd.oci.image.index.v1+json",
        serde_json::to_vec(&index).unwrap(),
    )
}

/// An OCI image layout being written.
pub struct LayoutWriter {
    root: PathBuf,
    tags: BTreeMap<String, Blob>,
    untagged: Vec<Blob>,
}

impl LayoutWriter {
    pub fn new(root: &Path) -> Self {
        fs_err::create_dir_all(root.join("blobs/sha256")).unwrap();
        fs_err::write(root.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        Self {
            root: root.to_owned(),
            tags: BTreeMap::new(),
            untagged: Vec::new(),
        }
    }

    pub fn blob(&mut self, blob: &Blob) -> &mut Self {
        fs_err::write(self.root.join("blobs/sha256").join(blob.hex()), &blob.bytes).unwrap();
        self
    }

    /// Writes the image's manifest, config and every layer.
    pub fn image(&mut self, image: &Image) -> &mut Self {
        for blob in image.blobs() {
            self.blob(blob);
        }
        self.blob(&image.manifest)
    }

    /// Writes manifest and config but leaves out the layers: a sparse layout.
    pub fn image_without_layers(&mut self, image: &Image) -> &mut Self {
        self.blob(&image.config);
        self.blob(&image.manifest)
    }

    pub fn tag(&mut self, tag: &str, top: &Blob) -> &mut Self {
        self.tags.insert(tag.to_owned(), top.clone());
        self.write_index()
    }

    pub fn untagged(&mut self, top: &Blob) -> &mut Self {
        self.untagged.push(top.clone());
        self.write_index()
    }

    fn write_index(&mut self) -> &mut Self {
        let mut manifests: Vec<serde_json::Value> = self
            .tags
            .iter()
            .map(|(tag, blob)| {
                let mut d = blob.descriptor();
                d["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": tag});
                d
            })
            .collect();
        manifests.extend(self.untagged.iter().map(Blob::descriptor));
        let index = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests});
        fs_err::write(
            self.root.join("index.json"),
            serde_json::to_vec(&index).unwrap(),
        )
        .unwrap();
        self
    }

    pub fn blob_path(&self, blob: &Blob) -> PathBuf {
        self.root.join("blobs/sha256").join(blob.hex())
    }
}

/// A `docker save` archive (legacy layout: `<id>/layer.tar`, uncompressed)
/// of an image with uncompressed layers; returns (config digest, layer diff ids).
pub fn write_docker_archive(
    path: &Path,
    seed: u64,
    layer_sizes: &[usize],
    repo_tag: &str,
) -> (String, Vec<String>) {
    let mut layer_tars = Vec::new();
    for (i, size) in layer_sizes.iter().enumerate() {
        let mut tar = tar::Builder::new(Vec::new());
        let contents = random_bytes(seed * 77 + i as u64, *size);
        let mut header = tar::Header::new_gnu();
        header.set_size(contents.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, format!("f{i}"), contents.as_slice())
            .unwrap();
        layer_tars.push(tar.into_inner().unwrap());
    }
    let diff_ids: Vec<String> = layer_tars.iter().map(|t| sha256(t)).collect();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap();
    let config_digest = sha256(&config);
    let config_name = format!("{}.json", config_digest.trim_start_matches("sha256:"));
    let layer_names: Vec<String> = (0..layer_tars.len())
        .map(|i| format!("layer{i}/layer.tar"))
        .collect();
    let manifest = serde_json::to_vec(&serde_json::json!([{
        "Config": config_name, "RepoTags": [repo_tag], "Layers": layer_names,
    }]))
    .unwrap();
    let file = fs_err::File::create(path).unwrap();
    let mut archive = tar::Builder::new(file);
    let mut add = |name: &str, bytes: &[u8]| {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        archive.append_data(&mut header, name, bytes).unwrap();
    };
    add(&config_name, &config);
    for (name, tar) in layer_names.iter().zip(&layer_tars) {
        add(name, tar);
    }
    add("manifest.json", &manifest);
    archive.into_inner().unwrap();
    (config_digest, diff_ids)
}

/// An image whose root holds a static busybox as `/bin/sh`, and an
/// `/etc/os-release` of its own, as a layout in `dir` tagged `v1`. Returns
/// the layout and the image.
pub fn busybox_layout(dir: &Path) -> (PathBuf, Image) {
    let busybox =
        fs_err::read("/bin/busybox").expect("busybox-static is installed (scripts/setup)");
    let mut tar = tar::Builder::new(Vec::new());
    let mut add = |path: &str, kind: tar::EntryType, data: &[u8], link: Option<&str>| {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_size(data.len() as u64);
        header.set_mode(0o755);
        if let Some(link) = link {
            header.set_link_name(link).unwrap();
        }
        header.set_cksum();
        tar.append_data(&mut header, path, data).unwrap();
    };
    add("bin", tar::EntryType::Directory, b"", None);
    add("etc", tar::EntryType::Directory, b"", None);
    add("bin/busybox", tar::EntryType::Regular, &busybox, None);
    add("bin/sh", tar::EntryType::Symlink, b"", Some("busybox"));
    add(
        "etc/os-release",
        tar::EntryType::Regular,
        b"ID=custody-test-image\n",
        None,
    );
    let tar = tar.into_inner().unwrap();
    let diff_id = sha256(&tar);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    let layer = Blob::new(
        "application/vnd.oci.image.layer.v1.tar+gzip",
        gz.finish().unwrap(),
    );
    let image = Image::from_layers(9, vec![layer], vec![diff_id], "amd64");
    let root = dir.join("busybox-layout");
    LayoutWriter::new(&root)
        .image(&image)
        .tag("v1", &image.manifest);
    (root, image)
}
