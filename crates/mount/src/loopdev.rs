//! Loop devices over mount files: a FUSE file becomes a real block device (`/dev/loopN`).

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A loop device attached to a file; detached on [`LoopDevice::detach`] or drop.
pub struct LoopDevice {
    device: Option<PathBuf>,
}

impl fmt::Debug for LoopDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoopDevice").field("device", &self.device).finish()
    }
}

fn losetup(args: &[&str]) -> io::Result<String> {
    let out = Command::new("losetup").args(args).output().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot run losetup (util-linux's 'mount' package provides it): {e}"),
        )
    })?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "losetup {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

impl LoopDevice {
    /// Attaches the first free loop device to `file` (needs root).
    ///
    /// # Errors
    /// No free device, not root, `losetup` missing.
    pub fn attach(file: &Path, read_only: bool) -> io::Result<Self> {
        let file = file
            .to_str()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the file path is not UTF-8"))?;
        let mut args = vec!["--find", "--show"];
        if read_only {
            args.push("--read-only");
        }
        args.push(file);
        let device = losetup(&args)?;
        tracing::debug!(%device, file, "loop device attached");
        Ok(Self { device: Some(PathBuf::from(device)) })
    }

    /// The device node, e.g. `/dev/loop3`.
    #[must_use]
    pub fn path(&self) -> &Path {
        self.device.as_deref().expect("attached until detached")
    }

    /// Detaches the device (the kernel finishes its I/O first).
    ///
    /// # Errors
    /// `losetup -d` failed (for example, the device is still mounted).
    pub fn detach(mut self) -> io::Result<()> {
        self.detach_inner()
    }

    fn detach_inner(&mut self) -> io::Result<()> {
        match self.device.take() {
            Some(d) => losetup(&["--detach", &d.to_string_lossy()]).map(drop),
            None => Ok(()),
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        if let Err(e) = self.detach_inner() {
            tracing::error!(error = %e, "detaching the loop device failed");
        }
    }
}
