//! `ragar data fetch`: the vendors' npm packages, downloaded once and checked on every reuse.
//!
//! Each package is fetched with `npm pack NAME@VERSION` (the registry's own client, no install,
//! no scripts run) into a scratch folder and renamed into `DATA/packages/` only when complete, so
//! an interrupted fetch never leaves a truncated tarball under the final name. A `.sha256`
//! sidecar (in `sha256sum` format) is written after the download; a later fetch or build hashes
//! the tarball again and compares, so a tarball damaged on disk is noticed, not built from.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use flate2::read::GzDecoder;
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

use super::{DataError, Vendor, PACKAGES_DIR};

/// Downloads every vendor's package that is not already in `DATA/packages/` with a matching
/// `.sha256` sidecar, and returns the tarballs' paths in vendor order. With `progress`, a bar
/// ticks once per package.
///
/// A tarball found without a sidecar (placed there by hand, e.g. on a machine without network)
/// is adopted if it reads as a complete gzipped tar; one whose hash no longer matches its
/// sidecar is downloaded again.
pub fn fetch(
    data_dir: &Path,
    vendors: &[Vendor],
    progress: bool,
) -> Result<Vec<PathBuf>, DataError> {
    fetch_using(data_dir, vendors, progress, &|| Command::new("npm"))
}

/// [`fetch`] with the `npm` command supplied, so tests can stand in a fake one.
pub(crate) fn fetch_using(
    data_dir: &Path,
    vendors: &[Vendor],
    progress: bool,
    npm: &dyn Fn() -> Command,
) -> Result<Vec<PathBuf>, DataError> {
    let dir = data_dir.join(PACKAGES_DIR);
    std::fs::create_dir_all(&dir).map_err(|e| DataError::io("create", &dir, e))?;

    let bar = if progress {
        ProgressBar::new(vendors.len() as u64)
    } else {
        ProgressBar::hidden()
    };
    if let Ok(style) =
        ProgressStyle::with_template("{spinner} fetch [{bar:30}] {pos}/{len} {wide_msg}")
    {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(200));

    let mut paths = Vec::with_capacity(vendors.len());
    for vendor in vendors {
        let spec = vendor.spec();
        bar.set_message(spec.clone());
        let path = vendor.tarball_path(data_dir);
        if !paths.contains(&path) {
            if is_reusable(&path)? {
                tracing::info!(package = %spec, path = %path.display(), "package already fetched");
            } else {
                download(vendor, &dir, &path, npm)?;
                tracing::info!(package = %spec, path = %path.display(), "package fetched");
            }
        }
        paths.push(path);
        bar.inc(1);
    }
    bar.finish_with_message("packages fetched");
    Ok(paths)
}

/// Whether the tarball at `path` can be kept: its hash matches its sidecar, or, without a
/// sidecar, it reads as a whole gzipped tar (then a sidecar is written for it).
fn is_reusable(path: &Path) -> Result<bool, DataError> {
    if !path.is_file() {
        return Ok(false);
    }
    let actual = sha256_file(path)?;
    match read_sidecar(path)? {
        Some(recorded) if recorded == actual => Ok(true),
        Some(recorded) => {
            tracing::warn!(
                path = %path.display(), %recorded, %actual,
                "tarball does not match its recorded sha256; downloading it again"
            );
            Ok(false)
        }
        None => {
            if let Err(reason) = verify_tarball(path) {
                tracing::warn!(path = %path.display(), %reason, "unreadable tarball; downloading it again");
                return Ok(false);
            }
            write_sidecar(path, &actual)?;
            Ok(true)
        }
    }
}

