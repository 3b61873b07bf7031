//! Opening disk images for import: raw files directly, other formats (qcow2, vmdk, vdi,
//! vhdx, qed) through `qemu-img`, which checks them and converts them to a sparse raw
//! temp file first (`qemu-img` cannot write raw to a pipe).

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::BankError;

/// Bytes in a disk sector: a raw image must be a whole number of them.
pub const SECTOR: u64 = 512;

/// Image formats `import` understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    Raw,
    Qcow2,
    Vmdk,
    Vdi,
    Vhdx,
    Qed,
}

impl ImageFormat {
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Vmdk => "vmdk",
            ImageFormat::Vdi => "vdi",
            ImageFormat::Vhdx => "vhdx",
            ImageFormat::Qed => "qed",
        }
    }

    pub const ALL: [ImageFormat; 6] = [
        ImageFormat::Raw,
        ImageFormat::Qcow2,
        ImageFormat::Vmdk,
        ImageFormat::Vdi,
        ImageFormat::Vhdx,
        ImageFormat::Qed,
    ];

    /// Recognises a format from the first bytes of a file.
    pub fn sniff(head: &[u8]) -> Option<ImageFormat> {
        if head.starts_with(b"QFI\xfb") {
            Some(ImageFormat::Qcow2)
        } else if head.starts_with(b"KDMV") || head.starts_with(b"# Disk DescriptorFile") {
            Some(ImageFormat::Vmdk)
        } else if head.starts_with(b"vhdxfile") {
            Some(ImageFormat::Vhdx)
        } else if head.starts_with(b"QED\0") {
            Some(ImageFormat::Qed)
        } else if head.len() >= 0x44 && head[0x40..0x44] == [0x7f, 0x10, 0xda, 0xbe] {
            Some(ImageFormat::Vdi)
        } else {
            None
        }
    }
}

impl std::str::FromStr for ImageFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        ImageFormat::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| {
                format!("unknown image format {s:?} (known: raw, qcow2, vmdk, vdi, vhdx, qed)")
            })
    }
}

/// A raw view of an image, ready to be read chunk by chunk.
pub struct ImageSource {
    pub file: File,
    pub len: u64,
    pub format: ImageFormat,
    /// The temp file holding a converted image; removed when this is dropped.
    temp: Option<PathBuf>,
}

impl Drop for ImageSource {
    fn drop(&mut self) {
        if let Some(t) = &self.temp {
            let _ = std::fs::remove_file(t);
        }
    }
}

impl ImageSource {
    /// The offset of the first data at or after `offset`, as the file system knows it
    /// (`SEEK_DATA`), or `None` when only a hole follows. File systems without sparse
    /// file support report everything as data.
    pub fn next_data(&self, offset: u64) -> Option<u64> {
        // SAFETY: lseek on a descriptor we own; it does not touch memory.
        let r = unsafe {
            libc::lseek(
                self.file.as_raw_fd(),
                offset as libc::off_t,
                libc::SEEK_DATA,
            )
        };
        if r >= 0 {
            Some(r as u64)
        } else if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
            None
        } else {
            Some(offset)
        }
    }
}

fn image_err(path: &Path, why: impl Into<String>) -> BankError {
    BankError::Image {
        path: path.to_path_buf(),
        why: why.into(),
    }
}