/// `npm pack` into a scratch folder next to the final place, then rename.
fn download(
    vendor: &Vendor,
    dir: &Path,
    dest: &Path,
    npm: &dyn Fn() -> Command,
) -> Result<(), DataError> {
    let spec = vendor.spec();
    let scratch = dir.join(format!(".fetch-{}.partial", vendor.tarball_name()));
    if scratch.exists() {
        std::fs::remove_dir_all(&scratch).map_err(|e| DataError::io("remove", &scratch, e))?;
    }
    std::fs::create_dir_all(&scratch).map_err(|e| DataError::io("create", &scratch, e))?;

    let output = npm()
        .arg("pack")
        .arg(&spec)
        .arg("--pack-destination")
        .arg(&scratch)
        .output()
        .map_err(|source| DataError::NpmSpawn {
            package: spec.clone(),
            source,
        })?;
    if !output.status.success() {
        let _ = std::fs::remove_dir_all(&scratch);
        return Err(DataError::NpmFailed {
            package: spec,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }

    let expected = scratch.join(vendor.tarball_name());
    let packed = if expected.is_file() {
        expected
    } else {
        // npm's naming may differ from ours (e.g. a future scheme for scoped names): take the
        // one tarball it wrote.
        let found = std::fs::read_dir(&scratch)
            .map_err(|e| DataError::io("list", &scratch, e))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|ext| ext == "tgz"));
        match found {
            Some(p) => p,
            None => {
                return Err(DataError::NpmNoTarball {
                    package: spec,
                    dir: scratch,
                })
            }
        }
    };

    let sha = sha256_file(&packed)?;
    std::fs::rename(&packed, dest).map_err(|e| DataError::io("move into place", dest, e))?;
    write_sidecar(dest, &sha)?;
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(())
}