/// Opens `path` as a disk image. `format` forces a format; otherwise it is recognised
/// from the file's first bytes, and anything unrecognised is taken as raw. `-` is
/// standard input, read to its end into a sparse temp file in `temp_dir` first (an
/// image's size must be known before its index is made), removed when the source is
/// dropped.
pub fn open_image(
    path: &Path,
    format: Option<ImageFormat>,
    temp_dir: &Path,
) -> Result<ImageSource, BankError> {
    if path == Path::new("-") {
        let spooled = spool_stdin(temp_dir)?;
        let mut src = open_image(&spooled, format, temp_dir).map_err(|e| match e {
            BankError::Image { why, .. } => image_err(Path::new("standard input"), why),
            e => e,
        });
        match &mut src {
            // A raw image is read from the spooled file, removed with the source.
            Ok(s) if s.temp.is_none() => s.temp = Some(spooled),
            // Converted into a file of its own, or refused: the spooled copy goes now.
            _ => {
                let _ = std::fs::remove_file(&spooled);
            }
        }
        return src;
    }
    let md =
        std::fs::metadata(path).map_err(|e| image_err(path, format!("cannot open it: {e}")))?;
    if md.is_dir() {
        return Err(image_err(path, "it is a directory, not a disk image"));
    }
    let mut file = File::open(path).map_err(|e| image_err(path, format!("cannot open it: {e}")))?;
    let mut head = vec![0u8; 512];
    let n = read_up_to(&mut file, &mut head)
        .map_err(|e| image_err(path, format!("cannot read it: {e}")))?;
    head.truncate(n);
    let format = format
        .or_else(|| ImageFormat::sniff(&head))
        .unwrap_or(ImageFormat::Raw);
    if format == ImageFormat::Raw {
        let len = if md.file_type().is_file() {
            md.len()
        } else {
            block_device_size(&file)
                .map_err(|e| image_err(path, format!("cannot find its size: {e}")))?
        };
        if len == 0 {
            return Err(image_err(path, "it is empty"));
        }
        if len % SECTOR != 0 {
            return Err(image_err(
                path,
                format!(
                    "it is not a disk image: its size, {len} bytes, is not a whole number of \
                     512-byte sectors (give --format if it is an image in another format)"
                ),
            ));
        }
        return Ok(ImageSource {
            file,
            len,
            format,
            temp: None,
        });
    }
    convert_with_qemu_img(path, format, temp_dir)
}

/// Copies standard input into a new file in `temp_dir`, leaving holes where whole
/// 64 KiB blocks are zero; returns its path (the file is removed on failure).
fn spool_stdin(temp_dir: &Path) -> Result<PathBuf, BankError> {
    use std::io::{Seek, SeekFrom, Write};
    let temp = temp_dir.join(format!(
        "mbank-import-stdin-{}-{}.img",
        std::process::id(),
        mbank_core::VersionId::random().short()
    ));
    let stdin = Path::new("standard input");
    let fail = |why: String| {
        let _ = std::fs::remove_file(&temp);
        image_err(stdin, why)
    };
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&temp)
        .map_err(|e| {
            image_err(
                stdin,
                format!(
                    "cannot make a temp file to hold it ({}): {e}; give --tmpdir DIR on a file system with room",
                    temp.display()
                ),
            )
        })?;
    let mut input = std::io::stdin().lock();
    let mut buf = vec![0u8; 64 << 10];
    let mut len = 0u64;
    loop {
        let mut n = 0;
        while n < buf.len() {
            match input.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(fail(format!("cannot read it: {e}"))),
            }
        }
        if n == 0 {
            break;
        }
        let r = if buf[..n].iter().all(|b| *b == 0) {
            out.seek(SeekFrom::Current(n as i64)).map(|_| ())
        } else {
            out.write_all(&buf[..n])
        };
        r.map_err(|e| fail(format!("cannot copy it into {}: {e}", temp.display())))?;
        len += n as u64;
        if n < buf.len() {
            break;
        }
    }
    out.set_len(len)
        .map_err(|e| fail(format!("cannot size {}: {e}", temp.display())))?;
    Ok(temp)
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn block_device_size(f: &File) -> std::io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = f;
    let len = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(0))?;
    Ok(len)
}

fn qemu_img() -> Command {
    Command::new(std::env::var_os("MBANK_QEMU_IMG").unwrap_or_else(|| "qemu-img".into()))
}

fn run_qemu_img(
    path: &Path,
    what: &str,
    cmd: &mut Command,
) -> Result<std::process::Output, BankError> {
    cmd.output().map_err(|e| {
        image_err(
            path,
            format!(
                "cannot run qemu-img to {what} ({e}); install it with `apt-get install qemu-utils`"
            ),
        )
    })
}

fn first_lines(s: &[u8], n: usize) -> String {
    let s = String::from_utf8_lossy(s);
    let mut lines: Vec<&str> = s
        .lines()
        .filter(|l| !l.trim().is_empty())
        .take(n + 1)
        .collect();
    let more = lines.len() > n;
    lines.truncate(n);
    let mut out = lines.join("; ");
    if more {
        out.push_str("; …");
    }
    out
}

fn convert_with_qemu_img(
    path: &Path,
    format: ImageFormat,
    temp_dir: &Path,
) -> Result<ImageSource, BankError> {
    let fmt = format.name();
    // qemu-img convert reads past the end of a truncated image as zeros without a word,
    // so check the image first.
    let check = run_qemu_img(
        path,
        "check the image",
        qemu_img()
            .args(["check", "-f", fmt, "--output=json"])
            .arg(path),
    )?;
    match check.status.code() {
        Some(0) | Some(3) | Some(63) => {} // clean, leaks only, or format has no check
        _ => {
            let corruptions = serde_json::from_slice::<serde_json::Value>(&check.stdout)
                .ok()
                .and_then(|v| v.get("corruptions").and_then(|c| c.as_u64()));
            let detail = first_lines(&check.stderr, 2);
            return Err(image_err(
                path,
                match corruptions {
                    Some(n) => format!(
                        "it is a damaged {fmt} image: qemu-img check found {n} errors \
                         (the file may be truncated): {detail}"
                    ),
                    None => format!("it is not a readable {fmt} image: qemu-img said: {detail}"),
                },
            ));
        }
    }
    let temp = temp_dir.join(format!(
        "mbank-import-{}-{}.raw",
        std::process::id(),
        mbank_core::VersionId::random().short()
    ));
    let out = run_qemu_img(
        path,
        "convert the image",
        qemu_img()
            .args(["convert", "-q", "-f", fmt, "-O", "raw"])
            .arg(path)
            .arg(&temp),
    );
    let guard = ImageSource {
        file: match File::open(path) {
            Ok(f) => f,
            Err(e) => return Err(image_err(path, format!("cannot open it: {e}"))),
        },
        len: 0,
        format,
        temp: Some(temp.clone()),
    };
    let out = out?;
    if !out.status.success() {
        return Err(image_err(
            path,
            format!(
                "qemu-img could not convert this {fmt} image to raw (into {}): {}",
                temp.display(),
                first_lines(&out.stderr, 3)
            ),
        ));
    }
    let file = File::open(&temp).map_err(|e| {
        image_err(
            path,
            format!("cannot open the converted image {}: {e}", temp.display()),
        )
    })?;
    let len = file
        .metadata()
        .map_err(|e| image_err(path, format!("cannot inspect the converted image: {e}")))?
        .len();
    let mut src = guard;
    src.file = file;
    src.len = len;
    if len == 0 {
        return Err(image_err(path, "it is an image of an empty disk"));
    }
    Ok(src)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffing() {
        assert_eq!(
            ImageFormat::sniff(b"QFI\xfb\0\0\0\x03"),
            Some(ImageFormat::Qcow2)
        );
        assert_eq!(ImageFormat::sniff(b"vhdxfile...."), Some(ImageFormat::Vhdx));
        assert_eq!(ImageFormat::sniff(&[0u8; 512]), None);
        assert_eq!("qcow2".parse::<ImageFormat>(), Ok(ImageFormat::Qcow2));
        assert!("iso".parse::<ImageFormat>().is_err());
    }

    #[test]
    fn raw_images_must_be_whole_sectors() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("notes.txt");
        std::fs::write(&p, b"hello, this is not a disk\n").unwrap();
        let e = open_image(&p, None, d.path()).err().unwrap();
        assert!(e.to_string().contains("not a disk image"), "{e}");
        let e = open_image(&d.path().join("missing.raw"), None, d.path())
            .err()
            .unwrap();
        assert!(e.to_string().contains("missing.raw"), "{e}");
        let e = open_image(d.path(), None, d.path()).err().unwrap();
        assert!(e.to_string().contains("directory"), "{e}");
        let p = d.path().join("empty.raw");
        std::fs::write(&p, b"").unwrap();
        assert!(
            open_image(&p, None, d.path())
                .err()
                .unwrap()
                .to_string()
                .contains("empty")
        );
        let p = d.path().join("disk.raw");
        std::fs::write(&p, vec![1u8; 4096]).unwrap();
        let s = open_image(&p, None, d.path()).unwrap();
        assert_eq!((s.len, s.format), (4096, ImageFormat::Raw));
    }
}