/// SHA-256 of a file, lowercase hex.
pub(crate) fn sha256_file(path: &Path) -> Result<String, DataError> {
    let mut file = File::open(path).map_err(|e| DataError::io("open", path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| DataError::io("read", path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("{:x}", hasher.finalize()))
}

/// `foo.tgz` → `foo.tgz.sha256`.
pub(crate) fn sidecar_path(tarball: &Path) -> PathBuf {
    let mut name = tarball
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".sha256");
    tarball.with_file_name(name)
}

/// The hash recorded at fetch time, if there is a sidecar.
pub(crate) fn read_sidecar(tarball: &Path) -> Result<Option<String>, DataError> {
    let path = sidecar_path(tarball);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(text
            .split_whitespace()
            .next()
            .map(|h| h.to_ascii_lowercase())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(DataError::io("read", &path, e)),
    }
}

/// Writes `<hex>  <file name>` (so `sha256sum -c` can check it too), atomically.
fn write_sidecar(tarball: &Path, sha: &str) -> Result<(), DataError> {
    let path = sidecar_path(tarball);
    let tmp = path.with_extension("sha256.partial");
    let name = tarball
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut f = File::create(&tmp).map_err(|e| DataError::io("create", &tmp, e))?;
    writeln!(f, "{sha}  {name}").map_err(|e| DataError::io("write", &tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, &path).map_err(|e| DataError::io("move into place", &path, e))
}

/// Reads the whole tarball (every entry and the gzip trailer's CRC).
fn verify_tarball(path: &Path) -> Result<(), String> {
    let file = File::open(path).map_err(|e| e.to_string())?;
    let mut archive = tar::Archive::new(GzDecoder::new(io::BufReader::new(file)));
    for entry in archive.entries().map_err(|e| e.to_string())? {
        let mut entry = entry.map_err(|e| e.to_string())?;
        io::copy(&mut entry, &mut io::sink()).map_err(|e| e.to_string())?;
    }
    let mut rest = archive.into_inner();
    io::copy(&mut rest, &mut io::sink()).map_err(|e| e.to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::fixture;

    /// A stand-in for `npm`: a shell script that copies the fixture tarball named by its
    /// `pack NAME@VERSION --pack-destination DIR` arguments and logs each call. Run through `sh`
    /// rather than executed, so no test ever execs a file another thread may still hold open.
    fn fake_npm(root: &Path, fail: bool) -> (PathBuf, PathBuf) {
        let source = root.join("registry");
        std::fs::create_dir_all(&source).unwrap();
        let vendors = fixture::vendors();
        for (name, bytes) in fixture::tarballs() {
            let v = vendors.iter().find(|v| v.name == name).unwrap();
            std::fs::write(source.join(v.tarball_name()), bytes).unwrap();
        }
        let log = root.join("npm.log");
        let script = root.join("npm.sh");
        let body = if fail {
            "echo \"npm error 404 Not Found - $2\" >&2\nexit 1\n".to_string()
        } else {
            format!(
                "echo \"$*\" >> '{log}'\nspec=\"$2\"\nname=\"${{spec%@*}}\"\nver=\"${{spec##*@}}\"\n\
                 cp '{src}'/\"$name-$ver.tgz\" \"$4/$name-$ver.tgz\" || exit 1\necho \"$name-$ver.tgz\"\n",
                log = log.display(),
                src = source.display()
            )
        };
        std::fs::write(&script, body).unwrap();
        (script, log)
    }

    fn calls(log: &Path) -> usize {
        std::fs::read_to_string(log)
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    #[test]
    fn downloads_once_writes_sidecars_and_reuses() {
        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("data");
        let (script, log) = fake_npm(root.path(), false);
        let npm = || {
            let mut c = Command::new("sh");
            c.arg(&script);
            c
        };
        let vendors = fixture::vendors();

        let paths = fetch_using(&data, &vendors, false, &npm).unwrap();
        assert_eq!(paths.len(), 3);
        assert_eq!(calls(&log), 3);
        for (path, vendor) in paths.iter().zip(&vendors) {
            assert_eq!(path, &vendor.tarball_path(&data));
            let recorded = read_sidecar(path).unwrap().expect("sidecar written");
            assert_eq!(recorded, sha256_file(path).unwrap());
        }
        // No scratch folders left behind.
        let leftovers: Vec<_> = std::fs::read_dir(data.join(PACKAGES_DIR))
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".partial"))
            .collect();
        assert!(leftovers.is_empty());

        // Second run: everything verified, nothing downloaded.
        let again = fetch_using(&data, &vendors, false, &npm).unwrap();
        assert_eq!(again, paths);
        assert_eq!(calls(&log), 3);

        // A damaged tarball no longer matches its sidecar and is fetched again.
        std::fs::write(&paths[1], b"damaged").unwrap();
        fetch_using(&data, &vendors, false, &npm).unwrap();
        assert_eq!(calls(&log), 4);
        assert_eq!(
            read_sidecar(&paths[1]).unwrap().unwrap(),
            sha256_file(&paths[1]).unwrap()
        );
    }

    #[test]
    fn adopts_a_hand_placed_tarball_without_npm() {
        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("data");
        fixture::write_packages(&data);
        let npm = || -> Command { panic!("npm must not run when every package is present") };
        let vendors = fixture::vendors();
        let paths = fetch_using(&data, &vendors, false, &npm).unwrap();
        for path in &paths {
            assert_eq!(
                read_sidecar(path).unwrap().unwrap(),
                sha256_file(path).unwrap()
            );
        }
    }

    #[test]
    fn npm_failure_names_the_package() {
        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("data");
        let (script, _) = fake_npm(root.path(), true);
        let npm = || {
            let mut c = Command::new("sh");
            c.arg(&script);
            c
        };
        let err = fetch_using(&data, &fixture::vendors(), false, &npm).unwrap_err();
        assert!(matches!(err, DataError::NpmFailed { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("fixture-alpha@1.0.0") && msg.contains("404"),
            "{msg}"
        );
    }

    #[test]
    fn missing_npm_is_a_clear_error() {
        let root = tempfile::tempdir().unwrap();
        let npm = || Command::new("/nonexistent/ragar-test-npm");
        let err = fetch_using(root.path(), &fixture::vendors(), false, &npm).unwrap_err();
        assert!(matches!(err, DataError::NpmSpawn { .. }), "{err}");
        assert!(err.to_string().contains("npm"), "{err}");
    }
}
